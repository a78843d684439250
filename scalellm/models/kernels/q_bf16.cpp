// Bfloat16 activations times panel weights (panels.h) on AVX-512 BF16 dot products: the prompt rows of a
// quantised engine on a CPU with native bf16 (AVX-512 BF16, AMX), and dense bfloat16 weights (bits 16). Coded
// weights are widened to float32 (q * d + m, as q_f32.cpp does) and rounded once to bfloat16, nearest even: the
// values a dense bfloat16 copy of the float32 reference holds, without keeping that copy.
//
// Per 16-column panel, per pair of k: one VDPBF16PS per row, x[r, k] * w[k] + x[r, k+1] * w[k+1] added to the
// row's 16 float32 accumulators, k-pairs in order; the sums are rounded to bfloat16 once at the end. That order
// is fixed whatever the number of rows (oneDNN's matmul takes AMX tiles for some row counts and AVX-512 for others
// on the same CPU, and their sums round differently).
//
// Where the build and the CPU have AMX, every row takes its bf16 tiles instead (TDPBF16PS, tiles.h), one row
// included: a row's sums then keep the tile unit's one order (k in steps of 32, a step's pairs as the unit adds
// them) whatever the batch. A panel as widen_panel leaves it, or a dense bfloat16 panel, is the B operand as it
// lies: per 32 k, 16 rows of k-pairs x 16 columns x 2 bfloat16.
#include "panels.h"
#include "tiles.h"

#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__)

#define SCALELLM_BF16 __attribute__((target("avx512bf16")))

namespace {

using namespace scalellm;

constexpr int kRows = 12;  // rows per register tile: 12 accumulators
constexpr int kDirectRows = 4;  // up to this many rows widen the weights in registers, without a panel

// The 16 columns' weights at k = 2t and 2t + 1 as bfloat16 pairs: lane c = bf16(w[2t + 1][c]) << 16 | bf16(w[2t][c]).
template <int Bits>
inline __m512i pair16(const uint8_t* wp, int64_t t, vf d, vf m) {
  const __m512i lo = round_bits(weights16<Bits>(wp, 2 * t, d, m)), hi = round_bits(weights16<Bits>(wp, 2 * t + 1, d, m));
  return _mm512_or_si512(_mm512_srli_epi32(lo, 16), _mm512_and_si512(hi, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <int Bits>
inline void widen_panel(const uint8_t* wp, const float* dp, const float* mp, int64_t k, __m512i* panel) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const vf d = load16(dp + b * 16), m = load16(mp + b * 16);
    for (int64_t t = b * 16; t < b * 16 + 16; ++t) _mm512_storeu_si512(panel + t, pair16<Bits>(wp, t, d, m));
  }
}

SCALELLM_BF16 inline __m512 dot(__m512 acc, const uint16_t* x, __m512i w) {  // acc += x[0] w.lo + x[1] w.hi
  const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x));
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)w);
}

template <int R>
SCALELLM_BF16 void tile(const uint16_t* x, const __m512i* panel, int64_t k, at::BFloat16* y, int64_t n, int64_t cols) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < k / 2; ++t) {
    const __m512i w = _mm512_loadu_si512(panel + t);
    for (int i = 0; i < R; ++i) acc[i] = dot(acc[i], x + i * k + 2 * t, w);
  }
  for (int i = 0; i < R; ++i) store16(y + i * n, acc[i], cols);
}

template <int Bits, int R>  // a few rows of a coded panel: the same operations as widen_panel + tile, so the same bits
SCALELLM_BF16 void direct(const uint16_t* x, const uint8_t* wp, const float* dp, const float* mp, int64_t k,
                          at::BFloat16* y, int64_t n, int64_t cols) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < k / 32; ++b) {
    const vf d = load16(dp + b * 16), m = load16(mp + b * 16);
    for (int64_t t = b * 16; t < b * 16 + 16; ++t) {
      const __m512i w = pair16<Bits>(wp, t, d, m);
      for (int i = 0; i < R; ++i) acc[i] = dot(acc[i], x + i * k + 2 * t, w);
    }
  }
  for (int i = 0; i < R; ++i) store16(y + i * n, acc[i], cols);
}

