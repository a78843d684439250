// Float32 activations times panel weights (panels.h) in float32 arithmetic: the prompt rows of a quantised engine
// on a CPU without native bf16 (AVX2), the lm_head there, and dense float32 weights (bits 32). Coded weights are
// the very values the engine's float32 reference holds (q * d + m, exact in float32), so a row's result is the
// reference's up to float32 summation order, without the int8 activation noise of q_q8.cpp and without a dense
// float32 copy.
//
// Each thread widens one panel to float32 (K x 16) at a time, then every row passes over it: y[r, 16 columns]
// accumulates x[r, k] * w[k, 16 columns] for k = 0, 1, ... in one fused multiply-add per lane.
#include "panels.h"

#include <memory>

namespace {

using namespace scalellm;

constexpr int kRows = 6;  // rows per register tile: 6 accumulators of 16 floats (12 ymm on AVX2)

// One coded panel (16 columns, all of K) to float32.
template <int Bits>
inline void widen_panel(const uint8_t* wp, const float* dp, const float* mp, int64_t k, float* panel) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const vf d = load16(dp + b * 16), m = load16(mp + b * 16);
    for (int64_t t = b * 32; t < b * 32 + 32; ++t) store16(panel + t * 16, weights16<Bits>(wp, t, d, m));
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

// A few rows (at most kRows) of a coded panel: widen each k's 16 weights in registers and use them at once, no
// panel (one token is memory-bound: the codes' bytes are what it reads). The same operations as the panel path,
// so the same bits.
template <int Bits, int R>
inline void direct(const float* x, const uint8_t* wp, const float* dp, const float* mp, int64_t k, float* y,
                   int64_t n, int64_t cols) {
  vf acc[R];
  for (int i = 0; i < R; ++i) acc[i] = vzero();
  for (int64_t b = 0; b < k / 32; ++b) {
    const vf d = load16(dp + b * 16), m = load16(mp + b * 16);
    for (int64_t t = b * 32; t < b * 32 + 32; ++t) {
      const vf w = weights16<Bits>(wp, t, d, m);
      for (int i = 0; i < R; ++i) acc[i] = vfma(vset(x[i * k + t]), w, acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) store16(y + i * n, acc[i], cols);
}

template <int Bits, int R>
inline void direct_any(const float* x, const uint8_t* wp, const float* dp, const float* mp, int64_t k, float* y,
                       int64_t n, int64_t cols) {
  if constexpr (Bits == 32) tile<R>(x, reinterpret_cast<const float*>(wp), k, y, n, cols);
  else direct<Bits, R>(x, wp, dp, mp, k, y, n, cols);
}

template <int Bits>
void q_f32_mm(const float* x, const uint8_t* wp, const float* dp, const float* mp, int64_t m, int64_t k,
              int64_t n, float* out) {
  const int64_t panels = (n + 15) / 16, blocks = k / 32;
  const int64_t grain = panel_grain(m, k, panels);
  constexpr bool kCoded = Bits <= 8;
  team::Grabs grabs(panels, grain);
  team::run([&] {
    std::unique_ptr<float[]> buffer(new float[kCoded && m > kRows ? k * 16 : 1]);
    for (int64_t begin, end; grabs.next(begin, end);)
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* wg = wp + g * k * 2 * Bits;
      const float *dg = dp + g * blocks * 16, *mg = mp + g * blocks * 16;
      const int64_t c0 = g * 16, cols = std::min<int64_t>(16, n - c0);
      if (m <= kRows) {
        switch (m) {
          case 6: direct_any<Bits, 6>(x, wg, dg, mg, k, out + c0, n, cols); break;
          case 5: direct_any<Bits, 5>(x, wg, dg, mg, k, out + c0, n, cols); break;
          case 4: direct_any<Bits, 4>(x, wg, dg, mg, k, out + c0, n, cols); break;
          case 3: direct_any<Bits, 3>(x, wg, dg, mg, k, out + c0, n, cols); break;
          case 2: direct_any<Bits, 2>(x, wg, dg, mg, k, out + c0, n, cols); break;
          default: direct_any<Bits, 1>(x, wg, dg, mg, k, out + c0, n, cols); break;
        }
        continue;
      }
      const float* panel = reinterpret_cast<const float*>(wg);
      if constexpr (kCoded) {
        widen_panel<Bits>(wg, dg, mg, k, buffer.get());
        panel = buffer.get();
      }
      int64_t r = 0;
      for (; r + kRows <= m; r += kRows) tile<kRows>(x + r * k, panel, k, out + r * n + c0, n, cols);
      switch (m - r) {
        case 5: tile<5>(x + r * k, panel, k, out + r * n + c0, n, cols); break;
        case 4: tile<4>(x + r * k, panel, k, out + r * n + c0, n, cols); break;
        case 3: tile<3>(x + r * k, panel, k, out + r * n + c0, n, cols); break;
        case 2: tile<2>(x + r * k, panel, k, out + r * n + c0, n, cols); break;
        case 1: tile<1>(x + r * k, panel, k, out + r * n + c0, n, cols); break;
        default: break;
      }
    }
  });
}

}  // namespace

// x [M, K] float32; wp uint8 [P, K, 2 * bits] (P = ceil(N / 16) panels, panels.h); for bits 4 and 8, d and m
// float32 [P, K/32, 16] (for bits 32 they are not read). Returns [M, N] float32.
at::Tensor q_f32_mm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m,
                    int64_t n, int64_t bits) {
  scalellm::check_panel_args("q_f32_mm", x, at::kFloat, wp, d, m, n, bits, 32);
  const int64_t rows = x.size(0), k = x.size(1);
  auto out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  const float* dp = bits == 32 ? nullptr : d.data_ptr<float>();
  const float* mp = bits == 32 ? nullptr : m.data_ptr<float>();
  auto run = [&](auto kernel) { kernel(x.data_ptr<float>(), wp.data_ptr<uint8_t>(), dp, mp, rows, k, n, out.data_ptr<float>()); };
  if (bits == 4) run(q_f32_mm<4>);
  else if (bits == 8) run(q_f32_mm<8>);
  else run(q_f32_mm<32>);
  return out;
}
