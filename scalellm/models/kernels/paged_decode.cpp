// Decode attention straight from the paged KV cache: one query per sequence, no gathered copy of K/V.
//
// The cache of one layer is [2, KVH, slots, D] (scalellm/models/attention.py); a sequence's key j sits at slot
// blocks[j / block_size] * block_size + j % block_size. Each (sequence, KV head) is one task: the G query heads
// of that KV head score its keys in float32, a float32 softmax, then the weighted sum of its values. A task
// reads only its own sequence, so a row's result never depends on what it is batched with. With ``bf16_dot``
// (a bfloat16 cache on a CPU with AVX-512 BF16) the scores are bf16 dot products of q and K as stored: exact
// products, float32 sums, and no widening of K: fewer instructions for the same float32 accuracy.
#include "simd.h"
#include "team.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using namespace scalellm;

template <typename T>
inline void prefetch_row(const T* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < dim * static_cast<int64_t>(sizeof(T)); off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

constexpr int kMaxGroup = 8;   // query heads per KV head
constexpr int kMaxChunks = 16;  // head_dim / 16

#if !defined(__AVX512F__)
// AVX2 has 16 registers of 8 floats: the AVX-512 body's 16 key accumulators of 16 floats would spill on every
// multiply-add. Here each key's G dot products are G 8-float accumulators (its K row read once, the queries from
// L1), summed eight keys at a time; the weighted sum of values runs over segments of SEG x 8 dimensions, whose
// G x SEG accumulators stay in registers.
template <typename TC, int G>
inline void score_keys(const float* qbuf, const TC* k_head, const int64_t* slot, int64_t len, int64_t dim,
                       int64_t padded, float* scores) {
  const int64_t chunks = dim / 16;
  alignas(32) __m256 partial[G][8];
  for (int64_t j0 = 0; j0 < len; j0 += 8) {
    const int64_t n = std::min<int64_t>(8, len - j0);
    for (int64_t t = 0; t < 8; ++t) {
      __m256 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
      if (t < n) {
        const int64_t j = j0 + t;
        if (j + 16 < len) prefetch_row(k_head + slot[j + 16] * dim, dim);
        const TC* k = k_head + slot[j] * dim;
        for (int64_t c = 0; c < chunks; ++c) {
          const vf kc = load16(k + c * 16);
          for (int g = 0; g < G; ++g) {
            const float* qc = qbuf + (g * chunks + c) * 16;
            acc[g] = _mm256_fmadd_ps(_mm256_load_ps(qc), kc.lo, acc[g]);
            acc[g] = _mm256_fmadd_ps(_mm256_load_ps(qc + 8), kc.hi, acc[g]);
          }
        }
      }
      for (int g = 0; g < G; ++g) partial[g][t] = acc[g];
    }
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(scores + g * padded + j0, sum8(partial[g]));
  }
}

template <typename T, typename TC, int G, int SEG>
inline void weigh_values(const float* scores, const TC* v_head, const int64_t* slot, int64_t len, int64_t dim,
                         int64_t padded, const float* inv_sum, T* out) {  // out: the G heads' rows
  for (int64_t s0 = 0; s0 < dim; s0 += 8 * SEG) {
    __m256 o[G][SEG];
    for (int g = 0; g < G; ++g)
      for (int u = 0; u < SEG; ++u) o[g][u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const TC* v = v_head + slot[j] * dim + s0;
      if (s0 == 0 && j + 16 < len) prefetch_row(v_head + slot[j + 16] * dim, dim);
      __m256 vv[SEG];
      for (int u = 0; u < SEG; u += 2) {
        const vf pair = load16(v + u * 8, SEG == 1 ? 8 : 16);
        vv[u] = pair.lo;
        if (u + 1 < SEG) vv[u + 1] = pair.hi;
      }
      for (int g = 0; g < G; ++g) {
        const __m256 p = _mm256_set1_ps(scores[g * padded + j]);
        for (int u = 0; u < SEG; ++u) o[g][u] = _mm256_fmadd_ps(p, vv[u], o[g][u]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m256 inv = _mm256_set1_ps(inv_sum[g]);
      for (int u = 0; u < SEG; u += 2) {
        const vf both = {_mm256_mul_ps(o[g][u], inv), u + 1 < SEG ? _mm256_mul_ps(o[g][u + 1], inv) : _mm256_setzero_ps()};
        store16(out + g * dim + s0 + u * 8, both, SEG == 1 ? 8 : 16);
      }
    }
  }
}

template <typename T, typename TC, int G>
inline void weigh_values(const float* scores, const TC* v_head, const int64_t* slot, int64_t len, int64_t dim,
                         int64_t padded, const float* inv_sum, T* out) {
  constexpr int kSeg = G == 1 ? 8 : G <= 3 ? 4 : G <= 6 ? 2 : 1;  // G x SEG accumulators: at most 12 registers
  if constexpr (kSeg >= 8) if (dim % 64 == 0) return weigh_values<T, TC, G, 8>(scores, v_head, slot, len, dim, padded, inv_sum, out);
  if constexpr (kSeg >= 4) if (dim % 32 == 0) return weigh_values<T, TC, G, 4>(scores, v_head, slot, len, dim, padded, inv_sum, out);
  if constexpr (kSeg >= 2) return weigh_values<T, TC, G, 2>(scores, v_head, slot, len, dim, padded, inv_sum, out);
  weigh_values<T, TC, G, 1>(scores, v_head, slot, len, dim, padded, inv_sum, out);
}
#endif

#if defined(__AVX512F__)
// A task's scores on AVX-512 BF16 dot products (bf16_dot): per key and query head, head_dim / 32 VDPBF16PS on q
// and the key as they lie (bf16 pairs: exact products, float32 sums), the 16 lanes summed by one transposed
// reduction per 16 keys, then the scale. q: the task's G query heads' rows; head_dim a multiple of 32.
__attribute__((target("avx512bf16"))) inline void score_bf16(const at::BFloat16* q, const at::BFloat16* k_head,
                                                            const int64_t* slot, int64_t len, int64_t group,
                                                            int64_t dim, float scale, int64_t padded, float* scores) {
  const int64_t pairs = dim / 32;
  __m512i qs[kMaxGroup][kMaxChunks / 2];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < pairs; ++c) qs[g][c] = _mm512_loadu_si512(q + g * dim + c * 32);
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - j0);
    for (int64_t j = j0 + 16; j < std::min(len, j0 + 32); ++j) prefetch_row(k_head + slot[j] * dim, dim);
    for (int64_t g = 0; g < group; ++g) {
      vf acc[16];
      for (int64_t t = 0; t < 16; ++t) {
        acc[t] = vzero();
        if (t < n)
          for (int64_t c = 0; c < pairs; ++c)
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)qs[g][c],
                                      (__m512bh)_mm512_loadu_si512(k_head + slot[j0 + t] * dim + c * 32));
      }
      store16(scores + g * padded + j0, vmul(sum16(acc), vset(scale)));
    }
  }
}
#endif

