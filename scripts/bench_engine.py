#!/usr/bin/env -S sh -c 'exec "$(dirname "$0")/../.venv/bin/python" "$0" "$@"'
"""Engine-only throughput, in process (no Triton): B prompts generated together, end of sequence ignored.

    .venv/bin/python scripts/bench_engine.py --batch 1 16 64 --output build/bench_engine.json

Prints output tokens/s for each batch size.  To compare two versions of the engine, run this script from
two checkouts one after the other (PYTHONPATH=<checkout>) in the same session; docs/benchmarks.md does.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from scalellm.config import CacheConfig, EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.sequence import SamplingParams, Sequence

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-dir", default=str(ROOT / "build" / "smollm2" / "engine"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(engine_dir=args.engine_dir, cache=CacheConfig(num_blocks=1024)))
    engine.start()
    run_batch(engine, 2, args.prompt_len, 4, "warmup")
    results = []
    for batch in args.batch:
        seconds = run_batch(engine, batch, args.prompt_len, args.max_tokens, "bench")
        tps = batch * args.max_tokens / seconds
        results.append({"batch": batch, "seconds": seconds, "output_tokens_per_s": tps})
        print(f"batch {batch:3d}: {tps:8.1f} output tok/s ({seconds:.1f} s)", flush=True)
    engine.stop()
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"engine_dir": args.engine_dir, "prompt_len": args.prompt_len,
                                           "max_tokens": args.max_tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
