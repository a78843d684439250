// int4 / int8 weights x int8 activations on AVX-512 VNNI or AVX2: llama.cpp's Q4_1 (Q8_0) x Q8 dot product.
//
// Activations are quantised here, per row and per 32-block: a = round(x / ds), ds = max|x| / 127, and
// sa = ds * sum(a). The weight is q * d + m per 32-block (d, m float16). An output is
//     y[r, c] = sum over blocks b, in order, of  d[c,b] ds[r,b] (sum_i q a)  +  m[c,b] sa[r,b]
// where sum_i q a, a block's 32 products, is an exact integer. Only the float steps round, and each output takes
// the same float steps in the same order whatever the number of rows, the row's place in the batch or the
// number of threads: a row's result never depends on what it is batched with. An int8 tile unit (AMX's
// TDPBSUD, the activations as its signed A tile and a block of this layout as its unsigned B tile) computes the
// same exact block sums, and ``tile16`` applies the same float steps (``add_block``): from 16 rows on, where the
// build and the CPU have AMX, rows go in groups of 16 on the tiles and come out the same bits.
//
// Weights (packed once at load, scalellm/models/kernels/__init__.py ``pack``): 16 columns at a time, and per
// block 8 groups of 4 consecutive weights, each group as 16 columns x 4 bytes: one 512-bit operand whose 32-bit
// lane j holds column j's 4 codes. 8 bits: 8 such operands of 64 bytes per block (q in 0..255); 4 bits: 4, the
// group t in the low nibbles and the group t + 4 in the high ones. d and m: 16 columns' float16 per block.
// A row's 4 activation bytes are broadcast against an operand, so a 32-bit lane accumulates its column's block
// sum (VNNI dpbusd); the 16 columns then take their block's scales together: three float operations (convert,
// scale, multiply-add) per 512 multiply-adds, where column-at-a-time dot products need three per 64.
#include "simd.h"
#include "team.h"
#include "tiles.h"

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <memory>
#include <string>
#include <vector>


namespace {

using namespace scalellm;

constexpr int kCols = 16;  // columns per chunk (a chunk's scales are 16 float16s per block)
constexpr int kMaxRows = 8;  // rows per tile: each row holds one accumulator per chunk

// Software prefetch for few rows (memory-bound): a step reads every layer's weights from DRAM once, each call only
// for tens of microseconds, too short for the hardware prefetchers to ramp up. Prefetching changes no arithmetic.
constexpr int64_t kWeightsAhead = 2048;  // bytes ahead in the weights (a thread's chunks are contiguous)
constexpr int64_t kScalesAhead = 512;    // float16s ahead in d and m

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

inline int32_t group_of(const int8_t* a) {  // 4 activation bytes as one 32-bit lane
  int32_t v;
  std::memcpy(&v, a, 4);
  return v;
}

#if defined(__AVX512F__)

// A block's float steps for one row and 16 columns: acc + sums * (d * ds) + m * sa, two roundings each.
inline __m512 add_block(__m512 acc, __m512i sums, __m512 db, __m512 mb, float ds, float sa) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(db, _mm512_set1_ps(ds)), acc);
  return _mm512_fmadd_ps(mb, _mm512_set1_ps(sa), acc);
}

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

// Rows r0..r0+R of one chunk (16 columns): y[i * 16 + j] for row r0 + i, column j of the chunk.
template <int Bits, int R>
inline void tile(const uint8_t* w, const uint16_t* d, const uint16_t* m, const int8_t* aq, const float* ds,
                 const float* sa, int64_t blocks, int64_t k, int64_t r0, float* y) {
  constexpr int kChains = R == 1 ? 4 : R == 2 ? 2 : 1;  // independent integer sums per row: dpbusd's latency
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * (Bits * 64);
    if constexpr (R <= 2) {
      for (int line = 0; line < Bits; ++line) prefetch(wb + kWeightsAhead + line * 64);
      prefetch(d + (b + 1) * kCols + kScalesAhead);
      prefetch(m + (b + 1) * kCols + kScalesAhead);
    }
    __m512i wv[8];
    if constexpr (Bits == 8) {
      for (int t = 0; t < 8; ++t) wv[t] = _mm512_loadu_si512(wb + 64 * t);
    } else {
      const __m512i nibble = _mm512_set1_epi8(0x0F);
      for (int t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(wb + 64 * t);
        wv[t] = _mm512_and_si512(v, nibble);
        wv[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      }
    }
    const __m512 db = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + b * kCols)));
    const __m512 mb = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + b * kCols)));
    for (int i = 0; i < R; ++i) {
      const int8_t* a = aq + (r0 + i) * k + b * 32;
      __m512i s[kChains];
      for (int c = 0; c < kChains; ++c) s[c] = _mm512_setzero_si512();
      for (int t = 0; t < 8; ++t)
        s[t % kChains] = _mm512_dpbusd_epi32(s[t % kChains], wv[t], _mm512_set1_epi32(group_of(a + 4 * t)));
      for (int c = 1; c < kChains; ++c) s[0] = _mm512_add_epi32(s[0], s[c]);  // integers: exact in any order
      const int64_t rb = (r0 + i) * blocks + b;
      acc[i] = add_block(acc[i], s[0], db, mb, ds[rb], sa[rb]);
    }
  }
  for (int i = 0; i < R; ++i) _mm512_store_ps(y + i * kCols, acc[i]);
}

