// The tile unit our kernels' AMX paths run on: Intel AMX (LDTILECFG, TILELOADD, TILEZERO, TILESTORED, and the
// products TDPBSUD for q_q8.cpp, TDPBF16PS for q_bf16.cpp) where the build has it (the "amx" set of
// kernels/__init__.py) and the CPU and Linux let this process use it; elsewhere a software model of the same
// instructions, written from Intel's pseudocode for them. The model runs the tile kernels' layouts, tile shapes
// and float steps on every AVX-512 machine, against the dot-product kernels; on an AMX machine the hardware unit
// runs the same kernels and the same tests.
//
// Tiles are fixed per role (an AMX instruction names its tiles in its encoding): C0..C3 the products (16 rows x 16
// columns of int32 or float32), A0, A1 16 rows of activations, B0, B1 a 16-column block of weights.
// q_q8.cpp: C0 = A0 B0 and C1 = A1 B1 (two 32-weight blocks in flight, int8: A 16 x 32 bytes, B 8 x 64);
// q_bf16.cpp: C0 = A0 B0, C1 = A1 B0, C2 = A0 B1, C3 = A1 B1 (two groups of 16 rows on two panels, per step of 32
// k: bf16, A and B 16 x 64 bytes; four products for four tile loads).
#pragma once
#include <ATen/ATen.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace scalellm::tiles {

enum Tile : int { C0 = 0, C1 = 1, A0 = 2, A1 = 3, B0 = 4, B1 = 5, C2 = 6, C3 = 7 };
constexpr int kRows = 16;       // activation rows per tile (A and C rows)
constexpr int kLineBytes = 64;  // a full tile row; B's and C's rows: 16 columns x 4 bytes

struct alignas(64) Config {  // palette 1, as LDTILECFG reads it: 64 bytes
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(Config) == 64);

// A and B shapes for the products C (16 x 64 bytes) = A (16 rows x a_bytes) B (a_bytes / 4 rows x 64 bytes).
inline Config config_for(int a_bytes) {
  Config config;
  for (int t : {C0, C1, C2, C3}) config.rows[t] = kRows, config.colsb[t] = kLineBytes;
  for (int t : {A0, A1}) config.rows[t] = kRows, config.colsb[t] = static_cast<uint16_t>(a_bytes);
  for (int t : {B0, B1}) config.rows[t] = static_cast<uint8_t>(a_bytes / 4), config.colsb[t] = kLineBytes;
  return config;
}

inline float bf16_value(uint16_t bits) {
  uint32_t u = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The software model: a thread's eight 1 KiB tiles and its configuration, as the hardware keeps them per thread.
struct Model {
  struct State {
    Config config;
    bool configured = false;
    alignas(64) uint8_t data[8][1024];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static constexpr const char* name = "model";

  static void configure(const Config& config) {  // LDTILECFG: the new shapes, every tile zeroed
    State& s = state();
    s.config = config;
    s.configured = true;
    std::memset(s.data, 0, sizeof(s.data));
  }
  static void release() { state().configured = false; }  // TILERELEASE

  template <int T>
  static void load(const void* base, int64_t stride) {  // TILELOADD: rows x colsb bytes, the rest of the tile zeroed
    State& s = state();
    TORCH_CHECK(s.configured, "tile model: TILELOADD before LDTILECFG");
    std::memset(s.data[T], 0, sizeof(s.data[T]));
    for (int r = 0; r < s.config.rows[T]; ++r)
      std::memcpy(s.data[T] + r * 64, static_cast<const uint8_t*>(base) + r * stride, s.config.colsb[T]);
  }

  template <int T>
  static void zero() {  // TILEZERO
    TORCH_CHECK(state().configured, "tile model: TILEZERO before LDTILECFG");
    std::memset(state().data[T], 0, sizeof(state().data[T]));
  }

  template <int T>
  static void store(void* base, int64_t stride) {  // TILESTORED: rows x colsb bytes
    State& s = state();
    TORCH_CHECK(s.configured, "tile model: TILESTORED before LDTILECFG");
    for (int r = 0; r < s.config.rows[T]; ++r)
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.data[T] + r * 64, s.config.colsb[T]);
  }

  template <int C, int A, int B>
  static void check_shapes(const char* instruction) {  // as the hardware requires (it faults otherwise)
    const State& s = state();
    const Config& c = s.config;
    TORCH_CHECK(s.configured && c.rows[C] == c.rows[A] && c.colsb[C] == c.colsb[B] && c.rows[B] * 4 == c.colsb[A] &&
                    c.colsb[A] % 4 == 0 && c.colsb[C] % 4 == 0,
                "tile model: ", instruction, " on tiles whose shapes do not agree");
  }

  // TDPBSUD: C[m][n] += sum over k < colsb(A) / 4, i < 4 of int8 A[m][4k + i] * uint8 B[k][4n + i], in int32.
  template <int C, int A, int B>
  static void dot() {
    check_shapes<C, A, B>("TDPBSUD");
    State& s = state();
    const Config& c = s.config;
    for (int m = 0; m < c.rows[C]; ++m) {
      auto* out = reinterpret_cast<int32_t*>(s.data[C] + m * 64);
      const auto* a = reinterpret_cast<const int8_t*>(s.data[A] + m * 64);
      for (int k = 0; k < c.colsb[A] / 4; ++k) {
        const uint8_t* b = s.data[B] + k * 64;
        for (int n = 0; n < c.colsb[C] / 4; ++n) {
          int32_t sum = 0;
          for (int i = 0; i < 4; ++i) sum += int32_t{a[4 * k + i]} * int32_t{b[4 * n + i]};
          out[n] = static_cast<int32_t>(static_cast<uint32_t>(out[n]) + static_cast<uint32_t>(sum));
        }
      }
    }
  }

  // TDPBF16PS: C[m][n] += A[m][2k] B[k][2n] + A[m][2k + 1] B[k][2n + 1] over k < colsb(A) / 4, bf16 operands,
  // float32 sums, k in order. (The hardware rounds within a pair its own way and flushes denormals: the model's
  // bits may differ from it in the last place, never its order over k.)
  template <int C, int A, int B>
  static void dot_bf16() {
    check_shapes<C, A, B>("TDPBF16PS");
    State& s = state();
    const Config& c = s.config;
    for (int m = 0; m < c.rows[C]; ++m) {
      auto* out = reinterpret_cast<float*>(s.data[C] + m * 64);
      const auto* a = reinterpret_cast<const uint16_t*>(s.data[A] + m * 64);
      for (int k = 0; k < c.colsb[A] / 4; ++k) {
        const auto* b = reinterpret_cast<const uint16_t*>(s.data[B] + k * 64);
        for (int n = 0; n < c.colsb[C] / 4; ++n) {
          out[n] += bf16_value(a[2 * k]) * bf16_value(b[2 * n]);
          out[n] += bf16_value(a[2 * k + 1]) * bf16_value(b[2 * n + 1]);
        }
      }
    }
  }
};

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)

