"""Build an engine from a checkpoint and render a relocatable Triton model repository around it.

    python build_engines.py --checkpoint PATH --output-dir build/smollm2 [--dtype auto|float32|bfloat16]
        [--quantize none|int8|int4] [--max-model-len N] [--model-name ensemble] [--max-batch-size 64]
        [--backend torch|tensorrt_llm|tensorrt_llm_pytorch (GPU: docs/gpu.md)] [--decoupled-mode true|false]
        [--llm-model-name llm]
        [--param name=value ...] [--templates model_repository] [--moe-experts N] [--force]

Writes OUTPUT/engine/ (see scalellm/models/engine_dir.py; weight formats: scalellm/models/formats.py) and
OUTPUT/model_repository/: every model
directory of the templates is copied and the ${name} placeholders in its config.pbtxt are filled in.
Each model's inputs/outputs (${io}) and the ensemble's steps (${ensemble_steps}) are rendered from the
request contract (scalellm/triton/contract.py); the llm's engine parameters default to scalellm/config.py's
values (--param max_num_seqs=32 overrides one).

--decoupled-mode (like tensorrtllm_backend's fill_template decoupled_mode): true (default) serves streaming
(gRPC stream_infer, HTTP generate_stream) and num_return_sequences > 1; false serves plain KServe v2 infer
(HTTP /v2/models/ensemble/infer, gRPC ModelInfer) and HTTP generate, one response per request.
--llm-model-name tensorrt_llm serves the llm model under tensorrtllm_backend's name, for tools that call it
by that name.
${engine_dir} becomes "../engine", a path RELATIVE TO THE MODEL REPOSITORY ROOT, so OUTPUT can be moved or
mounted into a container; the llm model resolves it against the repository root, i.e. the parent of its own
model directory (Path(args["model_repository"]).parent / engine_dir in a Python backend).

--moe-experts N builds a Mixtral engine from a dense Llama/Mistral checkpoint ("sparse upcycling"): every
expert is a copy of the layer's MLP, top-2 routing, and a random router (normal(0, 0.02), fixed seed; see
scalellm/models/upcycle.py). With identical experts the MoE model reproduces the dense model's outputs, which
makes it a test oracle for the MoE path. It is saved in Mixtral's Hugging Face layout (transformers loads it).

The engine is rebuilt only when the checkpoint (path, size, mtime), dtype, backend, max_model_len or
--moe-experts changed,
or with --force; the repository is re-rendered every time (it is cheap).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from scalellm.models.engine_meta import ENGINE_META_FILE
from scalellm.triton.params import default_parameters
from scalellm.triton.render import ensemble_section, io_section
from scalellm.trtllm import cli as trtllm_cli  # TensorRT-LLM backends (imports neither torch nor TensorRT-LLM)

# The engine-building imports (torch, safetensors) happen inside the functions that need them, so that
# `python build_engines.py --help` works without torch.

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_TEMPLATES = REPO_ROOT / "model_repository"
DEFAULT_MAX_MODEL_LEN_CAP = 2048
ENGINE_SUBDIR = "engine"
REPOSITORY_SUBDIR = "model_repository"
ENSEMBLE_TEMPLATE = "ensemble"
LLM_TEMPLATE = "llm"
MOE_TOP_K = 2  # scalellm.models.upcycle.TOP_K
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def log(message: str) -> None:
    print(f"[build_engines] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help=".gguf file or Hugging Face directory")
    parser.add_argument("--output-dir", required=True, type=Path, help="gets engine/ and model_repository/")
    # choices spelled out (scalellm.models.formats holds the same names) so --help needs no torch
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on CPUs with native bf16 (avx512_bf16/AMX), else float32, at load time")
    parser.add_argument("--quantize", default=None, choices=["none", "int8", "int4", "fp8"],
                        help="torch: weight-only int8 (per channel) / int4 (group 32), see scalellm/models/quant.py; "
                        "default: int4 for a Q4_1 GGUF (lossless), an engine dir's own, else none. "
                        "tensorrt_llm: weight-only int8/int4 (W8A16/W4A16) or FP8 (calibrated); default none")
    parser.add_argument("--backend", default="torch", choices=["torch", "tensorrt_llm", "tensorrt_llm_pytorch"],
                        help="engine backend (tensorrt_llm*: GPU, see docs/gpu.md)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help=f"context length; unset: min(max_position_embeddings, {DEFAULT_MAX_MODEL_LEN_CAP})",
    )
    parser.add_argument("--model-name", default=ENSEMBLE_TEMPLATE, help="name the ensemble is served as")
    parser.add_argument("--max-batch-size", type=int, default=64, help="fills ${max_batch_size}")
    parser.add_argument("--decoupled-mode", default="true", choices=["true", "false"],
                        help="true: streaming, several responses per request; false: KServe infer, one response")
    parser.add_argument("--llm-model-name", default=LLM_TEMPLATE,
                        help="name the llm model is served as (tensorrt_llm: tensorrtllm_backend's name)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="fills ${NAME} in the templates (repeatable)",
    )
    parser.add_argument("--templates", type=Path, default=DEFAULT_TEMPLATES, help="templates dir")
    parser.add_argument(
        "--moe-experts",
        type=int,
        default=None,
        metavar="N",
        help="build a Mixtral with N experts, each a copy of the dense MLP (top-2, random router, fixed seed; "
        "see scalellm/models/upcycle.py); outputs equal the dense model's",
    )
    parser.add_argument("--force", action="store_true", help="rebuild the engine even if it is up to date")
    # --- TensorRT-LLM backends (scalellm/trtllm, docs/gpu.md): flags, validated per backend there ---
    trtllm_cli.add_arguments(parser)
    # --- end TensorRT-LLM ---
    return parser.parse_args(argv)


def scalellm_version() -> str:
    """Installed package version, else scalellm.__version__, else pyproject.toml's, else "unknown"."""
    from importlib import metadata

    try:
        return metadata.version("scalellm-triton")
    except metadata.PackageNotFoundError:
        pass
    import scalellm

    if hasattr(scalellm, "__version__"):
        return str(scalellm.__version__)
    pyproject = REPO_ROOT / "pyproject.toml"
    text = pyproject.read_text() if pyproject.is_file() else ""
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else "unknown"


