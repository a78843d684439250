// int4 / int8 weights x int8 activations on AVX-512 VNNI or AVX2: llama.cpp's Q4_1 (Q8_0) x Q8 dot product.
//
// Weights (packed once at load, see scalellm/models/kernels/__init__.py): per output column, per pair of
// 32-weight blocks, in the order the activations below are laid out in, the weight being q * d + m:
// 4 bits: 32 bytes whose low nibbles are the pair's first 32 codes and high nibbles its last 32 (q in 0..15);
// 8 bits: 64 bytes (q in 0..255: a signed int8 code plus 128, m = -128 d).
// Activations are quantised here, per row and per 32-block: a = round(x / ds), ds = max|x| / 127.
// Then   y[r, c] = sum_b d[c,b] ds[r,b] sum_i q a  +  sum_b m[c,b] ds[r,b] sum_i a.
//
// Each output is computed by the same sequence of operations whatever the number of rows, the row's place in
// the batch or the number of threads: a row's result never depends on what it is batched with.
#include "simd.h"

#include <cstdint>
#include <algorithm>
#include <memory>

#include <omp.h>

namespace {

using namespace scalellm;

constexpr int kPair = 64;  // weights per pair of blocks: one 512-bit VNNI operand, two 256-bit AVX2 ones

// Software prefetch for few rows (memory-bound): a step reads every layer's weights from DRAM once, each call only
// for tens of microseconds, too short for the hardware prefetchers to ramp up; at one row the step's linears ran
// at a third of the memory's streaming bandwidth. Prefetching changes no arithmetic.
constexpr int64_t kWeightsAhead = 2048;  // bytes ahead in a column's weights (a few columns: they are contiguous)
constexpr int64_t kColumnsAhead = 64;    // m_t: the columns of the chunk four ahead, in each block's row

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

#if defined(__AVX512F__)

constexpr int kTileRows = 4, kTileCols = 4;  // 16 accumulators of 32 registers

// One 32-weight block of a row to int8: 32 bytes at out (8 int32 lanes), its scale and its scaled sum.
template <typename T>
inline __m256i quantize_block(const T* x, float* ds, float* sa) {
  __m512 lo = load16(x), hi = load16(x + 16);
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  float scale = amax / 127.0f;
  __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
  __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
  *ds = scale;
  *sa = scale * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
  __m128i blo = _mm512_cvtsepi32_epi8(qlo), bhi = _mm512_cvtsepi32_epi8(qhi);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(blo), bhi, 1);
}

template <int Bits>
inline __m512i unpack_pair(const uint8_t* w) {
  if constexpr (Bits == 8) return _mm512_loadu_si512(w);
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
  return _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
}

inline __m512 pair_scales(const uint16_t* s) {  // float16 (s0, s1) to float32 [s0, s1, s0, s1, ...]
  return _mm512_cvtph_ps(_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(s)));
}

inline __m512 pair_scales(const float* s) {  // (s0, s1) to [s0, s1, s0, s1, ...]
  return _mm512_castpd_ps(_mm512_set1_pd(*reinterpret_cast<const double*>(s)));
}