// Rows [0, m) of one panel, in tiles of kRows and a tail tile.
inline void all_rows(const uint16_t* x, const __m512i* panel, int64_t m, int64_t k, at::BFloat16* y, int64_t n,
                     int64_t cols) {
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows) tile<kRows>(x + r * k, panel, k, y + r * n, n, cols);
  const uint16_t* xr = x + r * k;
  at::BFloat16* yr = y + r * n;
  switch (m - r) {
    case 11: tile<11>(xr, panel, k, yr, n, cols); break;
    case 10: tile<10>(xr, panel, k, yr, n, cols); break;
    case 9: tile<9>(xr, panel, k, yr, n, cols); break;
    case 8: tile<8>(xr, panel, k, yr, n, cols); break;
    case 7: tile<7>(xr, panel, k, yr, n, cols); break;
    case 6: tile<6>(xr, panel, k, yr, n, cols); break;
    case 5: tile<5>(xr, panel, k, yr, n, cols); break;
    case 4: tile<4>(xr, panel, k, yr, n, cols); break;
    case 3: tile<3>(xr, panel, k, yr, n, cols); break;
    case 2: tile<2>(xr, panel, k, yr, n, cols); break;
    case 1: tile<1>(xr, panel, k, yr, n, cols); break;
    default: break;
  }
}

template <int Bits>
void direct_rows(const uint16_t* x, const uint8_t* wp, const float* dp, const float* mp, int64_t m, int64_t k,
                 at::BFloat16* y, int64_t n, int64_t cols) {
  switch (m) {
    case 4: direct<Bits, 4>(x, wp, dp, mp, k, y, n, cols); break;
    case 3: direct<Bits, 3>(x, wp, dp, mp, k, y, n, cols); break;
    case 2: direct<Bits, 2>(x, wp, dp, mp, k, y, n, cols); break;
    default: direct<Bits, 1>(x, wp, dp, mp, k, y, n, cols); break;
  }
}

// Rows [0, m) of one or two panels (``second`` null: one) on the tile unit, two groups of 16 rows at a time on both
// panels' weights: per step of 32 k, two A and two B tiles loaded for four products. The last group, when short,
// comes from ``tail`` (its rows padded with zero rows to 16). Each output's sum runs over k in the same steps
// whatever the pairing: the bits do not depend on it.
template <class Unit>
void tile_rows(const uint16_t* x, const uint16_t* tail, const uint8_t* first, const uint8_t* second, int64_t m,
               int64_t k, at::BFloat16* y, int64_t n, int64_t cols, int64_t second_cols) {
  using tiles::A0, tiles::A1, tiles::B0, tiles::B1, tiles::C0, tiles::C1, tiles::C2, tiles::C3, tiles::kLineBytes;
  constexpr int64_t kTileRows = tiles::kRows;  // (kRows above is the dot-product kernel's)
  const int64_t groups = (m + kTileRows - 1) / kTileRows, full = m / kTileRows;
  const bool both = second != nullptr;
  alignas(64) float sums[4][kTileRows * 16];  // C0..C3: [row group + 2 * panel]
  auto rows_of = [&](int64_t g) { return g < full ? x + g * kTileRows * k : tail; };
  for (int64_t g = 0; g < groups; g += 2) {
    const bool two = g + 1 < groups;
    const uint16_t *a0 = rows_of(g), *a1 = two ? rows_of(g + 1) : nullptr;
    Unit::template zero<C0>();
    if (two) Unit::template zero<C1>();
    if (both) Unit::template zero<C2>();
    if (both && two) Unit::template zero<C3>();
    for (int64_t s = 0; s < k / 32; ++s) {
      Unit::template load<B0>(first + s * 1024, kLineBytes);
      Unit::template load<A0>(a0 + s * 32, k * 2);
      Unit::template dot_bf16<C0, A0, B0>();
      if (both) {
        Unit::template load<B1>(second + s * 1024, kLineBytes);
        Unit::template dot_bf16<C2, A0, B1>();
      }
      if (two) {
        Unit::template load<A1>(a1 + s * 32, k * 2);
        Unit::template dot_bf16<C1, A1, B0>();
        if (both) Unit::template dot_bf16<C3, A1, B1>();
      }
    }
    Unit::template store<C0>(sums[0], kLineBytes);
    if (two) Unit::template store<C1>(sums[1], kLineBytes);
    if (both) Unit::template store<C2>(sums[2], kLineBytes);
    if (both && two) Unit::template store<C3>(sums[3], kLineBytes);
    for (int p = 0; p < (both ? 2 : 1); ++p) {
      for (int h = 0; h < (two ? 2 : 1); ++h) {
        const int64_t r0 = (g + h) * kTileRows, rows = std::min<int64_t>(kTileRows, m - r0);
        for (int64_t i = 0; i < rows; ++i)
          store16(y + (r0 + i) * n + 16 * p, load16(sums[h + 2 * p] + i * 16), p == 0 ? cols : second_cols);
      }
    }
  }
}

