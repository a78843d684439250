"""Hugging Face checkpoint -> TensorRT-LLM checkpoint per rank -> TensorRT engines, through the Python API.

What ``convert_checkpoint.py`` + ``trtllm-build`` do, in one process: Mixtral, Llama and Mistral all convert
through ``LLaMAForCausalLM`` (TensorRT-LLM maps MixtralForCausalLM to it).

1. per rank r of ``tp_size``: ``LLaMAForCausalLM.from_hugging_face(hf_dir, dtype, mapping=Mapping(rank=r, ...),
   quant_config=QuantConfig(...))`` and ``save_checkpoint(ckpt_dir, save_config=(r == 0))``; FP8 instead
   calibrates the whole model once with ``LLaMAForCausalLM.quantize(...)`` (ModelOpt), which writes every rank;
2. per rank: ``LLaMAForCausalLM.from_checkpoint(ckpt_dir, rank=r)``, ``tensorrt_llm.build(model,
   BuildConfig(...))``, ``engine.save(engine_dir)``;
3. the TensorRT-LLM and TensorRT versions go into ``engine_dir/scalellm_trtllm.json`` (versions.py).

GPU only, not run on our CPU machines (docs/gpu.md); everything TensorRT-LLM is imported lazily via ``require``.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scalellm.trtllm import PINNED_TRTLLM_VERSION, require
from scalellm.trtllm.options import TrtllmOptions
from scalellm.trtllm.versions import VERSIONS_FILE, Versions, record_versions

CHECKPOINT_SUBDIR = "trtllm_checkpoint"


class RankProgress:
    """One line per rank and stage with its time, and the total: ``[trtllm] build rank 2/4 ... 81.3 s``."""

    def __init__(self, world_size: int, log: Callable[[str], None]) -> None:
        self.world_size, self.log, self.start = world_size, log, time.perf_counter()

    def run(self, stage: str, rank: int | None, work: Callable[[], Any]) -> Any:
        who = "all ranks" if rank is None else f"rank {rank + 1}/{self.world_size}"
        self.log(f"{stage} {who} ...")
        began = time.perf_counter()
        result = work()
        self.log(f"{stage} {who} done in {time.perf_counter() - began:.1f} s "
                 f"(total {time.perf_counter() - self.start:.1f} s)")
        return result


def build_wanted(options: TrtllmOptions, fingerprint: dict[str, Any], hf_config: dict[str, Any]) -> dict[str, Any]:
    """What the engines are built from; a rebuild is skipped when the recorded one is equal (unless --force)."""
    return {"source": fingerprint, "mapping": options.mapping_kwargs(0) | {"rank": None},
            "quant_config": options.quant_config_kwargs(), "dtype": options.dtype,
            "build_config": options.build_config_kwargs(hf_config), "plugin_config": options.plugin_config_kwargs()}


def engines_up_to_date(engine_dir: Path, wanted: dict[str, Any]) -> bool:
    record = engine_dir / VERSIONS_FILE
    if not record.is_file():
        return False
    return json.loads(record.read_text()).get("wanted") == json.loads(json.dumps(wanted))


def build_engines(options: TrtllmOptions, checkpoint: Path, output_dir: Path, hf_config: dict[str, Any],
                  wanted: dict[str, Any], log: Callable[[str], None]) -> Path:
    """Convert and build; returns the engine directory (``output_dir/engine``), written atomically."""
    tensorrt_llm = require("tensorrt_llm")
    tensorrt = require("tensorrt")
    models = require("tensorrt_llm.models")
    QuantConfig = require("tensorrt_llm.models.modeling_utils").QuantConfig  # noqa: N806 - TensorRT-LLM's name
    QuantAlgo = require("tensorrt_llm.quantization").QuantAlgo  # noqa: N806
    PluginConfig = require("tensorrt_llm.plugin").PluginConfig  # noqa: N806
    if tensorrt_llm.__version__ != PINNED_TRTLLM_VERSION:
        log(f"warning: TensorRT-LLM {tensorrt_llm.__version__} here; this path is written for "
            f"{PINNED_TRTLLM_VERSION} (docs/gpu.md)")

    model_class = models.LLaMAForCausalLM
    quant = options.quant_config_kwargs()
    quant_config = QuantConfig(**{k: QuantAlgo[v] if k == "quant_algo" else v for k, v in quant.items()})
    progress = RankProgress(options.world_size, log)
    ckpt_dir = output_dir / CHECKPOINT_SUBDIR
    engine_dir = output_dir / "engine"
    staging = output_dir / ".engine.partial"
    for fresh in (ckpt_dir, staging):  # convert_checkpoint.py also creates the directory before saving into it
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)

    if options.needs_calibration:
        mapping = {k: v for k, v in options.mapping_kwargs(0).items() if k != "rank"}
        progress.run("calibrate+convert (FP8, ModelOpt)", None, lambda: model_class.quantize(
            str(checkpoint), str(ckpt_dir), dtype=options.dtype, mapping=tensorrt_llm.Mapping(**mapping),
            quant_config=quant_config, calib_dataset=options.calib_dataset, calib_batches=options.calib_size))
    else:
        for rank in range(options.world_size):
            def convert(rank: int = rank) -> None:
                model = model_class.from_hugging_face(
                    str(checkpoint), options.dtype, mapping=tensorrt_llm.Mapping(**options.mapping_kwargs(rank)),
                    quant_config=quant_config)
                model.save_checkpoint(str(ckpt_dir), save_config=(rank == 0))
                del model
                gc.collect()
            progress.run("convert", rank, convert)

    for rank in range(options.world_size):
        def build(rank: int = rank) -> None:
            plugin_config = PluginConfig()
            plugin_config.update_from_dict(options.plugin_config_kwargs())
            build_config = tensorrt_llm.BuildConfig(**options.build_config_kwargs(hf_config),
                                                    plugin_config=plugin_config)
            model = model_class.from_checkpoint(str(ckpt_dir), rank=rank)
            engine = tensorrt_llm.build(model, build_config)
            engine.save(str(staging))
            del model, engine
            gc.collect()
        progress.run("build", rank, build)

    command = options.trtllm_build_command(str(ckpt_dir), str(engine_dir), hf_config)
    record_versions(staging, Versions(tensorrt_llm=tensorrt_llm.__version__, tensorrt=tensorrt.__version__),
                    extra={"wanted": wanted, "trtllm_build_equivalent": " ".join(command)})
    if engine_dir.exists():
        shutil.rmtree(engine_dir)
    staging.rename(engine_dir)
    return engine_dir
