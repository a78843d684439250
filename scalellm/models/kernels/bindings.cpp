// The Python module of scalellm/models/kernels: one extension, so the heavy headers compile once per file.
#include <torch/extension.h>

at::Tensor q_q8_mm(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& d, const at::Tensor& m_t,
                   int64_t bits);
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& blocks,
                        const at::Tensor& lengths, int64_t block_size, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("q_q8_mm", &q_q8_mm, "int4/int8 weights x activations quantised to int8 per 32-block (AVX-512 VNNI)");
  module.def("paged_decode", &paged_decode, "decode attention over the paged KV cache (AVX-512)");
}
