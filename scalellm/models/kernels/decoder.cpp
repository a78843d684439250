// A dense decoder stack's layers in one call, for a step whose every row takes the generated-token path (a decode
// step; every step when prompts are quantised too). It calls the kernels the Python layers call
// (scalellm/models/llama.py's DecoderLayer with KernelOps and int8 / int4 linears), in the same order, on the same
// tensors, so a row comes out the same bits either way. What it removes is the Python around them: ~10 calls per
// layer, each through pybind and torch's module machinery: a fifth of a step at one sequence (9.8 ms to 7.6 on AVX2).
#include "entry_points.h"

#include <vector>

namespace {

// One linear's q_q8_mm operands, as scalellm/models/linear.py's Q8 holds them.
struct Q8Weights {
  at::Tensor wq, d, m;
  int64_t n, bits;
  at::Tensor operator()(const at::Tensor& x) const { return q_q8_mm(x, wq, d, m, n, bits); }
};

struct Layer {
  at::Tensor input_norm, post_attention_norm;  // RMSNorm weights
  double eps;
  Q8Weights qkv, o, gate_up, down;
};

Q8Weights q8(const pybind11::tuple& t) {
  TORCH_CHECK(t.size() == 5, "DecoderStack: a linear is (wq, d, m, n, bits)");
  return {t[0].cast<at::Tensor>(), t[1].cast<at::Tensor>(), t[2].cast<at::Tensor>(), t[3].cast<int64_t>(),
          t[4].cast<int64_t>()};
}

}  // namespace

class DecoderStack {
 public:
  DecoderStack(int64_t heads, int64_t kv_heads, double scale, bool bf16_dot)
      : heads_(heads), kv_heads_(kv_heads), scale_(scale), bf16_dot_(bf16_dot) {}

  void add_layer(const at::Tensor& input_norm, const at::Tensor& post_attention_norm, double eps,
                 const pybind11::tuple& qkv, const pybind11::tuple& o, const pybind11::tuple& gate_up,
                 const pybind11::tuple& down) {
    layers_.push_back({input_norm, post_attention_norm, eps, q8(qkv), q8(o), q8(gate_up), q8(down)});
  }

  // x [T, H], the residual stream (updated in place and returned); caches: one [2, KVH, slots, D] per layer;
  // cos, sin, positions, slots, blocks, lengths, block_size: as KernelOps.attention passes them on.
  at::Tensor forward(at::Tensor x, const std::vector<at::Tensor>& caches, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& positions, const at::Tensor& slots,
                     const at::Tensor& blocks, const at::Tensor& lengths, int64_t block_size) const {
    TORCH_CHECK(caches.size() == layers_.size(), "DecoderStack: one KV cache per layer");
    const int64_t rows = x.size(0);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      at::Tensor h = rms_norm(x, c10::nullopt, layer.input_norm, layer.eps);
      at::Tensor q = rope_kv(layer.qkv(h), cos, sin, positions, caches[i], slots, heads_, kv_heads_);
      at::Tensor attention = paged_decode(q, caches[i], blocks, lengths, block_size, scale_, bf16_dot_);
      h = rms_norm(x, layer.o(attention.view({rows, -1})), layer.post_attention_norm, layer.eps);
      x.add_(layer.down(silu_mul(layer.gate_up(h))));
    }
    return x;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  int64_t heads_, kv_heads_;
  double scale_;
  bool bf16_dot_;
  std::vector<Layer> layers_;
};

void bind_decoder_stack(pybind11::module& module) {
  // module_local: each instruction set's build is its own module with its own DecoderStack, and a process (the
  // tests) may load several of them.
  pybind11::class_<DecoderStack>(module, "DecoderStack", pybind11::module_local(),
                                 "a dense decoder stack's layers in one call, every row on the generated path")
      .def(pybind11::init<int64_t, int64_t, double, bool>(), pybind11::arg("heads"), pybind11::arg("kv_heads"),
           pybind11::arg("scale"), pybind11::arg("bf16_dot"))
      .def("add_layer", &DecoderStack::add_layer, "a layer: its two norms' weights, eps, and its four linears "
           "as (wq, d, m, n, bits)")
      .def("forward", &DecoderStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "x [T, H] through every layer (in place)")
      .def_property_readonly("num_layers", &DecoderStack::num_layers);
}