def source_fingerprint(checkpoint: Path) -> dict[str, Any]:
    """Identity of a checkpoint for the up-to-date check: path, total size, newest mtime."""
    from scalellm.models.checkpoint import checkpoint_format

    fmt = checkpoint_format(checkpoint)
    files = [checkpoint] if checkpoint.is_file() else [p for p in checkpoint.iterdir() if p.is_file()]
    stats = [f.stat() for f in files]
    return {
        "source": str(checkpoint.resolve()),
        "format": fmt,
        "source_size": sum(s.st_size for s in stats),
        "source_mtime_ns": max(s.st_mtime_ns for s in stats),
    }


def resolve_max_model_len(requested: int | None, config: dict[str, Any]) -> int:
    """--max-model-len, or min(max_position_embeddings, 2048); never past what the model was trained for."""
    limit = config.get("max_position_embeddings")
    if requested is None:
        return min(limit or DEFAULT_MAX_MODEL_LEN_CAP, DEFAULT_MAX_MODEL_LEN_CAP)
    if requested < 1:
        raise SystemExit(f"--max-model-len must be >= 1 (got {requested})")
    if limit is not None and requested > limit:
        raise SystemExit(f"--max-model-len {requested} exceeds the model's max_position_embeddings {limit}")
    return requested


def engine_up_to_date(engine_dir: Path, wanted: dict[str, Any], max_model_len: int | None) -> bool:
    """True if engine_dir was built from the same checkpoint, dtype, backend and max_model_len (and its packed
    weights in the layout this torch uses on this CPU)."""
    from scalellm.models.engine_dir import load_engine_config, packed_layout, read_engine_meta

    meta = read_engine_meta(engine_dir)
    if meta is None or any(meta.get(key) != value for key, value in wanted.items()):
        return False
    if meta.get("quantize", "none") != "none" and any(meta.get(k) != v for k, v in packed_layout().items()):
        return False
    return meta.get("max_model_len") == resolve_max_model_len(max_model_len, load_engine_config(engine_dir))