// ---- 16-row groups on the int8 tile unit (tiles.h) ---------------------------------------------------------------
// Per block, C = A B holds the 16 rows x 16 columns of exact block sums that the dpbusd lanes above hold, and
// add_block takes them through the same float steps in the same order: a row comes out the same bits whichever
// unit computed it, so a batch moves onto tiles at 16 rows without changing any answer.

inline void unpack_nibbles(const uint8_t* w, int64_t blocks, uint8_t* out) {  // a 4-bit chunk as B tiles of bytes
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int t = 0; t < 4; ++t) {
      const __m512i v = _mm512_loadu_si512(w + b * 256 + 64 * t);
      _mm512_storeu_si512(out + b * 512 + 64 * t, _mm512_and_si512(v, nibble));
      _mm512_storeu_si512(out + b * 512 + 64 * (t + 4), _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
    }
  }
}

// Rows r0..r0+16 of one chunk: w the chunk's blocks as B tiles (512 bytes each), y[i * 16 + j] as ``tile``'s.
template <class Unit>
inline void tile16(const uint8_t* w, const uint16_t* d, const uint16_t* m, const int8_t* aq, const float* ds,
                   const float* sa, int64_t blocks, int64_t k, int64_t r0, float* y) {
  using namespace tiles;
  __m512 acc[kRows];
  for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
  alignas(64) int32_t sums[2][kRows * kCols];
  const int8_t* a = aq + r0 * k;
  auto add = [&](int64_t b, const int32_t* s) {
    const __m512 db = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + b * kCols)));
    const __m512 mb = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + b * kCols)));
    for (int i = 0; i < kRows; ++i) {
      const int64_t rb = (r0 + i) * blocks + b;
      acc[i] = add_block(acc[i], _mm512_load_si512(s + i * kCols), db, mb, ds[rb], sa[rb]);
    }
  };
  int64_t b = 0;
  for (; b + 1 < blocks; b += 2) {  // two blocks in flight: the second's product overlaps the first's store
    Unit::template load<A0>(a + b * 32, k);
    Unit::template load<B0>(w + b * 512, kLineBytes);
    Unit::template zero<C0>();
    Unit::template dot<C0, A0, B0>();
    Unit::template load<A1>(a + (b + 1) * 32, k);
    Unit::template load<B1>(w + (b + 1) * 512, kLineBytes);
    Unit::template zero<C1>();
    Unit::template dot<C1, A1, B1>();
    Unit::template store<C0>(sums[0], kLineBytes);
    Unit::template store<C1>(sums[1], kLineBytes);
    add(b, sums[0]);
    add(b + 1, sums[1]);
  }
  if (b < blocks) {
    Unit::template load<A0>(a + b * 32, k);
    Unit::template load<B0>(w + b * 512, kLineBytes);
    Unit::template zero<C0>();
    Unit::template dot<C0, A0, B0>();
    Unit::template store<C0>(sums[0], kLineBytes);
    add(b, sums[0]);
  }
  for (int i = 0; i < kRows; ++i) _mm512_store_ps(y + i * kCols, acc[i]);
}

#else  // AVX2: VNNI's u8 x s8 dot product of 4 bytes is maddubs (pairs to int16) then madd by ones (to int32),
       // exact whenever no int16 sum overflows. 4 bits: codes 0..15 times |a| <= 127, 16 products to an int16
       // lane over a block (<= 30480): one madd per block. 8 bits: the codes as signed q - 128 (the weight is
       // (q - 128) d + (m + 128 d)), whose products pair up to at most 32512: one madd per group of 4.
       // Each half of a chunk (8 columns, one 256-bit lane per column) is a tile of its own.

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

