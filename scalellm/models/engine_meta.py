"""``scalellm_engine.json``: what a directory built by ``build_engines.py`` records about itself.

The torch engine's directory records its weight format (``dtype``, ``quantize``; see formats.py), context length
(``max_model_len``), backend, architecture and where it came from (``engine_dir.save_engine`` writes it); the
TensorRT-LLM build's tokenizer directory records its backend and context length (``trtllm/repository.py``).
This module is the one reader and writer of that file. It imports no torch, so the router and the
pre/postprocessing models read it without loading the model code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENGINE_META_FILE = "scalellm_engine.json"


class EngineMetaError(ValueError):
    """scalellm_engine.json exists but is not a JSON object."""


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """Every key ``directory``'s scalellm_engine.json records, or None if it has none."""
    path = Path(directory) / ENGINE_META_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineMetaError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise EngineMetaError(f"{path} must hold a JSON object (got {type(record).__name__})")
    return record


def write_record(directory: str | Path, record: dict[str, Any]) -> Path:
    path = Path(directory) / ENGINE_META_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class EngineMeta:
    """The recorded facts the serving side reads; what a directory does not record is None (or ``none``)."""

    dtype: str | None = None  # float32 | bfloat16 | float16 | auto
    quantize: str = "none"  # none | int8 | int4
    max_model_len: int | None = None  # prompt + output tokens of one sequence
    backend: str | None = None  # torch | tensorrt_llm | tensorrt_llm_pytorch
    architecture: str | None = None  # the HF model_type: llama, mistral, mixtral

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EngineMeta:
        max_model_len = record.get("max_model_len")
        return cls(dtype=record.get("dtype"), quantize=record.get("quantize") or "none",
                   max_model_len=None if max_model_len is None else int(max_model_len),
                   backend=record.get("backend"), architecture=record.get("architecture"))

    @classmethod
    def read(cls, directory: str | Path) -> EngineMeta:
        """``directory``'s recorded facts (all unset when it records none, e.g. a plain Hugging Face directory)."""
        return cls.from_record(read_record(directory) or {})