// The q*a part of an R x C tile of outputs: y[r][c] for rows r0.., columns c0...
template <int Bits, int R, int C>
inline void tile(const uint8_t* wq, const uint16_t* d, const int8_t* aq, const float* ds, const float*, int64_t pairs,
                 int64_t r0, int64_t c0, float* y) {  // y: row r0's 16 columns, c0 among them
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t blocks = 2 * pairs;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i w[C];
    __m512 dw[C];
    for (int j = 0; j < C; ++j) {
      if constexpr (R == 1) prefetch(wq + ((c0 + j) * pairs + p) * (8 * Bits) + kWeightsAhead);
      w[j] = unpack_pair<Bits>(wq + ((c0 + j) * pairs + p) * (8 * Bits));
      dw[j] = pair_scales(d + (c0 + j) * blocks + 2 * p);
    }
    for (int i = 0; i < R; ++i) {
      __m512i a = _mm512_loadu_si512(aq + ((r0 + i) * pairs + p) * kPair);
      __m512 da = pair_scales(ds + (r0 + i) * blocks + 2 * p);
      for (int j = 0; j < C; ++j) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[j], a);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[j], da), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) y[i * 16 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

#else  // AVX2: VNNI's u8 x s8 dot product of 4 bytes is maddubs (pairs to int16) then madd by ones (to int32),
       // exact whenever no int16 pair sum overflows. 4-bit weights (0..15) never do. 8-bit weights (0..255) are
       // taken as signed codes q - 128 times a (|(q - 128) a| <= 128 * 127, a pair <= 32512); the 128 sum(a) this
       // leaves out is added in float, as 128 d sa per block (sa = the block's scaled sum, already at hand).

constexpr int kTileRows = 4, kTileCols = 1;  // 4 accumulators: at one row, 1 x 1 tiles read the lm_head 1.5-2x faster than 2 x 2

template <typename T>
inline __m256i quantize_block(const T* x, float* ds, float* sa) {  // as on AVX-512, to the same bytes and scales
  vf lo = load16(x), hi = load16(x + 16);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  vf mag = vmax({_mm256_andnot_ps(sign, lo.lo), _mm256_andnot_ps(sign, lo.hi)},
                {_mm256_andnot_ps(sign, hi.lo), _mm256_andnot_ps(sign, hi.hi)});
  float amax = vmaxval(mag);
  float scale = amax / 127.0f;
  __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(lo.lo, inv)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(lo.hi, inv));
  __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(hi.lo, inv)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(hi.hi, inv));
  __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *ds = scale;
  *sa = scale * static_cast<float>(_mm_cvtsi128_si32(s4));
  // Saturating packs interleave 128-bit lanes: 4-byte groups come out as q0 q1 q2 q3 (low halves), then the
  // high halves; the permutation puts them back in order.
  __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline __m256 pair_scales(const uint16_t* s) {  // float16 (s0, s1) to float32 [s0, s1, s0, s1, ...]
  return _mm256_cvtph_ps(_mm_set1_epi32(*reinterpret_cast<const int32_t*>(s)));
}

inline __m256 pair_scales(const float* s) {
  return _mm256_castpd_ps(_mm256_set1_pd(*reinterpret_cast<const double*>(s)));
}

inline __m256i madd_ones(__m256i pairs16) { return _mm256_madd_epi16(pairs16, _mm256_set1_epi16(1)); }

