"""Checkpoint readers: a GGUF file or a Hugging Face directory, read into one shape.

A checkpoint is a GGUF file or a Hugging Face directory (config.json + *.safetensors). Both are read into
the same three things: a full HF config dict, a state dict with HF tensor names, and a tokenizer. Tensor names
pass through untouched, so this module is architecture-agnostic (Llama, Mistral, Mixtral); only a Mixtral GGUF
needs help, from gguf_moe.py, because transformers drops its experts. Writing and reading engine directories
is scalellm/models/engine_dir.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from scalellm.models.engine_meta import EngineMeta

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class Checkpoint:
    """What any checkpoint format is read into."""

    config: dict[str, Any]  # full HF config dict (defaults filled in), model_type + architectures set
    state_dict: dict[str, torch.Tensor]  # HF tensor names
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    generation_config: Any | None  # a transformers GenerationConfig, if one is known
    format: str  # "gguf" | "hf"



def checkpoint_format(path: str | Path) -> str:
    """Return "gguf" for a .gguf file, "hf" for a directory holding config.json."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return "hf"
    raise ValueError(f"{path}: not a .gguf file nor a Hugging Face directory with {CONFIG_FILE}")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a GGUF file or an HF directory."""
    path = Path(path)
    if checkpoint_format(path) == "gguf":
        return load_gguf_checkpoint(path)
    return load_hf_checkpoint(path)


def load_gguf_checkpoint(path: str | Path) -> Checkpoint:
    """Dequantise a GGUF file through transformers (it also un-permutes Llama's q/k rows).

    A Mixtral GGUF (llama architecture with expert_count) loses its experts in transformers: they are read
    by scalellm/models/gguf_moe.py instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scalellm.models import gguf_moe

    path = Path(path).resolve()
    reader = gguf_moe.open_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = _clean_config(model.config.to_dict(), architecture=type(model).__name__)
    state_dict = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    generation_config = model.generation_config
    del model
    if gguf_moe.expert_counts(reader)[0]:
        print("Mixtral GGUF: transformers reads it as a dense Llama (MLPs reported MISSING above are expected); "
              "its experts are read by scalellm.models.gguf_moe", flush=True)
        config, state_dict = gguf_moe.to_mixtral(reader, config, state_dict)
    return Checkpoint(config, state_dict, tokenizer, generation_config, "gguf")


def load_hf_checkpoint(path: str | Path) -> Checkpoint:
    """Read an HF directory's safetensors directly: no model is instantiated."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = Path(path)
    hf_config = AutoConfig.from_pretrained(str(path))
    config = _clean_config(hf_config.to_dict())
    if (path / GENERATION_CONFIG_FILE).is_file():
        generation_config = GenerationConfig.from_pretrained(str(path))
    else:
        generation_config = GenerationConfig.from_model_config(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return Checkpoint(config, read_safetensors_dir(path), tokenizer, generation_config, "hf")


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of an HF directory: those its index names, else model.safetensors, else every
    *.safetensors."""
    index = path / SAFETENSORS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():  # an engine dir also holds weights-int4.safetensors etc.
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    return files


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """Merge all shards of an HF directory into one state dict."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in safetensors_files(Path(path)):
        shard = load_file(str(file))
        duplicates = state_dict.keys() & shard.keys()
        if duplicates:
            raise ValueError(f"{file}: tensors also in another shard: {sorted(duplicates)[:5]}")
        state_dict.update(shard)
    return state_dict


def _clean_config(config: dict[str, Any], architecture: str | None = None) -> dict[str, Any]:
    """Drop where-it-came-from keys; make sure `architectures` is set (GGUF configs leave it None).

    A GGUF load leaves quantization_config={"quant_method": "gguf", ...} behind although the weights are now
    dequantised; keeping it would make transformers treat the engine as a GGUF checkpoint.
    """
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "_model_name_or_path")}
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]
    if architecture and not config.get("architectures"):
        config["architectures"] = [architecture]
    return config



def native_quantize(path: str | Path) -> str:
    """The weight-only format a checkpoint already is: "int4" for a GGUF whose block weights are all Q4_1 (our
    int4 is exactly Q4_1, see scalellm/models/linear.py), an engine directory's recorded one, else "none"."""
    path = Path(path)
    if checkpoint_format(path) == "hf":
        return EngineMeta.read(path).quantize
    from gguf import GGUFReader

    kinds = {t.tensor_type.name for t in GGUFReader(str(path)).tensors
             if t.name.startswith("blk.") and len(t.shape) == 2}
    return "int4" if kinds == {"Q4_1"} else "none"