template <int Bits, class Unit>
void q_bf16_mm(const uint16_t* x, const uint8_t* wp, const float* dp, const float* mp, int64_t m, int64_t k,
               int64_t n, at::BFloat16* out, bool on_tiles) {
  const int64_t panels = (n + 15) / 16, blocks = k / 32;
  constexpr bool kCoded = Bits <= 8;
  std::vector<uint16_t> tail;
  if (on_tiles && m % tiles::kRows) {
    tail.assign(tiles::kRows * k, 0);
    std::memcpy(tail.data(), x + m / tiles::kRows * tiles::kRows * k, (m % tiles::kRows) * k * sizeof(uint16_t));
  }
  // On tiles a unit of work is two panels (tile_rows); on dot products one.
  const int64_t per_unit = on_tiles ? 2 : 1, units = (panels + per_unit - 1) / per_unit;
  team::Grabs grabs(units, panel_grain(m, per_unit * k, units));
  team::run([&] {
    const int64_t widened = kCoded && (on_tiles || m > kDirectRows) ? k / 2 : 1;
    std::unique_ptr<__m512i[]> buffer(new __m512i[per_unit * widened]);
    if (on_tiles) Unit::configure(tiles::config_for(64));  // A: 32 k of bf16
    for (int64_t begin, end; grabs.next(begin, end);)
    for (int64_t u = begin; u < end; ++u) {
      const int64_t g = u * per_unit, c0 = g * 16, cols = std::min<int64_t>(16, n - c0);
      const bool pair = on_tiles && g + 1 < panels;
      const uint8_t* wg = wp + g * k * 2 * Bits;
      const __m512i* panel = reinterpret_cast<const __m512i*>(wg);
      const __m512i* second = pair ? reinterpret_cast<const __m512i*>(wg + k * 2 * Bits) : nullptr;
      if constexpr (kCoded) {
        const float *dg = dp + g * blocks * 16, *mg = mp + g * blocks * 16;
        if (!on_tiles && m <= kDirectRows) {
          direct_rows<Bits>(x, wg, dg, mg, m, k, out + c0, n, cols);
          continue;
        }
        widen_panel<Bits>(wg, dg, mg, k, buffer.get());
        panel = buffer.get();
        if (pair) {
          widen_panel<Bits>(wg + k * 2 * Bits, dg + blocks * 16, mg + blocks * 16, k, buffer.get() + widened);
          second = buffer.get() + widened;
        }
      }
      if (on_tiles) {
        tile_rows<Unit>(x, tail.data(), reinterpret_cast<const uint8_t*>(panel),
                        reinterpret_cast<const uint8_t*>(second), m, k, out + c0, n, cols,
                        pair ? std::min<int64_t>(16, n - c0 - 16) : 0);
      } else {
        all_rows(x, panel, m, k, out + c0, n, cols);
      }
    }
    if (on_tiles) Unit::release();
  });
}

at::Tensor run_q_bf16_mm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m,
                         int64_t n, int64_t bits, tiles::Use unit) {
  const int64_t rows = x.size(0), k = x.size(1);
  auto out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  const float* dp = bits == 16 ? nullptr : d.data_ptr<float>();
  const float* mp = bits == 16 ? nullptr : m.data_ptr<float>();
  auto run = [&](auto kernel) {
    kernel(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), wp.data_ptr<uint8_t>(), dp, mp, rows, k,
           n, out.data_ptr<at::BFloat16>(), unit != tiles::Use::none);
  };
  if (unit == tiles::Use::model) {
    if (bits == 4) run(q_bf16_mm<4, tiles::Model>);
    else if (bits == 8) run(q_bf16_mm<8, tiles::Model>);
    else run(q_bf16_mm<16, tiles::Model>);
  } else {
    if (bits == 4) run(q_bf16_mm<4, tiles::Hardware>);
    else if (bits == 8) run(q_bf16_mm<8, tiles::Hardware>);
    else run(q_bf16_mm<16, tiles::Hardware>);
  }
  return out;
}

