"""Our CPU kernels (scalellm/models/kernels) against the torch code they replace, side by side in one run.

    .venv/bin/python scripts/bench_kernels.py --threads 2 --output build/bench-kernels.json
    SCALELLM_ISA=avx2 .venv/bin/python scripts/bench_kernels.py      # a lower instruction-set level (cpu.py)

* matmuls at SmolLM2-135M's shapes (qkv, o, gate_up, down in int4; the lm_head in int8), for 1, 8 and 64 rows
  (``--rows``), each as a generated token's row runs and as a prompt token's (scalellm/models/linear.py):
  generated: ``q_q8_mm`` (int8 activations) against what serves without our kernels (torch's
  ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` on bf16 activations; on float32 ones, where
  torch's packed kernels take a slow path, the dense weights' ``F.linear``); prompt: the panel kernels
  (``q_bf16_mm`` / ``q_f32_mm``) against the dense weights' ``F.linear`` (oneDNN / MKL). One layer's weights
  stay in cache here: in the engine, one token streams every layer's weights from memory, so the 1-row ratios
  are the kernels' compute, not what a step gains;
* attention for 64 / 8 / 1 sequences of 100-400 keys scattered over the cache in blocks: ``paged_decode``
  against the gather + matmuls path (scalellm/models/attention.py), in the same activations' dtype; with a bf16
  cache on a CPU with bf16 dot products, also ``paged_decode``'s float32 scores (``ours_fma_us``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scalellm.models import cpu, kernels
from scalellm.models.attention import decode_attention, decode_bias
from scalellm.models.formats import cpu_has_native_bf16
from scalellm.models.linear import Int4Linear, Int8Linear, install_matmuls

SHAPES = [("qkv_proj", Int4Linear, 960, 576), ("o_proj", Int4Linear, 576, 576),
          ("gate_up_proj", Int4Linear, 3072, 576), ("down_proj", Int4Linear, 576, 1536),
          ("lm_head", Int8Linear, 49152, 576)]


def best_us(fn, repeat: int) -> float:
    """Best of 3 means of ``repeat`` calls, in microseconds."""
    fn()
    means = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        means.append((time.perf_counter() - start) / repeat * 1e6)
    return min(means)


def bench_matmuls(rows_list: list[int], dtype: torch.dtype) -> list[dict]:
    results = []
    for name, cls, n, k in SHAPES:
        torch.manual_seed(0)
        weight = (torch.randn(n, k) * 0.05).to(dtype)
        theirs, ours = cls.quantize(weight), cls.quantize(weight)
        install_matmuls(theirs, weight, dtype, on_kernels=False, prompts=True, head=name == "lm_head")
        install_matmuls(ours, weight, dtype, on_kernels=True, prompts=True, head=name == "lm_head")
        torch_generated = theirs.generated if dtype == torch.bfloat16 else theirs.prompt  # F.linear on float32
        for rows in rows_list:
            x = torch.randn(rows, k).to(dtype)
            repeat = 5 if name == "lm_head" else 50
            timed = {label: best_us(lambda mm=mm: mm(x), repeat)  # noqa: B023
                     for label, mm in (("torch_generated_us", torch_generated), ("ours_generated_us", ours.generated),
                                       ("torch_prompt_us", theirs.prompt), ("ours_prompt_us", ours.prompt))}
            result = {"kind": "matmul", "name": name, "rows": rows, "n": n, "k": k, **timed,
                      "generated_speedup": timed["torch_generated_us"] / timed["ours_generated_us"],
                      "prompt_speedup": timed["torch_prompt_us"] / timed["ours_prompt_us"]}
            results.append(result)
            print(f"{name:13s} {rows:3d} rows: generated torch {timed['torch_generated_us']:9.1f} us, q_q8 "
                  f"{timed['ours_generated_us']:9.1f} us (x{result['generated_speedup']:.2f});  prompt F.linear "
                  f"{timed['torch_prompt_us']:9.1f} us, panels {timed['ours_prompt_us']:9.1f} us "
                  f"(x{result['prompt_speedup']:.2f})", flush=True)
    return results


def bench_attention(batches: list[int], module, dtype: torch.dtype) -> list[dict]:
    results = []
    bf16_dot = dtype == torch.bfloat16 and kernels.has_bf16_dot()  # what the engine's attention takes
    heads, kv_heads, dim, block, num_blocks = 9, 3, 64, 16, 2048
    for batch in batches:
        torch.manual_seed(0)
        cache = torch.randn(2, kv_heads, num_blocks * block, dim).to(dtype)
        lengths = torch.randint(100, 400, (batch,))
        width = int((lengths.max() + block - 1) // block)
        tables = torch.randperm(num_blocks)[: batch * width].view(batch, width)
        q = torch.randn(batch, heads, dim).to(dtype)
        by_block = cache.view(2, kv_heads, -1, block * dim)
        bias = decode_bias(lengths, width * block)

        def gathered():
            kv = by_block.index_select(2, tables.flatten()).view(2, kv_heads, batch, width * block, dim)  # noqa: B023
            return decode_attention(q, kv[0], kv[1], bias, dim**-0.5)  # noqa: B023

        def ours(bf16_dot: bool) -> float:
            return best_us(lambda: module.paged_decode(q, cache, tables, lengths, block, dim**-0.5, bf16_dot), 20)  # noqa: B023

        torch_us, ours_us = best_us(gathered, 20), ours(bf16_dot)
        result = {"kind": "attention", "sequences": batch, "keys": int(lengths.sum()), "torch_us": torch_us,
                  "ours_us": ours_us, "speedup": torch_us / ours_us, "bf16_dot": bf16_dot}
        line = (f"attention {batch:3d} sequences: gather+matmuls {torch_us:8.1f} us  ours {ours_us:8.1f} us  "
                f"x{torch_us / ours_us:.2f}")
        if bf16_dot:  # the float32 multiply-adds it replaces, in the same run
            result["ours_fma_us"] = ours(False)
            line += f"  (scores on float32 multiply-adds: {result['ours_fma_us']:8.1f} us)"
        results.append(result)
        print(line, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    module = kernels.load()
    if module is None:
        raise SystemExit("our kernels do not run here (no AVX2, or no compiler)")
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    tiles = module.tile_unit()  # "amx": q_q8_mm takes AMX tiles from 16 rows on
    print(f"{kernels.best_isa()} kernels at level {cpu.level()}, {dtype} activations, tile unit {tiles}", flush=True)
    results = bench_matmuls(args.rows, dtype) + bench_attention(args.sequences, module, dtype)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "unknown")
        args.output.write_text(json.dumps({"cpu": model, "isa": kernels.best_isa(), "level": cpu.level(),
                                           "tile_unit": tiles, "dtype": str(dtype),
                                           "threads": args.threads, "torch": torch.__version__,
                                           "results": results}, indent=2))


if __name__ == "__main__":
    main()
