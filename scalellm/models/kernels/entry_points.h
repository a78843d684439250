// The kernels' entry points, one or more per source file: what bindings.cpp exposes to Python and what decoder.cpp
// calls in a layer's order.
#pragma once
#include <torch/extension.h>

#include <string>

// q_q8.cpp
at::Tensor q_q8_mm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& d, const at::Tensor& m, int64_t n,
                   int64_t bits);
at::Tensor q_q8_mm_tiles(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& d, const at::Tensor& m,
                         int64_t n, int64_t bits);
std::string tile_unit();
bool q8_tile_check();
// q_f32.cpp, q_bf16.cpp
at::Tensor q_f32_mm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m, int64_t n,
                    int64_t bits);
at::Tensor q_bf16_mm(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m, int64_t n,
                     int64_t bits);
at::Tensor q_bf16_mm_tiles(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& d, const at::Tensor& m,
                           int64_t n, int64_t bits);
bool bf16_tile_check();
// paged_decode.cpp
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& blocks,
                        const at::Tensor& lengths, int64_t block_size, double scale, bool bf16_dot);
// layer_ops.cpp
at::Tensor rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps);
at::Tensor rope_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                   at::Tensor cache, const at::Tensor& slots, int64_t heads, int64_t kv_heads);
at::Tensor silu_mul(const at::Tensor& gate_up);
// argmax.cpp
at::Tensor argmax_rows(const at::Tensor& logits);
// decoder.cpp: the DecoderStack class
void bind_decoder_stack(pybind11::module& module);
