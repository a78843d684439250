"""scalellm_engine.json: one reader and writer, for the torch engine's directory and the GPU build's tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_engine

from scalellm.models.engine_meta import ENGINE_META_FILE, EngineMeta, EngineMetaError, read_record, write_record


def test_what_a_directory_records_reads_back_typed(tmp_path: Path) -> None:
    write_record(tmp_path, {"backend": "tensorrt_llm_pytorch", "max_model_len": 256, "source": "/models/x"})
    assert read_record(tmp_path)["source"] == "/models/x"
    meta = EngineMeta.read(tmp_path)
    assert (meta.backend, meta.max_model_len, meta.dtype, meta.quantize) == ("tensorrt_llm_pytorch", 256, None, "none")


def test_a_directory_without_a_record_has_none(tmp_path: Path) -> None:
    assert read_record(tmp_path) is None
    assert EngineMeta.read(tmp_path) == EngineMeta()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_broken_record_is_an_error_naming_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / ENGINE_META_FILE).write_text(text)
    with pytest.raises(EngineMetaError, match=ENGINE_META_FILE):
        EngineMeta.read(tmp_path)


def test_the_built_engine_records_its_weight_format_and_context() -> None:
    meta = EngineMeta.read(require_engine())
    assert meta.backend == "torch" and meta.dtype in ("float32", "bfloat16", "float16", "auto")
    assert meta.quantize in ("none", "int8", "int4") and meta.max_model_len and meta.max_model_len > 0
