"""Our CPU kernels (scalellm/models/kernels) against the torch code they replace, side by side in one run.

    .venv/bin/python scripts/bench_kernels.py --threads 2 --output build/bench-kernels.json

* matmuls at SmolLM2-135M's shapes (qkv, o, gate_up, down in int4; the lm_head in int8) for 1, 8 and 64 rows:
  ``q_q8_mm`` (int8 activations) against what serves without it: on a CPU with native bf16, torch's
  ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` on bf16 activations; elsewhere (AVX2) the float32
  weights' ``F.linear``, and there also ``q_f32_mm`` (the same weights in float32 arithmetic: prompt rows and the
  lm_head on float32 activations; use ``--rows 1 8 64 128``). One layer's weights stay in cache here: in the
  engine, one token streams every layer's weights from memory, so the 1-row ratios are the kernels' compute,
  not what a step gains;
* attention for 64 / 8 / 1 sequences of 100-400 keys scattered over the cache in blocks: ``paged_decode``
  against the gather + matmuls path (scalellm/models/attention.py), in the same activations' dtype.

``--isa avx2`` measures the AVX2 build on an AVX-512 machine (default: the best this CPU runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scalellm.models import kernels
from scalellm.models.attention import decode_attention, decode_bias
from scalellm.models.formats import cpu_has_native_bf16
from scalellm.models.quant import Int4Linear, Int8Linear

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


def bench_matmuls(rows_list: list[int], module, dtype: torch.dtype) -> list[dict]:
    results = []
    for name, cls, n, k in SHAPES:
        torch.manual_seed(0)
        weight = torch.randn(n, k) * 0.05
        theirs, ours = cls.quantize(weight), cls.quantize(weight)
        for linear in (theirs, ours):
            for buffer_name, buffer in linear.named_buffers():
                if buffer.is_floating_point():
                    setattr(linear, buffer_name, buffer.to(dtype))
        f32 = dtype == torch.float32  # prompt rows (and the lm_head) there run on q_f32_mm: time it too
        assert ours.use_q8(f32_rows=f32), "our q_q8_mm does not run here"
        ours.q8_mm = module.q_q8_mm
        if f32:
            ours.f32_mm = module.q_f32_mm
        for rows in rows_list:
            x = torch.randn(rows, k).to(dtype)
            repeat = 5 if name == "lm_head" else 50
            if dtype == torch.bfloat16:
                torch_us = best_us(lambda: theirs.packed_mm(x), repeat)  # noqa: B023
            else:
                torch_us = best_us(lambda: F.linear(x, weight), repeat)  # noqa: B023
            ours_us = best_us(lambda: ours.q8_mm(x, *ours.q8), repeat)  # noqa: B023
            result = {"kind": "matmul", "name": name, "rows": rows, "n": n, "k": k, "torch_us": torch_us,
                      "ours_us": ours_us, "speedup": torch_us / ours_us}
            line = (f"{name:13s} {rows:3d} rows: torch {torch_us:9.1f} us  ours {ours_us:9.1f} us  "
                    f"x{torch_us / ours_us:.2f}")
            if f32:
                f32_us = best_us(lambda: ours.f32_mm(x, *ours.f32), repeat)  # noqa: B023
                result |= {"f32_us": f32_us, "f32_speedup": torch_us / f32_us}
                line += f"  q_f32 {f32_us:9.1f} us  x{torch_us / f32_us:.2f}"
            results.append(result)
            print(line, flush=True)
    return results


def bench_attention(batches: list[int], module, dtype: torch.dtype) -> list[dict]:
    results = []
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

        torch_us = best_us(gathered, 20)
        ours_us = best_us(lambda: module.paged_decode(q, cache, tables, lengths, block, dim**-0.5), 20)  # noqa: B023
        results.append({"kind": "attention", "sequences": batch, "keys": int(lengths.sum()), "torch_us": torch_us,
                        "ours_us": ours_us, "speedup": torch_us / ours_us})
        print(f"attention {batch:3d} sequences: gather+matmuls {torch_us:8.1f} us  ours {ours_us:8.1f} us  "
              f"x{torch_us / ours_us:.2f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--isa", choices=sorted(kernels.ISAS), help="default: the best this CPU runs")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    module = kernels.load(args.isa)
    if module is None:
        raise SystemExit("our kernels do not run here (no AVX2, or no compiler)")
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    print(f"{args.isa or kernels.best_isa()} kernels, {dtype} activations", flush=True)
    results = bench_matmuls(args.rows, module, dtype) + bench_attention(args.sequences, module, dtype)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "unknown")
        args.output.write_text(json.dumps({"cpu": cpu, "isa": args.isa or kernels.best_isa(), "dtype": str(dtype),
                                           "threads": args.threads, "torch": torch.__version__,
                                           "results": results}, indent=2))


if __name__ == "__main__":
    main()