// Whether ``unit`` gives 33 rows of coded and dense panels what the tile unit's model gives, to bfloat16's
// rounding (the hardware may round a last bit otherwise than the model, never sum in another order).
bool bf16_tiles_agree(tiles::Use unit) {
  const int64_t n = 40, k = 96, panels = (n + 15) / 16;
  const at::Tensor x = tiles::check_values({33, k}, at::kBFloat16, 4);
  const at::Tensor d = tiles::check_values({panels, k / 32, 16}, at::kFloat, 5) * 0.01;
  const at::Tensor m = tiles::check_values({panels, k / 32, 16}, at::kFloat, 6) * 0.01;
  bool close = true;
  for (int64_t bits : {4, 8, 16}) {
    const at::Tensor wp = bits == 16 ? tiles::check_values({panels, k, 16}, at::kBFloat16, 7).view(at::kByte)
                                     : tiles::check_codes({panels, k, 2 * bits}, 255);
    const at::Tensor got = run_q_bf16_mm(x, wp, d, m, n, bits, unit).to(at::kFloat);
    const at::Tensor want = run_q_bf16_mm(x, wp, d, m, n, bits, tiles::Use::model).to(at::kFloat);
    close = close && at::allclose(got, want, 1.0 / 128, 1e-3 * want.abs().max().item<float>());
  }
  return close;
}

// The hardware tiles serve q_bf16_mm once they agree on that first-use check; otherwise a warning, and the dot
// products.
tiles::Use bf16_tiles() {
  static const tiles::Use use = [] {
    if (!tiles::amx_usable()) return tiles::Use::none;
    if (bf16_tiles_agree(tiles::Use::hardware)) return tiles::Use::hardware;
    TORCH_WARN("q_bf16_mm: AMX's bf16 tiles gave other sums than their model on a check; not used");
    return tiles::Use::none;
  }();
  return use;
}

}  // namespace

#endif

// x [M, K] bfloat16; wp uint8 [P, K, 2 * bits] (P = ceil(N / 16) panels, panels.h); for bits 4 and 8, d and m
// float32 [P, K/32, 16] (for bits 16 they are not read). Returns [M, N] bfloat16. Needs AVX-512 BF16 (the caller
// checks the CPU: kernels.has_bf16_dot()); takes AMX's bf16 tiles for every row where the build and CPU have them.
at::Tensor q_bf16_mm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m,
                     int64_t n, int64_t bits) {
  scalellm::check_panel_args("q_bf16_mm", x, at::kBFloat16, wp, d, m, n, bits, 16);
#if defined(__AVX512F__)
  return run_q_bf16_mm(x, wp, d, m, n, bits, bf16_tiles());
#else
  TORCH_CHECK(false, "q_bf16_mm needs the AVX-512 build of our kernels and a CPU with avx512_bf16");
#endif
}

// The same, every row on a tile unit: AMX where q_bf16_mm would take it, its software model elsewhere (tiles.h;
// the model needs no bf16 instructions). For the tests.
at::Tensor q_bf16_mm_tiles(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m,
                           int64_t n, int64_t bits) {
  scalellm::check_panel_args("q_bf16_mm_tiles", x, at::kBFloat16, wp, d, m, n, bits, 16);
#if defined(__AVX512F__)
  return run_q_bf16_mm(x, wp, d, m, n, bits, scalellm::tiles::hardware_or_model());
#else
  TORCH_CHECK(false, "q_bf16_mm_tiles: the tile kernels are in the AVX-512 builds only");
#endif
}

bool bf16_tile_check() {  // the first-use check of the tile unit q_bf16_mm_tiles runs on
#if defined(__AVX512F__)
  return bf16_tiles_agree(scalellm::tiles::hardware_or_model());
#else
  return false;
#endif
}
