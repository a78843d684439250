// The elementwise parts of a decoder layer, each fused into one call: RMSNorm (with the residual add before it),
// RoPE with the K/V cache write, and SwiGLU's silu(gate) * up. At one token a step is ~1500 small torch ops,
// and their dispatch, not their arithmetic, is most of it; these replace ~35 of them per layer with 4.
// Float32 arithmetic, rounded to the output dtype wherever torch's ops in that dtype round (the bf16 model's
// numbers then stay those of the unfused layer: rounding differently moved greedy answers, e.g. RoPE on float32
// rather than bf16 cos/sin turned a "Paris" into another answer). Every row is computed on its own, the same
// way whatever the number of rows (rows are only split across threads).
#include "simd.h"
#include "team.h"

#include <cmath>

namespace {

using namespace scalellm;

constexpr int64_t kRowsPerThread = 16;  // fewer rows than this per thread: no parallel region (it costs more)

template <typename F>
void for_rows(int64_t rows, int64_t cost_per_row, F&& body) {
  if (rows * cost_per_row < kRowsPerThread * 2048) {
    for (int64_t r = 0; r < rows; ++r) body(r);
    return;
  }
  team::parallel_for(rows, kRowsPerThread / 2, body);  // a preempted thread's rows go to the other
}

template <typename T>
void norm_row(T* x, const T* delta, const T* weight, T* out, int64_t h, float eps) {
  vf acc = vzero();
  for (int64_t c = 0; c < h; c += 16) {
    const int64_t m = h - c;
    if (delta != nullptr) {  // the residual stream as stored (rounded to T), then its norm
      store16(x + c, vadd(load16(x + c, m), load16(delta + c, m)), m);
    }
    vf v = load16(x + c, m);
    acc = vfma(v, v, acc);
  }
  const vf inv = vset(1.0f / std::sqrt(vsum(acc) / static_cast<float>(h) + eps));
  for (int64_t c = 0; c < h; c += 16) {
    const int64_t m = h - c;
    store16(out + c, vmul(round16<T>(vmul(load16(x + c, m), inv)), load16(weight + c, m)), m);
  }
}

template <typename T>
at::Tensor rms_norm_impl(at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps) {
  const int64_t h = x.size(-1), rows = x.numel() / h;
  auto out = at::empty_like(x);
  T* xp = x.data_ptr<T>();
  const T* dp = delta != nullptr ? delta->data_ptr<T>() : nullptr;
  for_rows(rows, h, [&](int64_t r) {
    norm_row(xp + r * h, dp != nullptr ? dp + r * h : nullptr, weight.data_ptr<T>(), out.data_ptr<T>() + r * h, h,
             static_cast<float>(eps));
  });
  return out;
}

template <typename T, typename TC>  // TC: the cache's element type (T, or float16 under float32 activations)
void rope_kv_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                  at::Tensor& cache, const at::Tensor& slots, int64_t heads, int64_t kv_heads, at::Tensor& q) {
  const int64_t rows = qkv.size(0), dim = cache.size(3), half = dim / 2, num_slots = cache.size(2);
  const T* in = qkv.data_ptr<T>();
  TC* kv = cache.data_ptr<TC>();
  T* qp = q.data_ptr<T>();
  const float* cos_table = cos.data_ptr<float>();
  const float* sin_table = sin.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t width = (heads + 2 * kv_heads) * dim;
  for_rows(rows, width, [&](int64_t r) {
    const float* c = cos_table + pos[r] * dim;
    const float* s = sin_table + pos[r] * dim;
    const T* row = in + r * width;
    auto rotate = [&](const T* x, auto* to) {
      for (int64_t i = 0; i < half; i += 16) {  // x * cos + rotate_half(x) * sin, cos and sin in T
        const int64_t m = half - i;
        vf lo = load16(x + i, m), hi = load16(x + half + i, m);
        vf c0 = round16<T>(load16(c + i, m)), s0 = round16<T>(load16(s + i, m));
        vf c1 = round16<T>(load16(c + half + i, m)), s1 = round16<T>(load16(s + half + i, m));
        store16(to + i, vsub(round16<T>(vmul(lo, c0)), round16<T>(vmul(hi, s0))), m);
        store16(to + half + i, vadd(round16<T>(vmul(hi, c1)), round16<T>(vmul(lo, s1))), m);
      }
    };
    for (int64_t head = 0; head < heads; ++head) rotate(row + head * dim, qp + (r * heads + head) * dim);
    for (int64_t head = 0; head < kv_heads; ++head)  // k heads: rotated into the cache
      rotate(row + (heads + head) * dim, kv + (head * num_slots + slot[r]) * dim);
    for (int64_t head = 0; head < kv_heads; ++head) {  // v heads: copied into the cache
      const T* x = row + (heads + kv_heads + head) * dim;
      TC* to = kv + ((kv_heads + head) * num_slots + slot[r]) * dim;
      for (int64_t i = 0; i < dim; i += 16) store16(to + i, load16(x + i, dim - i), dim - i);
    }
  });
}

