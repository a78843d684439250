// int4 / int8 weights x float32 activations in float32 arithmetic: the prompt rows of a quantised engine on a CPU
// without native bf16 (AVX2). The weights are the very values the engine's float32 reference holds (q * d + m,
// exact in float32), so a row's result is the reference's up to float32 summation order, without the int8
// activation noise that q_q8.cpp adds and without a dense float32 copy of the weights.
//
// Weights (kernels.pack_f32): 16-column panels, k-major: per panel, per k, the 16 columns' codes (8 bytes of
// nibble pairs for 4 bits, 16 bytes for 8 bits); d and m float32 per panel, per 32-block, per column. Each thread
// widens one panel to float32 (K x 16) at a time, then every row passes over it: y[r, 16 columns] accumulates
// x[r, k] * w[k, 16 columns] for k = 0, 1, ... in one fused multiply-add per lane. That order is fixed whatever
// the number of rows, the row's place among them or the thread count: a row's result never depends on its batch
// (MKL's sgemm computes a row differently at 1-11 rows than at 12 and more).
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <memory>

#include <omp.h>

namespace {

using namespace scalellm;

constexpr int kRows = 6;  // rows per register tile: 6 accumulators of 16 floats (12 ymm on AVX2)

inline vf widen_u8(__m128i codes) {  // 16 unsigned bytes to 16 floats
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
#else
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)),
          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)))};
#endif
}

template <int Bits>
inline __m128i codes16(const uint8_t* w) {  // the 16 columns' codes at one k, in column order
  if constexpr (Bits == 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)), nibble = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi8(_mm_and_si128(b, nibble), _mm_and_si128(_mm_srli_epi16(b, 4), nibble));
}

// One panel (16 columns, all of K) to float32: w = q * d + m, one rounding (q * d is exact).
template <int Bits>
inline void widen_panel(const uint8_t* wp, const float* dp, const float* mp, int64_t k, float* panel) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const vf d = load16(dp + b * 16), m = load16(mp + b * 16);
    for (int64_t t = b * 32; t < b * 32 + 32; ++t) store16(panel + t * 16, vfma(widen_u8(codes16<Bits>(wp + t * 2 * Bits)), d, m));
  }
}

template <int R>
inline void tile(const float* x, const float* panel, int64_t k, float* y, int64_t n, int64_t cols) {
  vf acc[R];
  for (int i = 0; i < R; ++i) acc[i] = vzero();
  for (int64_t t = 0; t < k; ++t) {
    const vf w = load16(panel + t * 16);
    for (int i = 0; i < R; ++i) acc[i] = vfma(vset(x[i * k + t]), w, acc[i]);
  }
  for (int i = 0; i < R; ++i) store16(y + i * n, acc[i], cols);
}