template <int Bits, int R>
inline void half_tile(const uint8_t* w, const uint16_t* d, const uint16_t* m, const int8_t* aq, const float* ds,
                      const float* sa, int64_t blocks, int64_t k, int64_t r0, int half, float* y) {
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * (Bits * 64) + 32 * half;
    if constexpr (R == 1) {
      if (half == 0) {
        for (int line = 0; line < Bits; ++line) prefetch(wb + kWeightsAhead + line * 64);
        prefetch(d + (b + 1) * kCols + kScalesAhead);
        prefetch(m + (b + 1) * kCols + kScalesAhead);
      }
    }
    __m256i s[R];
    if constexpr (Bits == 4) {
      __m256i s16[R];
      for (int i = 0; i < R; ++i) s16[i] = _mm256_setzero_si256();
      for (int t = 0; t < 4; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * t));
        const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        for (int i = 0; i < R; ++i) {
          const int8_t* a = aq + (r0 + i) * k + b * 32;
          s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(group_of(a + 4 * t))));
          s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(group_of(a + 16 + 4 * t))));
        }
      }
      for (int i = 0; i < R; ++i) s[i] = _mm256_madd_epi16(s16[i], ones);
    } else {
      for (int i = 0; i < R; ++i) s[i] = _mm256_setzero_si256();
      for (int t = 0; t < 8; ++t) {
        const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * t)), flip);
        const __m256i mag = _mm256_sign_epi8(v, v);
        for (int i = 0; i < R; ++i) {
          const __m256i a = _mm256_set1_epi32(group_of(aq + (r0 + i) * k + b * 32 + 4 * t));
          s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, v)), ones));
        }
      }
    }
    const __m256 db = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b * kCols + 8 * half)));
    __m256 mb = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b * kCols + 8 * half)));
    if constexpr (Bits == 8) mb = _mm256_fmadd_ps(db, _mm256_set1_ps(128.0f), mb);
    for (int i = 0; i < R; ++i) {
      const int64_t rb = (r0 + i) * blocks + b;
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i]), _mm256_mul_ps(db, _mm256_set1_ps(ds[rb])), acc[i]);
      acc[i] = _mm256_fmadd_ps(mb, _mm256_set1_ps(sa[rb]), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(y + i * kCols + 8 * half, acc[i]);
}

template <int Bits, int R>
inline void tile(const uint8_t* w, const uint16_t* d, const uint16_t* m, const int8_t* aq, const float* ds,
                 const float* sa, int64_t blocks, int64_t k, int64_t r0, float* y) {
  half_tile<Bits, R>(w, d, m, aq, ds, sa, blocks, k, r0, 0, y);
  half_tile<Bits, R>(w, d, m, aq, ds, sa, blocks, k, r0, 1, y);
}

#endif

// One row to int8 codes in k order, with each block's scale ds and scaled sum sa.
template <typename T>
inline void quantize_row(const T* x, int64_t k, int8_t* aq, float* ds, float* sa) {
  for (int64_t b = 0; b < k / 32; ++b)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(aq + b * 32), quantize_block(x + b * 32, ds + b, sa + b));
}

#if defined(__AVX512F__)
constexpr int kTileRows = kMaxRows;
#else
constexpr int kTileRows = 4;  // 16 registers: R int16/int32 sums and R accumulators, the group's two operands
#endif

template <int Bits>  // rows r0..r0+rows (at most kTileRows) of one chunk into y
inline void tile_rows(int64_t rows, const uint8_t* w, const uint16_t* d, const uint16_t* m, const int8_t* aq,
                      const float* ds, const float* sa, int64_t blocks, int64_t k, int64_t r0, float* y) {
  switch (rows) {
    case 1: return tile<Bits, 1>(w, d, m, aq, ds, sa, blocks, k, r0, y);
    case 2: return tile<Bits, 2>(w, d, m, aq, ds, sa, blocks, k, r0, y);
    case 3: return tile<Bits, 3>(w, d, m, aq, ds, sa, blocks, k, r0, y);
#if defined(__AVX512F__)
    case 4: return tile<Bits, 4>(w, d, m, aq, ds, sa, blocks, k, r0, y);
    case 5: return tile<Bits, 5>(w, d, m, aq, ds, sa, blocks, k, r0, y);
    case 6: return tile<Bits, 6>(w, d, m, aq, ds, sa, blocks, k, r0, y);
    case 7: return tile<Bits, 7>(w, d, m, aq, ds, sa, blocks, k, r0, y);
#endif
    default: return tile<Bits, kTileRows>(w, d, m, aq, ds, sa, blocks, k, r0, y);
  }
}

