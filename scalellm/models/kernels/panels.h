// The weight layout q_f32.cpp and q_bf16.cpp share (kernels.pack_panels): 16-column panels, k-major. Per panel,
// per k, the 16 columns' weights in 2 * bits bytes:
//   bits 4 / 8: codes (4 bits as nibble pairs, low nibble first), with d and m float32 per panel, per 32-block,
//               per column: the weight is q * d + m, one rounding (q * d is exact);
//   bits 16:    bfloat16 weights, k-pairs interleaved ([K/2, 16, 2]: what a bf16 dot product takes);
//   bits 32:    float32 weights.
// Both kernels compute every output as one chain over k = 0, 1, ... in a fixed order, whatever the number of rows,
// a row's place among them or the thread count: a row's result never depends on what it is batched with (oneDNN
// and MKL pick other kernels, and other summation orders, for other row counts).
#pragma once
#include "simd.h"
#include "team.h"

#include <algorithm>
#include <cstdint>


namespace scalellm {

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

// The 16 columns' float32 weights at k = t of a coded panel (d, m: that k's block scales).
template <int Bits>
inline vf weights16(const uint8_t* wp, int64_t t, vf d, vf m) {
  return vfma(widen_u8(codes16<Bits>(wp + t * 2 * Bits)), d, m);
}

// The arguments' checks both kernels share: x [M, K] of ``dtype``; wp uint8 [ceil(N/16), K, 2 * bits]; for coded
// bits (4, 8) d and m float32 [ceil(N/16), K/32, 16]; ``dense_bits`` is the kernel's dense width (16 or 32).
inline void check_panel_args(const char* name, const at::Tensor& x, at::ScalarType dtype, const at::Tensor& wp,
                             const at::Tensor& d, const at::Tensor& m, int64_t n, int64_t bits, int64_t dense_bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == dtype, name,
              ": x must be a contiguous [M, K] matrix of ", dtype);
  const int64_t k = x.size(1), panels = (n + 15) / 16;
  TORCH_CHECK(bits == 4 || bits == 8 || bits == dense_bits, name, ": bits must be 4, 8 or ", dense_bits);
  TORCH_CHECK(k % 32 == 0 && wp.dim() == 3 && wp.size(0) == panels && wp.size(1) == k && wp.size(2) == 2 * bits,
              name, ": K must be a multiple of 32 and wp [ceil(N/16), K, 2 * bits]");
  TORCH_CHECK(wp.scalar_type() == at::kByte && wp.is_contiguous(), name, ": wp must be contiguous uint8");
  TORCH_CHECK(bits == dense_bits || (d.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat &&
                                     d.is_contiguous() && m.is_contiguous() && d.numel() == panels * k / 2 &&
                                     m.numel() == d.numel()),
              name, ": d and m float32 [ceil(N/16), K/32, 16]");
}

// Panels per dynamic grab: about a million multiply-adds, at least four grabs a thread, so that a worker that
// Triton's threads preempt does not hold the others up at the barrier.
inline int64_t panel_grain(int64_t rows, int64_t k, int64_t panels) {
  const int64_t threads = team::size();
  return std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(1, rows * k), 1,
                             std::max<int64_t>(1, panels / (4 * threads)));
}

}  // namespace scalellm