// A few rows (at most kRows): widen each k's 16 weights in registers and use them at once, no panel (one token
// is memory-bound: the codes' bytes are what it reads). The same operations as the panel path, so the same bits.
template <int Bits, int R>
inline void direct(const float* x, const uint8_t* wp, const float* dp, const float* mp, int64_t k, float* y,
                   int64_t n, int64_t cols) {
  vf acc[R];
  for (int i = 0; i < R; ++i) acc[i] = vzero();
  for (int64_t b = 0; b < k / 32; ++b) {
    const vf d = load16(dp + b * 16), m = load16(mp + b * 16);
    for (int64_t t = b * 32; t < b * 32 + 32; ++t) {
      const vf w = vfma(widen_u8(codes16<Bits>(wp + t * 2 * Bits)), d, m);
      for (int i = 0; i < R; ++i) acc[i] = vfma(vset(x[i * k + t]), w, acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) store16(y + i * n, acc[i], cols);
}

template <int Bits>
void q_f32_mm(const float* x, const uint8_t* wp, const float* dp, const float* mp, int64_t m, int64_t k,
              int64_t n, float* out) {
  const int64_t panels = (n + 15) / 16, blocks = k / 32;
  // Panels in dynamic grabs, as in q_q8.cpp: a worker that Triton's threads preempt does not hold the others
  // up at the barrier (about a million multiply-adds a grab, at least four grabs a thread).
  const int64_t threads = omp_get_max_threads();
  const int64_t grain = std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(1, m * k), 1,
                                            std::max<int64_t>(1, panels / (4 * threads)));
#pragma omp parallel
  {
    std::unique_ptr<float[]> panel(new float[m > kRows ? k * 16 : 1]);
#pragma omp for schedule(dynamic, grain)
    for (int64_t g = 0; g < panels; ++g) {
      const uint8_t* wg = wp + g * k * 2 * Bits;
      const float *dg = dp + g * blocks * 16, *mg = mp + g * blocks * 16;
      if (m <= kRows) {
        const int64_t c0 = g * 16, cols = std::min<int64_t>(16, n - c0);
        switch (m) {
          case 6: direct<Bits, 6>(x, wg, dg, mg, k, out + c0, n, cols); break;
          case 5: direct<Bits, 5>(x, wg, dg, mg, k, out + c0, n, cols); break;
          case 4: direct<Bits, 4>(x, wg, dg, mg, k, out + c0, n, cols); break;
          case 3: direct<Bits, 3>(x, wg, dg, mg, k, out + c0, n, cols); break;
          case 2: direct<Bits, 2>(x, wg, dg, mg, k, out + c0, n, cols); break;
          default: direct<Bits, 1>(x, wg, dg, mg, k, out + c0, n, cols); break;
        }
        continue;
      }
      widen_panel<Bits>(wp + g * k * 2 * Bits, dp + g * blocks * 16, mp + g * blocks * 16, k, panel.get());
      const int64_t c0 = g * 16, cols = std::min<int64_t>(16, n - c0);
      int64_t r = 0;
      for (; r + kRows <= m; r += kRows) tile<kRows>(x + r * k, panel.get(), k, out + r * n + c0, n, cols);
      switch (m - r) {
        case 5: tile<5>(x + r * k, panel.get(), k, out + r * n + c0, n, cols); break;
        case 4: tile<4>(x + r * k, panel.get(), k, out + r * n + c0, n, cols); break;
        case 3: tile<3>(x + r * k, panel.get(), k, out + r * n + c0, n, cols); break;
        case 2: tile<2>(x + r * k, panel.get(), k, out + r * n + c0, n, cols); break;
        case 1: tile<1>(x + r * k, panel.get(), k, out + r * n + c0, n, cols); break;
        default: break;
      }
    }
  }
}

}  // namespace

// x [M, K] float32; wp uint8 [P, K, 2 * bits] (P = ceil(N / 16) panels: per k, 16 columns' codes, 4 bits as
// nibble pairs, low nibble first); d and m float32 [P, K/32, 16]: the weight is q * d + m. Returns [M, N].
at::Tensor q_f32_mm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m,
                    int64_t n, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "q_f32_mm: x must be a contiguous float32 [M, K] matrix");
  const int64_t rows = x.size(0), k = x.size(1), panels = (n + 15) / 16;
  TORCH_CHECK(bits == 4 || bits == 8, "q_f32_mm: bits must be 4 or 8");
  TORCH_CHECK(k % 32 == 0 && wp.dim() == 3 && wp.size(0) == panels && wp.size(1) == k && wp.size(2) == 2 * bits,
              "q_f32_mm: K must be a multiple of 32 and wp [ceil(N/16), K, 2 * bits]");
  TORCH_CHECK(wp.scalar_type() == at::kByte && d.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat &&
              wp.is_contiguous() && d.is_contiguous() && m.is_contiguous() && d.numel() == panels * k / 2 &&
              m.numel() == d.numel(), "q_f32_mm: wp uint8, d and m float32 [ceil(N/16), K/32, 16]");
  auto out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  if (bits == 4) q_f32_mm<4>(x.data_ptr<float>(), wp.data_ptr<uint8_t>(), d.data_ptr<float>(), m.data_ptr<float>(), rows, k, n, out.data_ptr<float>());
  else q_f32_mm<8>(x.data_ptr<float>(), wp.data_ptr<uint8_t>(), d.data_ptr<float>(), m.data_ptr<float>(), rows, k, n, out.data_ptr<float>());
  return out;
}
