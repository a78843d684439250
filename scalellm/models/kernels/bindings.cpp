// The Python module of scalellm/models/kernels: one extension, so the heavy headers compile once per file.
#include <torch/extension.h>

#include "entry_points.h"
#include "team.h"

#include <omp.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

// Our kernels' workers (team.h) and the calling thread's OpenMP workers (torch's ops), not the caller, at this
// nice value; returns how many were set.
int64_t nice_workers(int64_t nice) {
  int64_t done = scalellm::team::set_nice(nice);
#pragma omp parallel reduction(+ : done)
  {
    if (omp_get_thread_num() != 0) done += setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice) == 0;
  }
  return done;
}

// The calling thread's torch ops on ``threads`` OpenMP threads (its own setting, not the process's).
void torch_threads(int64_t threads) {
  at::get_num_threads();  // torch's per-thread setup first, so that it does not undo the next line later
  omp_set_num_threads(static_cast<int>(threads));
}

// The calling thread's kernels on a team of ``threads`` (itself included), its torch ops on itself alone.
void engine_threads(int64_t threads) {
  scalellm::team::set_size(threads);
  torch_threads(1);
}

// Every kernel lets go of the GIL while it runs, as torch's own ops do: the llm model's sender thread turns the
// engine's outputs into Triton responses meanwhile (holding it starved the sender for whole matmuls).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  module.def("q_q8_mm", &q_q8_mm, release(), "int4/int8 weights x activations quantised to int8 per 32-block");
  module.def("q_q8_mm_tiles", &q_q8_mm_tiles, release(), "q_q8_mm with every 16 rows on tiles (AMX or its model)");
  module.def("tile_unit", &tile_unit, "the tile unit the *_tiles functions run on here: amx, model or none");
  module.def("tile_checks", [] { return std::make_pair(q8_tile_check(), bf16_tile_check()); },
             release(), "the first-use checks of the tile unit (int8, bf16): whether it agrees with the reference");
  module.def("q_f32_mm", &q_f32_mm, release(), "panel weights x float32 activations, in float32 (prompt rows)");
  module.def("q_bf16_mm", &q_bf16_mm, release(), "panel weights x bfloat16 activations, bf16 dot products (prompt rows)");
  module.def("q_bf16_mm_tiles", &q_bf16_mm_tiles, release(), "q_bf16_mm with every row on tiles (AMX or its model)");
  module.def("rms_norm", &rms_norm, release(), "RMSNorm of each row (after x += delta in place, with delta)");
  module.def("rope_kv", &rope_kv, release(), "RoPE on q and k, K and V written into the paged cache; returns q");
  module.def("silu_mul", &silu_mul, release(), "silu(gate) * up");
  module.def("engine_threads", &engine_threads, "this thread's kernels on a team of n, its torch ops on itself");
  module.def("torch_threads", &torch_threads, "this thread's torch ops on n OpenMP threads");
  module.def("nice_workers", &nice_workers, "our kernels' workers and the calling thread's OpenMP workers at this nice value");
  module.def("paged_decode", &paged_decode, release(), "attention over the paged KV cache, one query per row",
             pybind11::arg("q"), pybind11::arg("cache"), pybind11::arg("blocks"), pybind11::arg("lengths"),
             pybind11::arg("block_size"), pybind11::arg("scale"), pybind11::arg("bf16_dot") = false);
  module.def("argmax_rows", &argmax_rows, release(), "each row's first maximum (first NaN), as torch.argmax");
  bind_decoder_stack(module);
}