// Rows in full groups of 16 go on Unit's tiles when ``on_tiles`` (AVX-512 builds), the rest (all rows otherwise)
// on the dot-product tiles above.
template <int Bits, class Unit, typename T>
void q_q8_mm(const T* x, const uint8_t* wq, const uint16_t* d, const uint16_t* mq, int64_t m, int64_t k,
             int64_t n, T* out, bool on_tiles) {
  const int64_t blocks = k / 32, chunks = (n + kCols - 1) / kCols;
  const int64_t chunk_bytes = blocks * Bits * 64, chunk_scales = blocks * kCols;
  const int64_t tiled = on_tiles ? m / 16 * 16 : 0;
  std::unique_ptr<int8_t[]> aq(new int8_t[m * k]);
  std::unique_ptr<float[]> ds(new float[m * blocks]), sa(new float[m * blocks]);
  // From 16 rows on, chunks are handed out a few at a time (about a million multiply-adds a grab, at least four
  // grabs a thread), not split evenly up front: a serving process shares its cores with Triton's threads, and
  // with an even split the thread they preempt holds the other up at the barrier; here the other takes its
  // chunks. Fewer rows (memory-bound, a few microseconds a call): one even grab per thread.
  const int64_t threads = team::size();
  const int64_t grain = m < 16 ? (chunks + threads - 1) / threads
                               : std::clamp<int64_t>((int64_t{1} << 16) / (m * k), 1,
                                                     std::max<int64_t>(1, chunks / (4 * threads)));
  auto quantize = [&](int64_t r) {
    quantize_row(x + r * k, k, aq.get() + r * k, ds.get() + r * blocks, sa.get() + r * blocks);
  };
  if (m < 16) {
    for (int64_t r = 0; r < m; ++r) quantize(r);
  } else {
    team::parallel_for(m, 8, quantize);
  }
  team::Grabs grabs(chunks, grain);
  team::run([&] {
    alignas(64) float y[16 * kCols];
#if defined(__AVX512F__)
    thread_local std::vector<uint8_t> unpacked;  // a 4-bit chunk's codes a byte each, as B tiles take them
    if (tiled) {
      Unit::configure(tiles::config_for(32));  // A: a block's 32 bytes
      if constexpr (Bits == 4) unpacked.resize(blocks * 512);
    }
#endif
    for (int64_t begin, end; grabs.next(begin, end);)
    for (int64_t g = begin; g < end; ++g) {
      const int64_t c0 = g * kCols, cols = std::min<int64_t>(kCols, n - c0);
#if defined(__AVX512F__)
      if (tiled) {
        const uint8_t* wb = wq + g * chunk_bytes;
        if constexpr (Bits == 4) {
          unpack_nibbles(wb, blocks, unpacked.data());
          wb = unpacked.data();
        }
        for (int64_t r = 0; r < tiled; r += 16) {
          tile16<Unit>(wb, d + g * chunk_scales, mq + g * chunk_scales, aq.get(), ds.get(), sa.get(), blocks, k, r, y);
          for (int64_t i = 0; i < 16; ++i) store16(out + (r + i) * n + c0, load16(y + i * kCols), cols);
        }
      }
#endif
      for (int64_t r = tiled; r < m; r += kTileRows) {
        const int64_t rows = std::min<int64_t>(kTileRows, m - r);
        tile_rows<Bits>(rows, wq + g * chunk_bytes, d + g * chunk_scales, mq + g * chunk_scales, aq.get(), ds.get(),
                        sa.get(), blocks, k, r, y);
        for (int64_t i = 0; i < rows; ++i) store16(out + (r + i) * n + c0, load16(y + i * kCols), cols);
      }
    }
#if defined(__AVX512F__)
    if (tiled) Unit::release();
#endif
  });
}

template <class U>
struct UnitTag {
  using type = U;
};