template <int Bits, int R, int C>
inline void tile(const uint8_t* wq, const uint16_t* d, const int8_t* aq, const float* ds, const float* sa,
                 int64_t pairs, int64_t r0, int64_t c0, float* y) {
  __m256 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t blocks = 2 * pairs;
  const __m256i nibble = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t p = 0; p < pairs; ++p) {
    __m256i w[C][2];  // the pair's first and second 32 bytes, in the activations' order (8 bits: q - 128)
    __m256i w_abs[C][2];
    __m256 dw[C];
    for (int j = 0; j < C; ++j) {
      const uint8_t* wp = wq + ((c0 + j) * pairs + p) * (8 * Bits);
      if constexpr (R == 1) prefetch(wp + kWeightsAhead);
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      if constexpr (Bits == 4) {
        w[j][0] = _mm256_and_si256(v, nibble);
        w[j][1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      } else {
        w[j][0] = _mm256_xor_si256(v, flip);
        w[j][1] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32)), flip);
        w_abs[j][0] = _mm256_sign_epi8(w[j][0], w[j][0]);
        w_abs[j][1] = _mm256_sign_epi8(w[j][1], w[j][1]);
      }
      dw[j] = pair_scales(d + (c0 + j) * blocks + 2 * p);
    }
    for (int i = 0; i < R; ++i) {
      const __m256i* ap = reinterpret_cast<const __m256i*>(aq + ((r0 + i) * pairs + p) * kPair);
      const __m256i a0 = _mm256_loadu_si256(ap), a1 = _mm256_loadu_si256(ap + 1);
      const __m256 da = pair_scales(ds + (r0 + i) * blocks + 2 * p);
      __m256 shift;  // 8 bits: 128 sa per block, spread over its 4 lanes (32 sa each; times d below)
      if constexpr (Bits == 8) shift = _mm256_mul_ps(pair_scales(sa + (r0 + i) * blocks + 2 * p), _mm256_set1_ps(32.0f));
      for (int j = 0; j < C; ++j) {
        __m256i dot;
        if constexpr (Bits == 4) {  // |pair| <= 2 * 15 * 127: the two halves add up in int16
          dot = madd_ones(_mm256_add_epi16(_mm256_maddubs_epi16(w[j][0], a0), _mm256_maddubs_epi16(w[j][1], a1)));
        } else {
          dot = _mm256_add_epi32(madd_ones(_mm256_maddubs_epi16(w_abs[j][0], _mm256_sign_epi8(a0, w[j][0]))),
                                 madd_ones(_mm256_maddubs_epi16(w_abs[j][1], _mm256_sign_epi8(a1, w[j][1]))));
        }
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[j], da), acc[i][j]);
        if constexpr (Bits == 8) acc[i][j] = _mm256_fmadd_ps(dw[j], shift, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) y[i * 16 + j] = hsum8(acc[i][j]);
}

#endif

// One row to int8 pairs: per pair, int32 lanes alternate block 0 / block 1 (unpacklo then unpackhi of the two
// blocks' 4-byte groups), so that lane parity picks the block and a broadcast pair of scales lines up.
template <typename T>
inline void quantize_row(const T* x, int64_t k, int8_t* aq, float* ds, float* sa) {
  for (int64_t p = 0; p < k / kPair; ++p) {
    __m256i b0 = quantize_block(x + p * kPair, ds + 2 * p, sa + 2 * p);
    __m256i b1 = quantize_block(x + p * kPair + 32, ds + 2 * p + 1, sa + 2 * p + 1);
    __m256i* to = reinterpret_cast<__m256i*>(aq + p * kPair);
    _mm256_storeu_si256(to, _mm256_unpacklo_epi32(b0, b1));
    _mm256_storeu_si256(to + 1, _mm256_unpackhi_epi32(b0, b1));
  }
}

template <int Bits, int R>  // rows r0.. of columns c0..c1 (at most 16) into y, whose first row is rb
inline void tile_rows(const uint8_t* wq, const uint16_t* d, const int8_t* aq, const float* ds, const float* sa,
                      int64_t pairs, int64_t r0, int64_t rb, int64_t c0, int64_t c1, float* y) {
  float* yr = y + (r0 - rb) * 16;
  int64_t c = c0;
  for (; c + kTileCols <= c1; c += kTileCols) tile<Bits, R, kTileCols>(wq, d, aq, ds, sa, pairs, r0, c, yr + (c - c0));
  for (; c < c1; ++c) tile<Bits, R, 1>(wq, d, aq, ds, sa, pairs, r0, c, yr + (c - c0));
}

