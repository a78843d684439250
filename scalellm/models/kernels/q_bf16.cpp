// Bfloat16 activations times panel weights (panels.h) on AVX-512 BF16 dot products: the prompt rows of a
// quantised engine on a CPU with native bf16 (AVX-512 BF16, AMX), and dense bfloat16 weights (bits 16). Coded
// weights are widened to float32 (q * d + m, as q_f32.cpp does) and rounded once to bfloat16, nearest even: the
// values a dense bfloat16 copy of the float32 reference holds, without keeping that copy.
//
// Per 16-column panel, per pair of k: one VDPBF16PS per row, x[r, k] * w[k] + x[r, k+1] * w[k+1] added to the
// row's 16 float32 accumulators, k-pairs in order; the sums are rounded to bfloat16 once at the end. That order
// is fixed whatever the number of rows (oneDNN's matmul takes AMX tiles for some row counts and AVX-512 for others
// on the same CPU, and their sums round differently).
#include "panels.h"

#include <memory>

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

template <int Bits>
void q_bf16_mm(const uint16_t* x, const uint8_t* wp, const float* dp, const float* mp, int64_t m, int64_t k,
               int64_t n, at::BFloat16* out) {
  const int64_t panels = (n + 15) / 16, blocks = k / 32;
  const int64_t grain = panel_grain(m, k, panels);
  constexpr bool kCoded = Bits <= 8;
#pragma omp parallel
  {
    std::unique_ptr<__m512i[]> buffer(new __m512i[kCoded && m > kDirectRows ? k / 2 : 1]);
#pragma omp for schedule(dynamic, grain)
    for (int64_t g = 0; g < panels; ++g) {
      const uint8_t* wg = wp + g * k * 2 * Bits;
      const int64_t c0 = g * 16, cols = std::min<int64_t>(16, n - c0);
      if constexpr (kCoded) {
        const float *dg = dp + g * blocks * 16, *mg = mp + g * blocks * 16;
        if (m <= kDirectRows) {
          direct_rows<Bits>(x, wg, dg, mg, m, k, out + c0, n, cols);
          continue;
        }
        widen_panel<Bits>(wg, dg, mg, k, buffer.get());
        all_rows(x, buffer.get(), m, k, out + c0, n, cols);
      } else {
        all_rows(x, reinterpret_cast<const __m512i*>(wg), m, k, out + c0, n, cols);
      }
    }
  }
}

}  // namespace

#endif

// x [M, K] bfloat16; wp uint8 [P, K, 2 * bits] (P = ceil(N / 16) panels, panels.h); for bits 4 and 8, d and m
// float32 [P, K/32, 16] (for bits 16 they are not read). Returns [M, N] bfloat16. Needs AVX-512 BF16 (the caller
// checks the CPU: kernels.has_bf16_dot()).
at::Tensor q_bf16_mm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m,
                     int64_t n, int64_t bits) {
  scalellm::check_panel_args("q_bf16_mm", x, at::kBFloat16, wp, d, m, n, bits, 16);
  const int64_t rows = x.size(0), k = x.size(1);
#if defined(__AVX512F__)
  auto out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  const float* dp = bits == 16 ? nullptr : d.data_ptr<float>();
  const float* mp = bits == 16 ? nullptr : m.data_ptr<float>();
  auto run = [&](auto kernel) {
    kernel(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), wp.data_ptr<uint8_t>(), dp, mp, rows, k,
           n, out.data_ptr<at::BFloat16>());
  };
  if (bits == 4) run(q_bf16_mm<4>);
  else if (bits == 8) run(q_bf16_mm<8>);
  else run(q_bf16_mm<16>);
  return out;
#else
  TORCH_CHECK(false, "q_bf16_mm needs the AVX-512 build of our kernels and a CPU with avx512_bf16");
#endif
}