// TC: the cache's element type (T, or float16 under float32 activations). kGroup, kChunks: the query heads per KV
// head and head_dim / 16 as compile-time constants (0: read at run time), so that the AVX-512 loops over them unroll
// and their query, score and output vectors stay in registers instead of going through the stack on every
// multiply-add; the operations and their order are the same either way.
template <typename T, typename TC, int kGroup = 0, int kChunks = 0>
void decode(const T* q, const TC* cache, const int64_t* blocks, const int64_t* lengths, int64_t batch,
            int64_t heads, int64_t kv_heads, int64_t slots, int64_t dim, int64_t width, int64_t block_size,
            float scale, bool bf16_dot, T* out) {
  const int64_t group = kGroup ? kGroup : heads / kv_heads, chunks = kChunks ? kChunks : dim / 16;
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16> && std::is_same_v<TC, at::BFloat16>;
  const bool dot = kBf16 && bf16_dot;  // scores on bf16 dot products (score_bf16)
  team::Grabs grabs(batch * kv_heads, 1);
  team::run([&] {
    std::vector<float> scores;
    std::vector<int64_t> context;
    for (int64_t task, end; grabs.next(task, end);) {
      const int64_t b = task / kv_heads, h = task % kv_heads, len = lengths[b], padded = (len + 15) / 16 * 16;
      const TC* k_head = cache + h * slots * dim;
      const TC* v_head = cache + (kv_heads + h) * slots * dim;
      const int64_t* table = blocks + b * width;
      scores.resize(group * padded);
      context.resize(len);  // the context's cache slots, from its block table
      int64_t* slot = context.data();
      for (int64_t j = 0, i = 0; j < len; ++i)
        for (int64_t off = 0; off < block_size && j < len; ++off, ++j) slot[j] = table[i] * block_size + off;
#if defined(__AVX512F__)
      if (dot) {
        if constexpr (kBf16) score_bf16(q + (b * heads + h * group) * dim, k_head, slot, len, group, dim, scale,
                                        padded, scores.data());
      } else {
        // Scores 16 keys at a time: the keys as float32 rows, then per query head 16 dot products whose sums
        // one transposed reduction gathers into one vector (key t in lane t).
        vf qs[kMaxGroup][kMaxChunks];
        for (int64_t g = 0; g < group; ++g)
          for (int64_t c = 0; c < chunks; ++c)
            qs[g][c] = vmul(load16(q + (b * heads + h * group + g) * dim + c * 16), vset(scale));
        alignas(64) float keys[16 * kMaxChunks * 16];
        for (int64_t j0 = 0; j0 < len; j0 += 16) {
          const int64_t n = std::min<int64_t>(16, len - j0);
          for (int64_t j = j0 + 16; j < std::min(len, j0 + 32); ++j)  // the next 16 keys: DRAM latency hides
            prefetch_row(k_head + slot[j] * dim, dim);
          for (int64_t t = 0; t < n; ++t) {
            const int64_t j = j0 + t;
            const TC* k = k_head + slot[j] * dim;
            for (int64_t c = 0; c < chunks; ++c) store16(keys + (t * chunks + c) * 16, load16(k + c * 16));
          }
          for (int64_t g = 0; g < group; ++g) {
            vf acc[16];
            for (int64_t t = 0; t < 16; ++t) {
              acc[t] = vzero();
              if (t < n)
                for (int64_t c = 0; c < chunks; ++c)
                  acc[t] = vfma(qs[g][c], load16(keys + (t * chunks + c) * 16), acc[t]);
            }
            store16(scores.data() + g * padded + j0, sum16(acc));
          }
        }
      }
#else
      alignas(32) float qbuf[kMaxGroup * kMaxChunks * 16];
      for (int64_t g = 0; g < group; ++g)
        for (int64_t c = 0; c < chunks; ++c)
          store16(qbuf + (g * chunks + c) * 16, vmul(load16(q + (b * heads + h * group + g) * dim + c * 16), vset(scale)));
      switch (group) {
        case 1: score_keys<TC, 1>(qbuf, k_head, slot, len, dim, padded, scores.data()); break;
        case 2: score_keys<TC, 2>(qbuf, k_head, slot, len, dim, padded, scores.data()); break;
        case 3: score_keys<TC, 3>(qbuf, k_head, slot, len, dim, padded, scores.data()); break;
        case 4: score_keys<TC, 4>(qbuf, k_head, slot, len, dim, padded, scores.data()); break;
        case 5: score_keys<TC, 5>(qbuf, k_head, slot, len, dim, padded, scores.data()); break;
        case 6: score_keys<TC, 6>(qbuf, k_head, slot, len, dim, padded, scores.data()); break;
        case 7: score_keys<TC, 7>(qbuf, k_head, slot, len, dim, padded, scores.data()); break;
        default: score_keys<TC, 8>(qbuf, k_head, slot, len, dim, padded, scores.data()); break;
      }
#endif
      float inv_sum[kMaxGroup];
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * padded;
        vf top = vset(-INFINITY);
        for (int64_t j = 0; j < padded; j += 16) top = vmax(top, keep_first(load16(s + j), len - j, -INFINITY));
        vf high = vset(vmaxval(top)), total = vzero();
        for (int64_t j = 0; j < padded; j += 16) {
          vf e = keep_first(exp16(vsub(load16(s + j), high)), len - j, 0.0f);
          store16(s + j, e);
          total = vadd(total, e);
        }
        inv_sum[g] = 1.0f / vsum(total);
      }
      T* out_task = out + (b * heads + h * group) * dim;
#if defined(__AVX512F__)
      vf o[kMaxGroup][kMaxChunks];
      for (int64_t g = 0; g < group; ++g)
        for (int64_t c = 0; c < chunks; ++c) o[g][c] = vzero();
      for (int64_t j = 0; j < len; ++j) {
        const TC* v = v_head + slot[j] * dim;
        if (j + 16 < len) prefetch_row(v_head + slot[j + 16] * dim, dim);
        for (int64_t c = 0; c < chunks; ++c) {
          vf vc = load16(v + c * 16);
          for (int64_t g = 0; g < group; ++g)
            o[g][c] = vfma(vset(scores[g * padded + j]), vc, o[g][c]);
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t c = 0; c < chunks; ++c)
          store16(out_task + g * dim + c * 16, vmul(o[g][c], vset(inv_sum[g])));
#else
      switch (group) {
        case 1: weigh_values<T, TC, 1>(scores.data(), v_head, slot, len, dim, padded, inv_sum, out_task); break;
        case 2: weigh_values<T, TC, 2>(scores.data(), v_head, slot, len, dim, padded, inv_sum, out_task); break;
        case 3: weigh_values<T, TC, 3>(scores.data(), v_head, slot, len, dim, padded, inv_sum, out_task); break;
        case 4: weigh_values<T, TC, 4>(scores.data(), v_head, slot, len, dim, padded, inv_sum, out_task); break;
        case 5: weigh_values<T, TC, 5>(scores.data(), v_head, slot, len, dim, padded, inv_sum, out_task); break;
        case 6: weigh_values<T, TC, 6>(scores.data(), v_head, slot, len, dim, padded, inv_sum, out_task); break;
        case 7: weigh_values<T, TC, 7>(scores.data(), v_head, slot, len, dim, padded, inv_sum, out_task); break;
        default: weigh_values<T, TC, 8>(scores.data(), v_head, slot, len, dim, padded, inv_sum, out_task); break;
      }
#endif
    }
  });
}