def build_torch_engine(args: argparse.Namespace, engine_dir: Path, wanted: dict[str, Any]) -> None:
    """Checkpoint -> HF-format engine directory with converted weights."""
    from scalellm.models import upcycle
    from scalellm.models.checkpoint import load_checkpoint
    from scalellm.models.engine_dir import save_engine

    start = time.perf_counter()
    log(f"reading {wanted['format']} checkpoint {args.checkpoint}")
    checkpoint = load_checkpoint(args.checkpoint)
    max_model_len = resolve_max_model_len(args.max_model_len, checkpoint.config)
    log(
        f"read {len(checkpoint.state_dict)} tensors ({checkpoint.config.get('model_type')}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    config, state_dict = checkpoint.config, checkpoint.state_dict
    if args.moe_experts:
        try:
            config, state_dict = upcycle.upcycle(config, state_dict, args.moe_experts)
        except ValueError as error:
            raise SystemExit(f"--moe-experts: {error}") from None
        log(f"upcycled to a Mixtral: {args.moe_experts} copies of each MLP, top-{upcycle.TOP_K}, random router")
    write_start = time.perf_counter()
    meta = {**wanted, "max_model_len": max_model_len, "built_with": scalellm_version()}
    meta = {key: value for key, value in meta.items() if value is not None}  # dense: no moe_experts_from_dense
    save_engine(
        engine_dir,
        config,
        state_dict,
        checkpoint.tokenizer,
        args.dtype,
        meta,
        checkpoint.generation_config,
        args.quantize,
    )
    log(
        f"wrote {engine_dir} ({args.dtype}, quantize {args.quantize}, max_model_len {max_model_len}) "
        f"in {time.perf_counter() - write_start:.1f}s; engine built in {time.perf_counter() - start:.1f}s"
    )


def parse_params(pairs: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not PLACEHOLDER.fullmatch(f"${{{name}}}"):
            raise SystemExit(f"--param expects NAME=VALUE with NAME an identifier (got {pair!r})")
        params[name] = value
    return params


def substitute(text: str, values: dict[str, str], where: Path) -> str:
    """Fill ${name} placeholders; an unknown one is an error, not a silently broken config."""
    unknown = sorted({name for name in PLACEHOLDER.findall(text) if name not in values})
    if unknown:
        raise SystemExit(
            f"{where}: unknown placeholder(s) {', '.join('${' + n + '}' for n in unknown)}; "
            f"known: {', '.join(sorted(values))} (add more with --param NAME=VALUE)"
        )
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def rename_model(config_text: str, old: str, new: str) -> str:
    """Point a config.pbtxt's top-level `name:` at the model's new directory name."""
    return re.sub(rf'^name:\s*"{re.escape(old)}"', f'name: "{new}"', config_text, flags=re.MULTILINE)


def model_templates(templates: Path) -> list[Path]:
    """The model directories of a templates directory (each becomes one Triton model)."""
    entries = templates.iterdir() if templates.is_dir() else []
    return sorted(p for p in entries if p.is_dir() and not p.name.startswith((".", "__")))


def check_templates(templates: Path, values: dict[str, str]) -> None:
    """Fail on unknown placeholders before minutes go into an engine build."""
    for model_dir in model_templates(templates):
        for config in model_dir.rglob("*.pbtxt"):
            substitute(config.read_text(), model_values(model_dir.name, values), config)


def model_values(template: str, values: dict[str, str]) -> dict[str, str]:
    """values plus the contract's rendering for one template: ${io} and, for the ensemble, ${ensemble_steps}."""
    llm_name = values.get("llm_model_name", LLM_TEMPLATE)
    contract_model = {ENSEMBLE_TEMPLATE: "ensemble", LLM_TEMPLATE: "llm"}.get(template, template)
    rendered = {"ensemble_steps": ensemble_section(llm_name)}
    try:
        rendered["io"] = io_section(contract_model)
    except KeyError:  # a template the contract does not know: it spells out its own inputs/outputs
        pass
    return {**rendered, **values}


def served_name(template: str, values: dict[str, str], model_name: str) -> str:
    if template == ENSEMBLE_TEMPLATE:
        return model_name
    if template == LLM_TEMPLATE:
        return values.get("llm_model_name", LLM_TEMPLATE)
    return template


def render_repository(templates: Path, out_repo: Path, values: dict[str, str], model_name: str) -> list[str]:
    """Copy every model directory of templates into out_repo with its *.pbtxt placeholders filled."""
    from scalellm.models.engine_dir import atomic_directory

    model_dirs = model_templates(templates)
    if not model_dirs:
        log(f"warning: no model templates in {templates}; the model repository is empty")
    names = []
    with atomic_directory(out_repo) as tmp:
        for model_dir in model_dirs:
            name = served_name(model_dir.name, values, model_name)
            target = tmp / name
            shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            for config in target.rglob("*.pbtxt"):
                text = substitute(config.read_text(), model_values(model_dir.name, values),
                                  model_dir / config.relative_to(target))
                if config == target / "config.pbtxt" and name != model_dir.name:
                    text = rename_model(text, model_dir.name, name)
                config.write_text(text)
            names.append(name)
    return names


def template_values(args: argparse.Namespace) -> dict[str, str]:
    values = {
        "engine_dir": f"../{ENGINE_SUBDIR}",  # relative to the model repository root
        "max_batch_size": str(args.max_batch_size),
        "llm_instance_count": "1",
        "decoupled_mode": args.decoupled_mode,
        "llm_model_name": args.llm_model_name,
        **default_parameters(),
    }
    values.update(parse_params(args.param))
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.checkpoint.exists():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file or directory")
    # --- TensorRT-LLM backends: hand over to scalellm/trtllm (GPU build, or --render-only anywhere) ---
    if args.backend in trtllm_cli.BACKENDS:
        args.quantize = args.quantize or "none"
        return trtllm_cli.run(args, log)
    if args.quantize == "fp8" or args.render_only:
        raise SystemExit("--quantize fp8 and --render-only are for --backend tensorrt_llm / tensorrt_llm_pytorch")
    # --- end TensorRT-LLM ---
    if args.max_batch_size < 1:
        raise SystemExit(f"--max-batch-size must be >= 1 (got {args.max_batch_size})")
    if args.moe_experts is not None and args.moe_experts < MOE_TOP_K:
        raise SystemExit(f"--moe-experts must be >= {MOE_TOP_K} (got {args.moe_experts})")
    from scalellm.models.checkpoint import native_quantize
    from scalellm.models.formats import AUTO, dtype_name

    args.dtype = args.dtype if args.dtype == AUTO else dtype_name(args.dtype)
    if args.quantize is None:
        args.quantize = native_quantize(args.checkpoint) if args.dtype != "float32" else "none"
    elif args.quantize != "none" and args.dtype == "float32":
        raise SystemExit(f"--quantize {args.quantize} computes in bfloat16 activations: use --dtype auto or bfloat16")
    values = template_values(args)
    check_templates(args.templates, values)
    try:
        wanted = {**source_fingerprint(args.checkpoint), "backend": args.backend, "dtype": args.dtype,
                  "quantize": args.quantize,
                  "moe_experts_from_dense": args.moe_experts}  # None (dense) matches a meta without the key
    except ValueError as error:
        raise SystemExit(f"--checkpoint {error}") from None
    engine_dir = args.output_dir / ENGINE_SUBDIR

    if not args.force and engine_up_to_date(engine_dir, wanted, args.max_model_len):
        log(f"engine up to date: {engine_dir} ({ENGINE_META_FILE} matches; --force rebuilds)")
    else:
        build_torch_engine(args, engine_dir, wanted)

    start = time.perf_counter()
    out_repo = args.output_dir / REPOSITORY_SUBDIR
    models = render_repository(args.templates, out_repo, values, args.model_name)
    log(f"rendered {out_repo} [{', '.join(models)}] in {time.perf_counter() - start:.2f}s")
    log(f"done: serve with  python -m scalellm.serving --model-repository {out_repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
