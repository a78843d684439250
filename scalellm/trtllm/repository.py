"""Render the GPU model repository: our preprocessing/postprocessing, NVIDIA's ``tensorrt_llm`` model (C++
``tensorrtllm`` backend on engines, or our LLM-API Python model), and the GPU ensemble. Needs no TensorRT-LLM.

    OUTPUT/engine/            TensorRT engines (build.py), or nothing for the LLM-API route
    OUTPUT/tokenizer/         tokenizer + HF config.json + scalellm_engine.json for preprocessing/postprocessing
    OUTPUT/model_repository/  preprocessing, postprocessing (copied from model_repository/), tensorrt_llm, ensemble

The ``tensorrt_llm`` template keeps the official placeholder names (tools/fill_template.py's); we fill ours
(``ENGINE_MODEL_DEFAULTS``), ``--param NAME=VALUE`` overrides any of them, and a parameter nobody fills stays
``${name}`` exactly as fill_template leaves it (the backend then uses its default). Anything outside a
``parameters`` value must be filled, or the config would not parse.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalellm.models.engine_meta import write_record
from scalellm.triton.contract import OFFICIAL_LLM_INPUTS, OFFICIAL_LLM_OUTPUTS
from scalellm.triton.render import ensemble_section, io_section
from scalellm.trtllm.options import TrtllmOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_TEMPLATES = REPO_ROOT / "model_repository"
GPU_TEMPLATES = REPO_ROOT / "model_repository_gpu"
ENGINE_SUBDIR = "engine"
TOKENIZER_SUBDIR = "tokenizer"
REPOSITORY_SUBDIR = "model_repository"
ENGINE_MODEL = "tensorrt_llm"
COPIED_MODELS = ("preprocessing", "postprocessing")  # ours, from model_repository/
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                   "generation_config.json")
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
UNSET_PARAMETER = re.compile(r'string_value:\s*"\$\{([A-Za-z_][A-Za-z0-9_]*)\}"')

# Our defaults for the official template (placeholder name -> value). In-flight fused batching, decoupled
# (streaming), the max-utilisation scheduler (packs the batch; may pause a request when KV blocks run out),
# prefix reuse and chunked prefill on, 90% of free GPU memory for KV blocks.
ENGINE_MODEL_DEFAULTS = {
    "triton_backend": "tensorrtllm",
    "decoupled_mode": "true",
    "max_queue_delay_microseconds": "0",
    "max_queue_size": "0",
    "logits_datatype": "TYPE_FP32",
    "batching_strategy": "inflight_fused_batching",
    "max_beam_width": "1",
    "batch_scheduler_policy": "max_utilization",
    "kv_cache_free_gpu_mem_fraction": "0.9",
    "enable_kv_cache_reuse": "true",
    "enable_chunked_context": "true",
    "exclude_input_in_output": "true",
    "cancellation_check_period_ms": "100",
    "normalize_log_probs": "true",
}
# LLM-API route: model.yaml keys taken from --param (same names as the engine model's where they mean the same).
LLM_API_PARAMS = {"kv_cache_free_gpu_mem_fraction": "0.9", "enable_kv_cache_reuse": "true", "hf_model_dir": ""}


class RenderError(ValueError):
    """A template or --param that cannot render; the message names the file and the placeholder."""


@dataclass(frozen=True)
class Rendered:
    models: list[str]
    unset_parameters: list[str]  # tensorrt_llm parameters left to the backend's defaults


def prepare_tokenizer_dir(checkpoint: Path, target: Path, max_model_len: int, backend: str) -> Path:
    """What our preprocessing/postprocessing read: tokenizer files, the HF config.json (end ids, vocabulary) and
    scalellm_engine.json's max_model_len (the engine's max_seq_len: prompt + output)."""
    if not (checkpoint / "tokenizer.json").is_file():
        raise RenderError(f"--checkpoint {checkpoint}: no tokenizer.json (our preprocessing needs a fast tokenizer)")
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, target / name)
    write_record(target, {"backend": backend, "max_model_len": max_model_len, "source": str(checkpoint.resolve())})
    return target


def fill(text: str, values: dict[str, str], where: Path, allow_unset_parameters: bool = False) -> str:
    """Fill ${name}; leftovers are an error, except (for the official template) inside a parameters value."""
    filled = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)
    rest = UNSET_PARAMETER.sub("", filled) if allow_unset_parameters else filled
    leftovers = set(PLACEHOLDER.findall(rest))
    if leftovers:
        raise RenderError(f"{where}: unfilled placeholder(s) {', '.join('${' + n + '}' for n in sorted(leftovers))}"
                          " (give them with --param NAME=VALUE)")
    return filled


def declared_tensors(config_text: str) -> tuple[frozenset[str], frozenset[str]]:
    """The input and output names a config.pbtxt declares (its top-level ``input [...]``/``output [...]``)."""
    found = {}
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[(.*?)^\]", config_text, flags=re.MULTILINE | re.DOTALL)
        found[kind] = frozenset(re.findall(r'name:\s*"([^"]+)"', block.group(1)) if block else [])
    return found["input"], found["output"]


def placeholders(path: Path) -> set[str]:
    return set(PLACEHOLDER.findall(path.read_text())) if path.is_file() else set()


def _copy_model(source: Path, target: Path, values: dict[str, str], name: str | None = None,
                allow_unset: bool = False) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    config = target / "config.pbtxt"
    text = fill(config.read_text(), values, source / "config.pbtxt", allow_unset)
    if name is not None:
        text = re.sub(r'^name:\s*"[^"]*"', f'name: "{name}"', text, count=1, flags=re.MULTILINE)
    config.write_text(text)


def render_gpu_repository(options: TrtllmOptions, checkpoint: Path, output_dir: Path, hf_config: dict[str, Any],
                          params: dict[str, str], model_name: str = "ensemble",
                          cpu_templates: Path = CPU_TEMPLATES, gpu_templates: Path = GPU_TEMPLATES,
                          log: Callable[[str], None] = print) -> Rendered:
    """Write OUTPUT/tokenizer/ and OUTPUT/model_repository/ (replaced atomically); returns the model names."""
    output_dir = output_dir.resolve()
    max_seq_len = options.resolved_max_seq_len(hf_config)
    prepare_tokenizer_dir(checkpoint, output_dir / TOKENIZER_SUBDIR, max_seq_len, options.backend)
    batch = str(options.max_batch_size)
    # Our models resolve relative paths against the repository root (scalellm.triton.tensors.resolve_engine_dir).
    ours = {"engine_dir": f"../{TOKENIZER_SUBDIR}", "tokenizer_dir": f"../{TOKENIZER_SUBDIR}",
            "max_batch_size": batch, "triton_max_batch_size": batch, "llm_instance_count": "1",
            "preprocessing_instance_count": "1", "postprocessing_instance_count": "1",
            "max_queue_delay_microseconds": "0", "max_queue_size": "0"}
    engine_template = gpu_templates / ENGINE_MODEL
    # The C++ backend opens gpt_model_path as given (relative to the server's working directory), so it is
    # absolute: where the engines are when this is served (override with --param engine_dir=...).
    engine_values = ENGINE_MODEL_DEFAULTS | {"triton_max_batch_size": batch,
                                             "engine_dir": str(output_dir / ENGINE_SUBDIR)}
    engine_names = placeholders(engine_template / "config.pbtxt")
    our_names = set(ours) | set().union(*(placeholders(cpu_templates / m / "config.pbtxt") for m in COPIED_MODELS))
    llm_api = dict(LLM_API_PARAMS)
    for key, value in params.items():
        if options.backend == "tensorrt_llm" and key in engine_names:
            engine_values[key] = value
        elif options.backend == "tensorrt_llm_pytorch" and key in llm_api:
            llm_api[key] = value
        elif key in our_names:
            ours[key] = value
        else:
            known = sorted((engine_names if options.backend == "tensorrt_llm" else set(llm_api)) | our_names)
            raise RenderError(f"--param {key}: no such placeholder for --backend {options.backend}; known: "
                              f"{', '.join(known)}")

    out_repo = output_dir / REPOSITORY_SUBDIR
    staging = output_dir / f".{REPOSITORY_SUBDIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    unset: list[str] = []
    try:
        for model in COPIED_MODELS:  # their inputs/outputs come from the contract table (scalellm/triton)
            _copy_model(cpu_templates / model, staging / model, {"io": io_section(model), **ours})
        if options.backend == "tensorrt_llm":
            _copy_model(engine_template, staging / ENGINE_MODEL, engine_values, allow_unset=True)
            unset = sorted(set(UNSET_PARAMETER.findall((staging / ENGINE_MODEL / "config.pbtxt").read_text())))
        else:
            _copy_model(gpu_templates / "tensorrt_llm_pytorch", staging / ENGINE_MODEL, ours, name=ENGINE_MODEL)
            write_model_yaml(staging / ENGINE_MODEL / "model.yaml", options, checkpoint, hf_config, llm_api)
        # The ensemble keeps only what the middle model declares (an input no step uses stops it loading).
        inputs, outputs = declared_tensors((staging / ENGINE_MODEL / "config.pbtxt").read_text())
        inputs, outputs = inputs & OFFICIAL_LLM_INPUTS, outputs & OFFICIAL_LLM_OUTPUTS
        wiring = {"io": io_section("ensemble", inputs, outputs),
                  "ensemble_steps": ensemble_section(ENGINE_MODEL, inputs, outputs)}
        _copy_model(gpu_templates / "ensemble", staging / model_name, {**wiring, **ours}, name=model_name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_repo.exists():
        shutil.rmtree(out_repo)
    staging.rename(out_repo)
    if unset:
        log(f"tensorrt_llm parameters left to the backend's defaults: {', '.join(unset)}")
    return Rendered(models=sorted([*COPIED_MODELS, ENGINE_MODEL, model_name]), unset_parameters=unset)


def write_model_yaml(path: Path, options: TrtllmOptions, checkpoint: Path, hf_config: dict[str, Any],
                     llm_api: dict[str, str]) -> None:
    """model.yaml of the LLM-API model: ``LLM()`` arguments from our flags, plus the official triton_config."""
    import yaml  # a dependency of transformers, which the server extras install

    fraction = float(llm_api["kv_cache_free_gpu_mem_fraction"])
    if not 0.0 < fraction <= 1.0:
        raise RenderError(f"--param kv_cache_free_gpu_mem_fraction must be in (0, 1] (got {fraction})")
    reuse = llm_api["enable_kv_cache_reuse"].lower()
    if reuse not in ("true", "false"):
        raise RenderError(f"--param enable_kv_cache_reuse must be true or false (got {reuse!r})")
    model = llm_api["hf_model_dir"] or str(checkpoint.resolve())
    args = options.llm_api_args(model, hf_config, fraction, reuse == "true")
    args["triton_config"] = {"max_batch_size": options.max_batch_size, "decoupled": True}
    header = ("# LLM() arguments for TensorRT-LLM's LLM API (PyTorch backend), rendered by build_engines.py\n"
              "# --backend tensorrt_llm_pytorch; `model` may be relative to the model repository root.\n")
    path.write_text(header + yaml.safe_dump(args, sort_keys=False))