// The hardware unit. Its intrinsics take tile numbers as literals, hence one branch per tile.
struct Amx {
  static constexpr const char* name = "amx";

  static void configure(const Config& config) { _tile_loadconfig(&config); }
  static void release() { _tile_release(); }

  template <int T>
  static void load(const void* base, int64_t stride) {
    static_assert(T == A0 || T == A1 || T == B0 || T == B1, "the kernels load A and B tiles");
    if constexpr (T == A0) _tile_loadd(2, base, stride);
    else if constexpr (T == A1) _tile_loadd(3, base, stride);
    else if constexpr (T == B0) _tile_loadd(4, base, stride);
    else _tile_loadd(5, base, stride);
  }

  template <int T>
  static void zero() {
    static_assert(T == C0 || T == C1 || T == C2 || T == C3, "the kernels zero C tiles");
    if constexpr (T == C0) _tile_zero(0);
    else if constexpr (T == C1) _tile_zero(1);
    else if constexpr (T == C2) _tile_zero(6);
    else _tile_zero(7);
  }

  template <int T>
  static void store(void* base, int64_t stride) {
    static_assert(T == C0 || T == C1 || T == C2 || T == C3, "the kernels store C tiles");
    if constexpr (T == C0) _tile_stored(0, base, stride);
    else if constexpr (T == C1) _tile_stored(1, base, stride);
    else if constexpr (T == C2) _tile_stored(6, base, stride);
    else _tile_stored(7, base, stride);
  }

  template <int C, int A, int B>
  static void dot() {
    static_assert((C == C0 && A == A0 && B == B0) || (C == C1 && A == A1 && B == B1), "C0 = A0 B0, C1 = A1 B1");
    if constexpr (C == C0) _tile_dpbsud(0, 2, 4);
    else _tile_dpbsud(1, 3, 5);
  }

  template <int C, int A, int B>
  static void dot_bf16() {
    static_assert((C == C0 && A == A0 && B == B0) || (C == C1 && A == A1 && B == B0) ||
                      (C == C2 && A == A0 && B == B1) || (C == C3 && A == A1 && B == B1),
                  "C0 = A0 B0, C1 = A1 B0, C2 = A0 B1, C3 = A1 B1");
    if constexpr (C == C0) _tile_dpbf16ps(0, 2, 4);
    else if constexpr (C == C1) _tile_dpbf16ps(1, 3, 4);
    else if constexpr (C == C2) _tile_dpbf16ps(6, 2, 5);
    else _tile_dpbf16ps(7, 3, 5);
  }
};

// Whether this process may run Amx: the CPU has AMX-BF16, AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 22, 24
// and 25; every AMX CPU so far has all three), and
// Linux grants the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, Linux 5.16 and later; asked
// once, it holds for every thread of the process).
inline bool amx_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 22)) || !(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return usable;
}

using Hardware = Amx;

#else

inline bool amx_usable() { return false; }  // a build without AMX's instructions
using Hardware = Model;  // never run there: amx_usable() is false

#endif

// Where a call's rows go: not on tiles, on the hardware unit, or on its model (tests).
enum class Use { none, hardware, model };

inline Use hardware_or_model() { return amx_usable() ? Use::hardware : Use::model; }

// Deterministic test data for the kernels' first-use checks (the global random generator is left alone):
// values in [-1, 1) of the given shape and dtype, and codes 0..max of uint8.
inline at::Tensor check_values(at::IntArrayRef shape, at::ScalarType dtype, int64_t salt) {
  int64_t count = 1;
  for (int64_t size : shape) count *= size;
  return ((at::arange(count, at::kLong) * (2 * salt + 7919) % 2003).to(at::kFloat) / 1001.5 - 1.0)
      .view(shape).to(dtype);
}
inline at::Tensor check_codes(at::IntArrayRef shape, int64_t max) {
  int64_t count = 1;
  for (int64_t size : shape) count *= size;
  return (at::arange(count, at::kLong) * 7877 % (max + 1)).view(shape).to(at::kByte);
}

}  // namespace scalellm::tiles