template <int Bits, typename T>
void q_q8_mm(const T* x, const uint8_t* wq, const uint16_t* d, const uint16_t* m_t, int64_t m, int64_t k,
              int64_t n, T* out) {
  const int64_t pairs = k / kPair, blocks = k / 32;
  std::unique_ptr<int8_t[]> aq(new int8_t[m * k]);
  std::unique_ptr<float[]> ds(new float[m * blocks]), sa(new float[m * blocks]);
  const int64_t chunks = (n + 15) / 16;
  // From 16 rows on, columns are handed out a few chunks at a time (about a million multiply-adds a grab, at
  // least four grabs a thread), not split evenly up front: a serving process shares its cores with Triton's
  // threads, and with an even split the thread they preempt holds the other up at the barrier; here the other
  // takes its columns. Fewer rows (memory-bound, a few microseconds a call): one even grab per thread, as the
  // finer grabs cost 15% at one row.
  const int64_t threads = omp_get_max_threads();
  const int64_t grain = m < 16 ? (chunks + threads - 1) / threads
                               : std::clamp<int64_t>((int64_t{1} << 16) / (m * k), 1,
                                                     std::max<int64_t>(1, chunks / (4 * threads)));
#pragma omp parallel
  {
    // Rows to int8, then (after the barrier) columns in chunks of 16: a chunk's weights stay in L1 while every
    // row passes over them; the m-term and the store run 16 columns at a time.
#pragma omp for schedule(dynamic, 8)
    for (int64_t r = 0; r < m; ++r) quantize_row(x + r * k, k, aq.get() + r * k, ds.get() + r * blocks, sa.get() + r * blocks);
    constexpr int64_t kRows = 64;
    alignas(64) float y[kRows * 16];
#pragma omp for schedule(dynamic, grain)
    for (int64_t g = 0; g < chunks; ++g) {
      const int64_t c0 = g * 16, c1 = std::min(n, c0 + 16);
      if (m < 16 && c0 + kColumnsAhead < n)
        for (int64_t b = 0; b < blocks; ++b) prefetch(m_t + b * n + c0 + kColumnsAhead);
      for (int64_t rb = 0; rb < m; rb += kRows) {
        const int64_t re = std::min(m, rb + kRows);
        int64_t r = rb;
        for (; r + kTileRows <= re; r += kTileRows) tile_rows<Bits, kTileRows>(wq, d, aq.get(), ds.get(), sa.get(), pairs, r, rb, c0, c1, y);
        for (; r < re; ++r) tile_rows<Bits, 1>(wq, d, aq.get(), ds.get(), sa.get(), pairs, r, rb, c0, c1, y);
        for (r = rb; r < re; ++r) {
          const float* sar = sa.get() + r * blocks;
          vf acc = vzero();
          for (int64_t b = 0; b < blocks; ++b) acc = vfma(vset(sar[b]), load16_half(m_t + b * n + c0, c1 - c0), acc);
          store16(out + r * n + c0, vadd(load16(y + (r - rb) * 16), acc), c1 - c0);
        }
      }
    }
  }
}

}  // namespace

// x [M, K] float32 or bfloat16; wq uint8 [N, K * bits / 8] (bits 4: q in 0..15 as nibbles; 8: q in 0..255);
// d float16 [N, K/32]; m_t float16 [K/32, N]: the weight is q * d + m. Returns [M, N] in x's dtype.
at::Tensor q_q8_mm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& d, const at::Tensor& m_t,
                   int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "q_q8_mm: x must be a contiguous [M, K] matrix");
  const int64_t m = x.size(0), k = x.size(1), n = wq.size(0);
  TORCH_CHECK(bits == 4 || bits == 8, "q_q8_mm: bits must be 4 or 8");
  TORCH_CHECK(k % kPair == 0 && wq.size(1) * 8 == k * bits, "q_q8_mm: K must be a multiple of 64 and match wq");
  TORCH_CHECK(wq.scalar_type() == at::kByte && d.scalar_type() == at::kHalf && m_t.scalar_type() == at::kHalf &&
              wq.is_contiguous() && d.is_contiguous() && m_t.is_contiguous(), "q_q8_mm: wq uint8, d and m_t float16");
  auto out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  auto run = [&](auto* xp, auto* op) {
    auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
    auto* mp = reinterpret_cast<const uint16_t*>(m_t.data_ptr<at::Half>());
    if (bits == 4) q_q8_mm<4>(xp, wq.data_ptr<uint8_t>(), dp, mp, m, k, n, op);
    else q_q8_mm<8>(xp, wq.data_ptr<uint8_t>(), dp, mp, m, k, n, op);
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "q_q8_mm: x must be float32 or bfloat16");
    run(x.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}
