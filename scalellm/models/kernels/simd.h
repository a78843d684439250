// 16 floats at a time for our kernels, on whichever instruction set the build names (kernels/__init__.py builds
// this source twice): one __m512 under AVX-512, a pair of __m256 under AVX2 + FMA + F16C. Loads and stores from
// and to float32, bfloat16 and float16 (at::Half, the K/V cache's; raw uint16_t for weight scales); exp; the
// reductions. A count n < 16 touches only the first n lanes.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace scalellm {

#if defined(__AVX512F__)

using vf = __m512;

inline __mmask16 first(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float x) { return _mm512_set1_ps(x); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline float vmaxval(vf v) { return _mm512_reduce_max_ps(v); }
inline vf keep_first(vf v, int64_t n, float fill) { return _mm512_mask_blend_ps(first(n), vset(fill), v); }

inline vf load16(const float* p, int64_t n = 16) { return _mm512_maskz_loadu_ps(first(n), p); }
inline vf load16(const at::BFloat16* p, int64_t n = 16) {
  __m256i h = _mm256_maskz_loadu_epi16(first(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf load16_half(const uint16_t* p, int64_t n = 16) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p)); }
inline vf load16(const at::Half* p, int64_t n = 16) { return load16_half(reinterpret_cast<const uint16_t*>(p), n); }

inline __m512i round_bits(vf v) {  // float32 bits rounded (nearest even) at bfloat16's last bit
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
}

inline void store16(float* p, vf v, int64_t n = 16) { _mm512_mask_storeu_ps(p, first(n), v); }
inline void store16(at::BFloat16* p, vf v, int64_t n = 16) {
  _mm256_mask_storeu_epi16(p, first(n), _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bits(v), 16)));
}
inline void store16(at::Half* p, vf v, int64_t n = 16) {  // float16, rounded to nearest even
  _mm256_mask_storeu_epi16(p, first(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// v rounded to T's precision (nearest even), still as float32: to round where torch's T ops round.
template <typename T>
inline vf round16(vf v) {
  if constexpr (sizeof(T) == 4) return v;
  return _mm512_castsi512_ps(_mm512_and_si512(round_bits(v), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// exp(x): 2^n * e^r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (relative error < 1e-7);
// 0 below -103, inf above 88.
inline vf exp16(vf x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// out[t] = the sum of a[t]'s lanes, for 16 vectors at once (a transposed reduction: 45 ops instead of 16 x 10).
inline vf sum16(const vf* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sum for a[4i], a[4i+1], a[4i+2], a[4i+3]
    __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes summed in pairs
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

#else  // AVX2 + FMA + F16C: every operation on both halves

struct vf {
  __m256 lo, hi;
};

inline vf vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vf vset(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline vf vadd(vf a, vf b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline vf vsub(vf a, vf b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline vf vmul(vf a, vf b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline vf vdiv(vf a, vf b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline vf vmax(vf a, vf b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline vf vfma(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vsum(vf v) { return hsum8(_mm256_add_ps(v.lo, v.hi)); }
inline float vmaxval(vf v) {
  __m256 m = _mm256_max_ps(v.lo, v.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline vf keep_first(vf v, int64_t n, float fill) {
  const __m256 limit = _mm256_set1_ps(static_cast<float>(n < 16 ? n : 16)), f = _mm256_set1_ps(fill);
  const __m256 lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  return {_mm256_blendv_ps(f, v.lo, _mm256_cmp_ps(lo, limit, _CMP_LT_OQ)),
          _mm256_blendv_ps(f, v.hi, _mm256_cmp_ps(hi, limit, _CMP_LT_OQ))};
}

// Fewer than 16 elements go through a zeroed 16-element buffer (only row tails: rare).
template <typename T>
inline const T* padded(const T* p, int64_t n, T* buffer) {
  if (n >= 16) return p;
  std::memset(static_cast<void*>(buffer), 0, 16 * sizeof(T));
  std::memcpy(static_cast<void*>(buffer), p, n * sizeof(T));
  return buffer;
}

inline vf load16(const float* p, int64_t n = 16) {
  float buffer[16];
  p = padded(p, n, buffer);
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
inline __m256 widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline vf load16(const at::BFloat16* p, int64_t n = 16) {
  at::BFloat16 buffer[16];
  p = padded(p, n, buffer);
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  return {widen_bf16(_mm_loadu_si128(q)), widen_bf16(_mm_loadu_si128(q + 1))};
}
inline vf load16_half(const uint16_t* p, int64_t n = 16) {
  uint16_t buffer[16];
  p = padded(p, n, buffer);
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}
inline vf load16(const at::Half* p, int64_t n = 16) { return load16_half(reinterpret_cast<const uint16_t*>(p), n); }

inline __m256i round_bits(__m256 v) {  // float32 bits rounded (nearest even) at bfloat16's last bit
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
}

template <typename T>
inline void store16(T* p, vf v, int64_t n = 16) {
  T buffer[16];
  T* to = n >= 16 ? p : buffer;
  if constexpr (sizeof(T) == 4) {
    _mm256_storeu_ps(to, v.lo);
    _mm256_storeu_ps(to + 8, v.hi);
  } else {  // the high 16 bits of each rounded float, in order (packus interleaves 128-bit lanes: permute back)
    __m256i both = _mm256_packus_epi32(_mm256_srli_epi32(round_bits(v.lo), 16), _mm256_srli_epi32(round_bits(v.hi), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm256_permute4x64_epi64(both, 0xD8));
  }
  if (n < 16) std::memcpy(static_cast<void*>(p), buffer, n * sizeof(T));
}

inline void store16(at::Half* p, vf v, int64_t n = 16) {  // float16, rounded to nearest even
  const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  alignas(32) uint16_t buffer[16];
  uint16_t* to = n >= 16 ? reinterpret_cast<uint16_t*>(p) : buffer;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(to), _mm256_cvtps_ph(v.lo, mode));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(to + 8), _mm256_cvtps_ph(v.hi, mode));
  if (n < 16) std::memcpy(static_cast<void*>(p), buffer, n * sizeof(uint16_t));
}

template <typename T>
inline vf round16(vf v) {
  if constexpr (sizeof(T) == 4) return v;
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  return {_mm256_castsi256_ps(_mm256_and_si256(round_bits(v.lo), top)),
          _mm256_castsi256_ps(_mm256_and_si256(round_bits(v.hi), top))};
}

// exp as on AVX-512; 2^n is built from exponent bits in two factors, so that results below 2^-126 come out
// subnormal as scalef's do.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-103.0f)), _mm256_set1_ps(89.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  __m256i e = _mm256_cvtps_epi32(n), e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
  auto pow2 = [](__m256i k) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23)); };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(e1)), pow2(e2));
}
inline vf exp16(vf x) { return {exp8(x.lo), exp8(x.hi)}; }

// out[t] = the sum of a[t]'s eight lanes, for eight vectors at once.
inline __m256 sum8(const __m256* s) {
  __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}
inline vf sum16(const vf* a) {
  __m256 s[16];
  for (int t = 0; t < 16; ++t) s[t] = _mm256_add_ps(a[t].lo, a[t].hi);
  return {sum8(s), sum8(s + 8)};
}

#endif

}  // namespace scalellm