template <typename T>
at::Tensor silu_mul_impl(const at::Tensor& gate_up) {
  const int64_t inter = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * inter);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inter;
  auto out = at::empty(sizes, gate_up.options());
  const T* in = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for_rows(rows, inter, [&](int64_t r) {
    const T* g = in + r * 2 * inter;
    for (int64_t c = 0; c < inter; c += 16) {
      const int64_t m = inter - c;
      vf gv = load16(g + c, m);
      vf silu = vdiv(gv, vadd(vset(1.0f), exp16(vsub(vzero(), gv))));
      store16(op + r * inter + c, vmul(round16<T>(silu), load16(g + inter + c, m)), m);
    }
  });
  return out;
}

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              what, ": a contiguous float32 or bfloat16 tensor");
}

}  // namespace

// Returns rms_norm(x) * weight; with delta, first x += delta in place (the residual add).
at::Tensor rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm: x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(-1), "rms_norm: weight [H] of x's dtype");
  TORCH_CHECK(!delta.has_value() || (delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type() &&
                                     delta->is_contiguous()), "rms_norm: delta must be like x");
  const at::Tensor* dp = delta.has_value() ? &*delta : nullptr;
  return x.scalar_type() == at::kBFloat16 ? rms_norm_impl<at::BFloat16>(x, dp, weight, eps)
                                          : rms_norm_impl<float>(x, dp, weight, eps);
}

// qkv [T, (H + 2 KVH) * D]; cos, sin float32 [positions, D] (rotate-half layout); positions, slots int64 [T];
// cache [2, KVH, slots, D]. Writes rotated K and V at the slots, returns rotated q [T, H, D].
at::Tensor rope_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                   at::Tensor cache, const at::Tensor& slots, int64_t heads, int64_t kv_heads) {
  check_rows(qkv, "rope_kv: qkv");
  const int64_t dim = cache.size(3);
  const bool half_cache = cache.scalar_type() == at::kHalf && qkv.scalar_type() == at::kFloat;
  TORCH_CHECK(cache.is_contiguous() && (cache.scalar_type() == qkv.scalar_type() || half_cache) && dim % 2 == 0 &&
              qkv.size(1) == (heads + 2 * kv_heads) * dim,
              "rope_kv: cache [2, KVH, slots, D] of qkv's dtype (or float16 under float32)");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.size(1) == dim, "rope_kv: cos / sin float32 [positions, D]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && positions.is_contiguous() &&
              slots.is_contiguous() && positions.numel() == qkv.size(0) && slots.numel() == qkv.size(0),
              "rope_kv: positions and slots int64 [T]");
  auto q = at::empty({qkv.size(0), heads, dim}, qkv.options());
  if (qkv.scalar_type() == at::kBFloat16) rope_kv_impl<at::BFloat16, at::BFloat16>(qkv, cos, sin, positions, cache, slots, heads, kv_heads, q);
  else if (half_cache) rope_kv_impl<float, at::Half>(qkv, cos, sin, positions, cache, slots, heads, kv_heads, q);
  else rope_kv_impl<float, float>(qkv, cos, sin, positions, cache, slots, heads, kv_heads, q);
  return q;
}

// gate_up [..., 2I] (gate, then up) -> silu(gate) * up [..., I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul: gate_up");
  return gate_up.scalar_type() == at::kBFloat16 ? silu_mul_impl<at::BFloat16>(gate_up) : silu_mul_impl<float>(gate_up);
}
