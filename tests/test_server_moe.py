"""The MoE made from SmolLM2 (every expert a copy of its MLP) answers exactly like the dense model, end to end."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import ENGINE_DIR, ROOT, RunningServer, _start

from scalellm_client import Client
from scalellm_client.chat import chatml

PROMPTS = [
    chatml("What is the capital of France?"),
    chatml("Name three colours of the rainbow."),
    "The history of the printing press begins",
]


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("smollm2-moe4")
    subprocess.run([sys.executable, str(ROOT / "build_engines.py"), "--checkpoint", str(ENGINE_DIR),
                    "--moe-experts", "4", "--output-dir", str(out)], check=True, capture_output=True)
    server = _start(out / "model_repository", out)
    try:
        yield server.grpc_url
    finally:
        server.stop()


def test_moe_copy_of_smollm2_gives_the_dense_text(moe_server: str, server: RunningServer) -> None:
    with Client(server.grpc_url) as dense, Client(moe_server) as moe:
        for prompt in PROMPTS:
            expected = dense.generate(prompt, max_tokens=32)
            got = moe.generate(prompt, max_tokens=32)
            assert got.text == expected.text and got.num_tokens == expected.num_tokens, prompt
            assert got.num_tokens > 0