// The shapes of the models we serve get their own unrolled build: SmolLM2 (3 query heads per KV head, head_dim
// 64), Llama / Mistral / Mixtral (4 and 128, or 8 and 128).
template <typename T, typename TC>
void decode_any(const T* q, const TC* cache, const int64_t* blocks, const int64_t* lengths, int64_t batch,
                int64_t heads, int64_t kv_heads, int64_t slots, int64_t dim, int64_t width, int64_t block_size,
                float scale, bool bf16_dot, T* out) {
  const int64_t shape = (heads / kv_heads) * 1000 + dim;
  switch (shape) {
    case 3064: return decode<T, TC, 3, 4>(q, cache, blocks, lengths, batch, heads, kv_heads, slots, dim, width, block_size, scale, bf16_dot, out);
    case 4128: return decode<T, TC, 4, 8>(q, cache, blocks, lengths, batch, heads, kv_heads, slots, dim, width, block_size, scale, bf16_dot, out);
    case 8128: return decode<T, TC, 8, 8>(q, cache, blocks, lengths, batch, heads, kv_heads, slots, dim, width, block_size, scale, bf16_dot, out);
    default: return decode<T, TC>(q, cache, blocks, lengths, batch, heads, kv_heads, slots, dim, width, block_size, scale, bf16_dot, out);
  }
}

}  // namespace