at::Tensor run_q_q8_mm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& d, const at::Tensor& m, int64_t n,
                       int64_t bits, tiles::Use unit) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "q_q8_mm: x must be a contiguous [M, K] matrix");
  const int64_t rows = x.size(0), k = x.size(1), chunks = (n + kCols - 1) / kCols;
  TORCH_CHECK(bits == 4 || bits == 8, "q_q8_mm: bits must be 4 or 8");
  TORCH_CHECK(k % 32 == 0 && wq.dim() == 2 && wq.size(0) == chunks && wq.size(1) == k / 32 * bits * 64,
              "q_q8_mm: K must be a multiple of 32, and wq [ceil(N/16), K/32 * bits * 64]");
  TORCH_CHECK(d.dim() == 3 && d.size(0) == chunks && d.size(1) == k / 32 && d.size(2) == kCols && m.sizes() == d.sizes(),
              "q_q8_mm: d and m must be [ceil(N/16), K/32, 16]");
  TORCH_CHECK(wq.scalar_type() == at::kByte && d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf &&
              wq.is_contiguous() && d.is_contiguous() && m.is_contiguous(), "q_q8_mm: wq uint8, d and m float16");
  auto out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  auto run = [&](auto* xp, auto* op) {
    auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
    auto* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
    auto go = [&](auto bits_tag, auto unit_tag, bool on_tiles) {
      constexpr int kBits = decltype(bits_tag)::value;
      using Unit = typename decltype(unit_tag)::type;
      q_q8_mm<kBits, Unit>(xp, wq.data_ptr<uint8_t>(), dp, mp, rows, k, n, op, on_tiles);
    };
    auto with_unit = [&](auto bits_tag) {
#if defined(__AVX512F__)
      if (unit == tiles::Use::model) return go(bits_tag, UnitTag<tiles::Model>{}, true);
      return go(bits_tag, UnitTag<tiles::Hardware>{}, unit == tiles::Use::hardware);
#else
      return go(bits_tag, UnitTag<void>{}, false);
#endif
    };
    if (bits == 4) with_unit(std::integral_constant<int, 4>{});
    else with_unit(std::integral_constant<int, 8>{});
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "q_q8_mm: x must be float32 or bfloat16");
    run(x.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

// Whether ``unit`` gives 33 rows of int4 and int8 weights the dot-product kernel's very bits.
bool q8_tiles_agree(tiles::Use unit) {
  const int64_t n = 40, k = 96, chunks = (n + kCols - 1) / kCols;  // a column tail, an odd number of blocks
  const at::Tensor x = tiles::check_values({33, k}, at::kFloat, 1);
  const at::Tensor d = (tiles::check_values({chunks, k / 32, kCols}, at::kFloat, 2) * 0.01).to(at::kHalf);
  const at::Tensor m = (tiles::check_values({chunks, k / 32, kCols}, at::kFloat, 3) * 0.01).to(at::kHalf);
  bool same = true;
  for (int64_t bits : {4, 8}) {
    const at::Tensor wq = tiles::check_codes({chunks, k / 32 * bits * 64}, 255);
    same = same && at::equal(run_q_q8_mm(x, wq, d, m, n, bits, unit),
                             run_q_q8_mm(x, wq, d, m, n, bits, tiles::Use::none));
  }
  return same;
}

// The hardware tiles serve q_q8_mm once they agree on that first-use check (a millisecond once per process);
// otherwise a warning, and the dot products.
tiles::Use q8_tiles() {
  static const tiles::Use use = [] {
    if (!tiles::amx_usable()) return tiles::Use::none;
    if (q8_tiles_agree(tiles::Use::hardware)) return tiles::Use::hardware;
    TORCH_WARN("q_q8_mm: AMX's int8 tiles gave other bits than the dot products on a check; not used");
    return tiles::Use::none;
  }();
  return use;
}

}  // namespace

// x [M, K] float32 or bfloat16 (K a multiple of 32); wq uint8 [P, K/32 * bits * 64] and d, m float16 [P, K/32, 16]:
// the weights of N columns in P = ceil(N / 16) chunks as ``pack`` lays them out (top of this file), the weight
// q * d + m. Returns [M, N] in x's dtype. From 16 rows on, rows go in groups of 16 on AMX's int8 tiles where this
// build, the CPU and the OS allow it (the same bits as on dot products).
at::Tensor q_q8_mm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& d, const at::Tensor& m, int64_t n,
                   int64_t bits) {
  return run_q_q8_mm(x, wq, d, m, n, bits, q8_tiles());
}

// The same, every full group of 16 rows on a tile unit: AMX where q_q8_mm would take it, its software model
// elsewhere (tiles.h). For the tests: the tile kernel's bits against the dot-product kernel's on any AVX-512 CPU.
at::Tensor q_q8_mm_tiles(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& d, const at::Tensor& m,
                         int64_t n, int64_t bits) {
#if defined(__AVX512F__)
  return run_q_q8_mm(x, wq, d, m, n, bits, tiles::hardware_or_model());
#else
  TORCH_CHECK(false, "q_q8_mm_tiles: the tile kernel is in the AVX-512 builds only");
#endif
}

// The first-use check of the tile unit the *_tiles functions run on (the hardware's, or the model's here).
bool q8_tile_check() {
#if defined(__AVX512F__)
  return q8_tiles_agree(tiles::hardware_or_model());
#else
  return false;
#endif
}

// Which tile unit the *_tiles functions run on in this build and process: "amx", "model", or "none" (AVX2).
std::string tile_unit() {
#if defined(__AVX512F__)
  return tiles::amx_usable() ? "amx" : "model";
#else
  return "none";
#endif
}
