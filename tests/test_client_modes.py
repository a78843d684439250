"""The client against the real tritonserver (session fixture): the chat form, what it learns from the
model's configuration, several sequences, and the README's examples as written.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import ROOT

from scalellm_client import AsyncClient, Client, ScaleLLMError, chatml

if TYPE_CHECKING:
    from conftest import RunningServer

pytestmark = pytest.mark.server

CLIENT_TIMEOUT_S = 180.0
QUESTION = "What is the capital of France?"



def test_chat_form_answers_the_question(client: Client) -> None:
    """``chat=True``: the server's chat template where the ensemble has one, else ChatML on the client."""
    out = client.generate(QUESTION, chat=True, max_tokens=32)
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert "".join(client.stream(QUESTION, chat=True, max_tokens=32)) == out.text
    assert out.text == client.generate(chatml(QUESTION), max_tokens=32).text  # the same prompt either way


def test_async_client_chat_form(server_url: str, protocol: str) -> None:
    async def ask() -> tuple[str, str]:
        async with AsyncClient(server_url, protocol=protocol, timeout_s=CLIENT_TIMEOUT_S) as llm:
            whole = await llm.generate(QUESTION, chat=True, max_tokens=32)
            streamed = "".join([delta async for delta in llm.stream(QUESTION, chat=True, max_tokens=32)])
            return whole.text, streamed

    whole, streamed = asyncio.run(ask())
    assert "Paris" in whole and streamed == whole


def test_streaming_from_a_model_that_is_not_decoupled_is_refused_clearly(server: RunningServer,
                                                                        protocol: str) -> None:
    """``preprocessing`` is a plain (non-decoupled) model: the client reads that from its configuration
    and refuses to stream from it before sending anything."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with Client(url, protocol=protocol, model="preprocessing", timeout_s=CLIENT_TIMEOUT_S) as plain:
        with pytest.raises(ScaleLLMError, match="'preprocessing' is not decoupled.*generate"):
            list(plain.stream("hi"))


def test_cli_chat_answers(server: RunningServer) -> None:
    cli = Path(sys.prefix) / "bin" / "scalellm-client"
    done = subprocess.run([str(cli), "--chat", "--url", server.grpc_url, QUESTION], cwd=ROOT,
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_cli_prints_every_sequence(server: RunningServer) -> None:
    cli = Path(sys.prefix) / "bin" / "scalellm-client"
    done = subprocess.run([str(cli), "--chat", "-n", "2", "--url", server.grpc_url, QUESTION], cwd=ROOT,
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line[:4] for line in lines] == ["[0] ", "[1] "] and all("Paris" in line for line in lines), lines


def test_several_sequences_in_streamed_chunks_and_completions(client: Client) -> None:
    sampling = {"max_tokens": 24, "temperature": 1.0, "seed": 7, "num_return_sequences": 3}
    first = client.generate("Write one sentence about the sea.", chat=True, **sampling)
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert len(set(first.texts)) == 3, first.texts  # each sequence has its own seed offset
    assert client.generate("Write one sentence about the sea.", chat=True, **sampling).texts == first.texts
    greedy = client.generate(QUESTION, chat=True, max_tokens=16, num_return_sequences=3)
    assert len(set(greedy.texts)) == 1 and "Paris" in greedy.text
    chunks = list(client.stream_chunks(QUESTION, chat=True, max_tokens=16, num_return_sequences=3))
    for index in range(3):
        mine = [chunk for chunk in chunks if chunk.index == index]
        assert "".join(chunk.text for chunk in mine) == greedy.texts[index]
        assert mine[-1].finish_reason == "stop"
    with pytest.raises(ValueError, match="num_return_sequences"):
        client.stream(QUESTION, num_return_sequences=3)


def test_token_counts_on_request(client: Client) -> None:
    out = client.generate(QUESTION, chat=True, max_tokens=16, return_num_input_tokens=True,
                          return_num_output_tokens=True)
    assert out.num_input_tokens is not None and out.num_input_tokens > len(QUESTION.split())
    assert 0 < out.num_tokens <= 16


def readme_block(language: str, marker: str) -> str:
    """The README's first ``language`` code block holding ``marker``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(block for block in blocks if marker in block)


def test_readme_curl_example_answers(server: RunningServer) -> None:
    command = readme_block("bash", "curl -s -X POST").splitlines()
    generate = " ".join(line.rstrip("\\").strip() for line in command[:2])
    generate = generate.replace("localhost:8000", server.http_url.removeprefix("http://"))
    done = subprocess.run(["bash", "-c", generate], capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "Paris" in json.loads(done.stdout)["text_output"]


def test_readme_python_example_answers(server: RunningServer) -> None:
    code = readme_block("python", "from scalellm_client").replace("127.0.0.1:8001", server.grpc_url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout.splitlines()[0]