// q [B, H, D]; cache [2, KVH, slots, D] of q's dtype (float32 or bfloat16); blocks [B, W] int64 (each
// sequence's block table, padded); lengths [B] int64 (keys per sequence, >= 1). Returns [B, H, D]. bf16_dot:
// the scores of a bfloat16 q and cache on bf16 dot products (the caller checks the CPU has them: AVX-512 BF16);
// taken where head_dim is a multiple of 32, ignored for float32.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& blocks,
                        const at::Tensor& lengths, int64_t block_size, double scale, bool bf16_dot) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && cache.dim() == 4 && cache.is_contiguous(),
              "paged_decode: q [B, H, D] and the cache [2, KVH, slots, D] must be contiguous");
  const bool half_cache = cache.scalar_type() == at::kHalf && q.scalar_type() == at::kFloat;
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() || half_cache,
              "paged_decode: q and the cache must share a dtype (or float32 q over a float16 cache)");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = cache.size(1);
  TORCH_CHECK(dim % 16 == 0 && dim / 16 <= kMaxChunks && heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup,
              "paged_decode: head_dim must be a multiple of 16 up to 256, at most 8 query heads per KV head");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && blocks.is_contiguous() &&
              blocks.size(0) == batch && lengths.size(0) == batch, "paged_decode: blocks [B, W], lengths [B] int64");
#if defined(__AVX512F__)
  bf16_dot = bf16_dot && q.scalar_type() == at::kBFloat16 && dim % 32 == 0;
#else
  TORCH_CHECK(!bf16_dot, "paged_decode: bf16 dot products need the AVX-512 build");
#endif
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kBFloat16) {
    decode_any(q.data_ptr<at::BFloat16>(), cache.data_ptr<at::BFloat16>(), blocks.data_ptr<int64_t>(),
           lengths.data_ptr<int64_t>(), batch, heads, kv_heads, cache.size(2), dim, blocks.size(1), block_size,
           static_cast<float>(scale), bf16_dot, out.data_ptr<at::BFloat16>());
  } else if (half_cache) {
    decode_any(q.data_ptr<float>(), cache.data_ptr<at::Half>(), blocks.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
           batch, heads, kv_heads, cache.size(2), dim, blocks.size(1), block_size, static_cast<float>(scale),
           false, out.data_ptr<float>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode: float32 or bfloat16");
    decode_any(q.data_ptr<float>(), cache.data_ptr<float>(), blocks.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
           batch, heads, kv_heads, cache.size(2), dim, blocks.size(1), block_size, static_cast<float>(scale),
           false, out.data_ptr<float>());
  }
  return out;
}
