"""``build_engines.py --backend tensorrt_llm | tensorrt_llm_pytorch``: flags, then build (GPU) and render.

build_engines.py only adds these flags and hands over; nothing here imports torch or TensorRT-LLM at import time.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from scalellm.trtllm import BACKENDS, TrtllmUnavailable
from scalellm.trtllm.options import DTYPES, OptionError, TrtllmOptions
from scalellm.trtllm.repository import ENGINE_SUBDIR, REPOSITORY_SUBDIR, RenderError, render_gpu_repository


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TensorRT-LLM (--backend tensorrt_llm | tensorrt_llm_pytorch; GPU, docs/gpu.md)")
    group.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs (one engine rank each)")
    group.add_argument("--moe-tp-size", type=int, default=None,
                       help="MoE: split every expert over this many GPUs (default: tp-size / moe-ep-size)")
    group.add_argument("--moe-ep-size", type=int, default=None,
                       help="MoE: spread the experts over this many GPUs (default: 1); moe-tp × moe-ep = tp")
    group.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per engine step (all requests)")
    group.add_argument("--max-seq-len", type=int, default=None,
                       help="prompt + output tokens per request (default: the checkpoint's max_position_embeddings)")
    group.add_argument("--render-only", action="store_true",
                       help="no conversion or build (no TensorRT-LLM needed): render OUTPUT/model_repository for "
                            "engines in OUTPUT/engine (or --param engine_dir=...) or the LLM-API model")


def options_from_args(args: argparse.Namespace) -> TrtllmOptions:
    dtype = args.dtype if args.dtype in DTYPES else "auto"
    return TrtllmOptions(backend=args.backend, dtype=dtype, tp_size=args.tp_size, moe_tp_size=args.moe_tp_size,
                         moe_ep_size=args.moe_ep_size, quantize=args.quantize or "none",
                         max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                         max_seq_len=args.max_seq_len)


def parse_params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"--param expects NAME=VALUE with NAME an identifier (got {pair!r})")
        params[name] = value
    return params


def read_hf_config(checkpoint: Path) -> dict:
    config = checkpoint / "config.json"
    if not checkpoint.is_dir() or not config.is_file():
        raise SystemExit(f"--checkpoint {checkpoint}: the TensorRT-LLM backends need a Hugging Face checkpoint "
                         "directory (config.json, safetensors, tokenizer.json), not a GGUF file")
    return json.loads(config.read_text())


def fingerprint(checkpoint: Path) -> dict:
    files = sorted(p for p in checkpoint.iterdir() if p.is_file())
    return {"path": str(checkpoint.resolve()), "size": sum(p.stat().st_size for p in files),
            "mtime_ns": max(p.stat().st_mtime_ns for p in files)}


def run(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    assert args.backend in BACKENDS
    hf_config = read_hf_config(args.checkpoint)
    options = options_from_args(args)
    try:
        options.validate(hf_config)
    except OptionError as error:
        raise SystemExit(str(error)) from None
    if options.dtype == "float32":
        log("warning: float32 engines take twice the GPU memory of bfloat16; pass --dtype bfloat16 (docs/gpu.md)")
    params = parse_params(args.param)
    output_dir = args.output_dir.resolve()
    engine_dir = output_dir / ENGINE_SUBDIR
    if args.backend == "tensorrt_llm" and not args.render_only:
        from scalellm.trtllm.build import build_engines, build_wanted, engines_up_to_date

        wanted = build_wanted(options, fingerprint(args.checkpoint), hf_config)
        if not args.force and engines_up_to_date(engine_dir, wanted):
            log(f"engines up to date: {engine_dir} (--force rebuilds)")
        else:
            try:
                build_engines(options, args.checkpoint, output_dir, hf_config, wanted, log=log)
            except TrtllmUnavailable as error:
                raise SystemExit(str(error)) from None
    try:
        rendered = render_gpu_repository(options, args.checkpoint, output_dir, hf_config, params,
                                         model_name=args.model_name, log=log)
    except RenderError as error:
        raise SystemExit(str(error)) from None
    repo = output_dir / REPOSITORY_SUBDIR
    log(f"rendered {repo} [{', '.join(rendered.models)}] for --backend {args.backend}")
    if args.backend == "tensorrt_llm" and not (engine_dir / "config.json").is_file():
        log(f"note: {engine_dir} holds no engines yet; tensorrt_llm will load them from there "
            "(build them on a GPU, or point --param engine_dir=... at built ones)")
    log(f"serve on the GPU machine: python -m scalellm.trtllm.versions --model-repository {repo} && "
        f"tritonserver --model-repository {repo}   (docs/gpu.md)")
    return 0
