// The int8 tile unit q_q8.cpp's tile kernel runs on: Intel AMX (LDTILECFG, TILELOADD, TILEZERO, TDPBSUD,
// TILESTORED) where the build has it (the "amx" set of kernels/__init__.py) and the CPU and Linux let this process
// use it, and otherwise a software model of the same five instructions, written from Intel's pseudocode for them.
// The model lets every AVX-512 machine run the tile kernel's layout, configuration and float steps against the
// VNNI kernel; on an AMX machine the hardware unit runs the same kernel and the same tests.
//
// The kernel's six tiles, fixed (an AMX instruction names its tiles in its encoding): per 32-weight block, A holds
// 16 rows' activation bytes (16 rows x 32 bytes), B the block's 8 groups of a 16-column chunk (8 rows x 64 bytes:
// q_q8.cpp's weight layout as it lies in memory), and C the 16 x 16 exact int32 block sums. Two of each, so that
// two blocks are in flight.
#pragma once
#include <ATen/ATen.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace scalellm::tiles {

enum Tile : int { C0 = 0, C1 = 1, A0 = 2, A1 = 3, B0 = 4, B1 = 5 };
constexpr int kRows = 16;       // activation rows per tile (A and C rows)
constexpr int kBlockBytes = 32;  // A's bytes per row: one block of int8 activations
constexpr int kGroupRows = 8;    // B's rows: a block's 8 groups of 4 weights
constexpr int kLineBytes = 64;   // B's and C's bytes per row: 16 columns x 4 bytes (codes, or int32 sums)

struct alignas(64) Config {  // palette 1, as LDTILECFG reads it: 64 bytes
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(Config) == 64);

inline Config kernel_config() {
  Config config;
  for (int t : {C0, C1}) config.rows[t] = kRows, config.colsb[t] = kLineBytes;
  for (int t : {A0, A1}) config.rows[t] = kRows, config.colsb[t] = kBlockBytes;
  for (int t : {B0, B1}) config.rows[t] = kGroupRows, config.colsb[t] = kLineBytes;
  return config;
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

  // TDPBSUD: C[m][n] += sum over k < colsb(A) / 4, i < 4 of int8 A[m][4k + i] * uint8 B[k][4n + i], in int32.
  // The shapes must agree as the hardware requires (it faults otherwise).
  template <int C, int A, int B>
  static void dot() {
    State& s = state();
    const Config& c = s.config;
    TORCH_CHECK(s.configured && c.rows[C] == c.rows[A] && c.colsb[C] == c.colsb[B] && c.rows[B] * 4 == c.colsb[A] &&
                    c.colsb[A] % 4 == 0 && c.colsb[C] % 4 == 0,
                "tile model: TDPBSUD on tiles whose shapes do not agree");
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
};

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)

// The hardware unit. Its intrinsics take tile numbers as literals, hence one branch per tile.
struct Amx {
  static constexpr const char* name = "amx";

  static void configure(const Config& config) { _tile_loadconfig(&config); }
  static void release() { _tile_release(); }

  template <int T>
  static void load(const void* base, int64_t stride) {
    static_assert(T == A0 || T == A1 || T == B0 || T == B1, "the kernel loads A and B tiles");
    if constexpr (T == A0) _tile_loadd(2, base, stride);
    else if constexpr (T == A1) _tile_loadd(3, base, stride);
    else if constexpr (T == B0) _tile_loadd(4, base, stride);
    else _tile_loadd(5, base, stride);
  }

  template <int T>
  static void zero() {
    static_assert(T == C0 || T == C1, "the kernel zeroes C tiles");
    if constexpr (T == C0) _tile_zero(0);
    else _tile_zero(1);
  }

  template <int T>
  static void store(void* base, int64_t stride) {
    static_assert(T == C0 || T == C1, "the kernel stores C tiles");
    if constexpr (T == C0) _tile_stored(0, base, stride);
    else _tile_stored(1, base, stride);
  }

  template <int C, int A, int B>
  static void dot() {
    static_assert((C == C0 && A == A0 && B == B0) || (C == C1 && A == A1 && B == B1), "C0 = A0 B0, C1 = A1 B1");
    if constexpr (C == C0) _tile_dpbsud(0, 2, 4);
    else _tile_dpbsud(1, 3, 5);
  }
};

// Whether this process may run Amx: the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24 and 25), and
// Linux grants the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, Linux 5.16 and later; asked
// once, it holds for every thread of the process).
inline bool amx_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return usable;
}

#else

inline bool amx_usable() { return false; }  // a build without AMX's instructions

#endif

}  // namespace scalellm::tiles
