#!/usr/bin/env -S sh -c 'exec "$(dirname "$0")/../.venv/bin/python" "$0" "$@"'
"""Engine-only throughput, in process (no Triton): B prompts generated together, end of sequence ignored.

    .venv/bin/python scripts/bench_engine.py --batch 1 16 64 --output build/bench_engine.json
    .venv/bin/python scripts/bench_engine.py --format float32 bfloat16 bfloat16:int8 bfloat16:int4 auto

Prints output tokens/s for each batch size and weight format (DTYPE[:QUANTIZE], see
scalellm/models/formats.py; default: what the engine directory records).  To compare two versions of the
engine, run this script from two checkouts one after the other (PYTHONPATH=<checkout>) in the same session;
docs/benchmarks.md does.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from scalellm.config import CacheConfig, EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.sequence import SamplingParams, Sequence
from scalellm.models.engine_meta import EngineMeta

ROOT = Path(__file__).resolve().parents[1]


def run_batch(engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int, tag: str) -> float:
    """Seconds to generate ``max_tokens`` for each of ``batch`` distinct prompts submitted together."""
    done = threading.Semaphore(0)

    def on_output(out) -> None:
        if out.finish_reason is not None:
            done.release()

    start = time.perf_counter()
    for i in range(batch):
        prompt = [(7 * i + 13 * j) % 20000 + 100 for j in range(prompt_len)]
        params = SamplingParams(max_tokens=max_tokens, stop_token_ids=())
        engine.submit(Sequence(f"{tag}-{batch}-{i}", prompt, params, on_output))
    for _ in range(batch):
        done.acquire()
    return time.perf_counter() - start


def engine_format(engine_dir: str, spec: str | None) -> tuple[str, str | None]:
    """"bfloat16:int8" -> ("bfloat16", "int8"); None -> the engine directory's recorded dtype and quantize."""
    if spec is None:
        return EngineMeta.read(engine_dir).dtype or EngineConfig.dtype, None
    dtype, _, quantize = spec.partition(":")
    return dtype, quantize or "none"


def bench_format(args: argparse.Namespace, spec: str | None) -> list[dict]:
    dtype, quantize = engine_format(args.engine_dir, spec)
    config = EngineConfig(engine_dir=args.engine_dir, dtype=dtype, cache=CacheConfig(num_blocks=1024),
                          num_threads=args.threads)
    if quantize is not None:  # an older EngineConfig has no quantize field: compare checkouts with no --format
        config.quantize = quantize
    if args.quantized_prompts:
        config.unquantized_prompts = False
    if args.no_cpu_kernels:
        config.cpu_kernels = False
    start = time.perf_counter()
    engine = LLMEngine(config)
    engine.start()
    run_batch(engine, 2, args.prompt_len, 4, "warmup")
    fmt = getattr(getattr(engine.runner, "format", None), "name", dtype)
    print(f"format {spec or dtype} -> {fmt}: engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    for batch in args.batch:
        seconds = run_batch(engine, batch, args.prompt_len, args.max_tokens, "bench")
        tps = batch * args.max_tokens / seconds
        results.append({"format": spec or dtype, "resolved": fmt, "batch": batch, "seconds": seconds,
                        "output_tokens_per_s": tps})
        print(f"  batch {batch:3d}: {tps:8.1f} output tok/s ({seconds:.1f} s)", flush=True)
    engine.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-dir", default=str(ROOT / "build" / "smollm2" / "engine"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--format", nargs="+", default=[None], metavar="DTYPE[:QUANTIZE]",
                        help="weight formats to run one after the other (default: the engine's recorded one)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 gives stable "
                        "ratios on a loaded machine")
    parser.add_argument("--quantized-prompts", action="store_true",
                        help="quantised formats: prompt tokens as generated ones (EngineConfig.unquantized_prompts)")
    parser.add_argument("--no-cpu-kernels", action="store_true",
                        help="torch's kernels, not ours (EngineConfig.cpu_kernels)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    results = [row for spec in args.format for row in bench_format(args, spec)]
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"engine_dir": args.engine_dir, "threads": args.threads,
                                           "load_average": os.getloadavg(), "prompt_len": args.prompt_len,
                                           "max_tokens": args.max_tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
