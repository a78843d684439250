"""End to end against the real tritonserver (session fixture): real sockets, real model, no mocks.

Decoding is greedy unless a test asks for sampling, so outputs are reproducible; ``end_id=0`` (SmolLM2's
<|endoftext|>, which its chat answers never produce) makes an output run to ``max_tokens``. No timing
assertions: only what a user of the server would notice.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import CLIENT_TIMEOUT_S, NO_PROXY, ROOT

from scalellm_client import AsyncClient, Client, ScaleLLMError, StreamChunk, chatml

if TYPE_CHECKING:
    from conftest import RunningServer

pytestmark = pytest.mark.server


PARIS = chatml("What is the capital of France?")
IGNORE_EOS = {"end_id": 0}
CANCEL_LINE = "cancelled by the client"

# Prompts whose greedy answers hold CJK, emoji, accents, leading spaces and newlines: streamed text must
# equal the non-streamed text byte for byte (no lost spaces, no characters split between deltas).
TRICKY_PROMPTS: list[tuple[str, str, dict]] = [
    ("chinese", chatml("Translate into Chinese: Good morning, how are you?"), {}),
    ("japanese", chatml("Translate into Japanese: I love cherry blossoms."), {}),
    ("emoji", chatml("Repeat exactly: 🎉🚀👍 🎉🚀👍"), IGNORE_EOS),
    ("french", chatml("Write a short sentence using the words: café crème brûlée"), {}),
    ("english-chat", chatml("List three colors separated by spaces."), IGNORE_EOS),
    ("english-plain", "The quick brown fox jumps over", {}),  # a continuation: starts with a space
]


def collect_stream(client: Client, prompt: str, **sampling: object) -> list[StreamChunk]:
    return list(client.stream_chunks(prompt, **sampling))


def assert_well_formed_stream(chunks: list[StreamChunk]) -> None:
    """Only the last response says why generation ended; token counts never go backwards."""
    assert chunks, "a stream must produce at least one response"
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].finish_reason in ("stop", "length")
    counts = [c.num_tokens for c in chunks]
    assert counts == sorted(counts), counts


# ---- answers ----------------------------------------------------------------------------------------------

def test_greedy_answer_names_paris(client: Client) -> None:
    out = client.generate(PARIS, max_tokens=32)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert 0 < out.num_tokens < 32
    assert not out.text.startswith("<|im_start|>") and "system" not in out.text  # prompt not echoed


def test_stream_equals_generate_for_tricky_text(client: Client) -> None:
    """Multi-byte UTF-8, emoji and leading spaces survive streaming, over both protocols."""
    texts = []
    for name, prompt, extra in TRICKY_PROMPTS:
        whole = client.generate(prompt, max_tokens=32, **extra)
        chunks = collect_stream(client, prompt, max_tokens=32, **extra)
        streamed = "".join(c.text for c in chunks)
        assert streamed.encode() == whole.text.encode(), f"{name}: streamed {streamed!r} != {whole.text!r}"
        # Only a character that max_tokens cut in two may end the text as U+FFFD (docs/ensemble.md).
        body = whole.text.removesuffix("\ufffd") if whole.finish_reason == "length" else whole.text
        assert "\ufffd" not in body, f"{name}: replacement character in {whole.text!r}"
        assert_well_formed_stream(chunks)
        assert (chunks[-1].finish_reason, chunks[-1].num_tokens) == (whole.finish_reason, whole.num_tokens)
        texts.append(whole.text)
    wide = [ch for text in texts for ch in text if len(ch.encode()) >= 3]
    assert wide, f"no output holds a multi-byte character, so this test proves nothing: {texts!r}"
    plain = texts[-1]
    assert plain.startswith(" ") and plain.strip(), f"a continuation starts with a space: {plain!r}"


def test_exclude_input_in_output(client: Client) -> None:
    prompt = "Le café crème brûlée est"
    answer = client.generate(prompt, max_tokens=16)
    assert not answer.text.startswith(prompt)
    echoed = client.generate(prompt, max_tokens=16, exclude_input_in_output=False)
    assert echoed.text == prompt + answer.text
    assert echoed.num_tokens == answer.num_tokens  # the echoed prompt is not counted as output
    # As in TensorRT-LLM, a stream never repeats the prompt, whatever exclude_input_in_output says.
    streamed = "".join(client.stream(prompt, max_tokens=16, exclude_input_in_output=False))
    assert streamed == answer.text
    assert "".join(client.stream(prompt, max_tokens=16)) == answer.text


def test_log_probs(client: Client) -> None:
    out = client.generate(PARIS, max_tokens=8, return_log_probs=True)
    assert out.log_probs is not None and len(out.log_probs) == out.num_tokens
    assert all(lp <= 0.0 for lp in out.log_probs)
    assert any(lp < 0.0 for lp in out.log_probs), "greedy log-probs must not all be zero"
    assert out.cum_log_prob == pytest.approx(sum(out.log_probs), rel=1e-4, abs=1e-4)


# ---- many at once ----------------------------------------------------------------------------------------

TOPICS = ["cats", "the ocean", "mountains", "coffee", "rain", "music", "the moon", "bicycles", "bread",
          "winter", "trains", "gardens", "libraries", "volcanoes", "bees", "clocks"]
CONCURRENT_PROMPTS = [chatml(f"Write one sentence about {topic}.") for topic in TOPICS]
CONCURRENT_TOKENS = 24


@pytest.fixture(scope="module")
def alone_outputs(grpc_client: Client) -> list[str]:
    """Each prompt's greedy output with nothing else running (one request at a time)."""
    return [grpc_client.generate(prompt, max_tokens=CONCURRENT_TOKENS, **IGNORE_EOS).text
            for prompt in CONCURRENT_PROMPTS]


def test_concurrent_streams_match_their_output_alone(server_url: str, protocol: str,
                                                     alone_outputs: list[str]) -> None:
    """16 streams batched together each produce exactly what they produce alone."""

    async def run_all() -> list[list[StreamChunk]]:
        async with AsyncClient(server_url, protocol=protocol, timeout_s=CLIENT_TIMEOUT_S) as llm:
            async def one(prompt: str) -> list[StreamChunk]:
                chunks = llm.stream_chunks(prompt, max_tokens=CONCURRENT_TOKENS, **IGNORE_EOS)
                return [chunk async for chunk in chunks]

            return await asyncio.gather(*(one(p) for p in CONCURRENT_PROMPTS))

    results = asyncio.run(run_all())
    assert len(results) == len(CONCURRENT_PROMPTS)
    for topic, chunks, alone in zip(TOPICS, results, alone_outputs, strict=True):
        assert_well_formed_stream(chunks)
        assert (chunks[-1].finish_reason, chunks[-1].num_tokens) == ("length", CONCURRENT_TOKENS), topic
        assert "".join(c.text for c in chunks) == alone, topic


# ---- stopping --------------------------------------------------------------------------------------------

def test_stop_word_ends_the_text_before_it(client: Client) -> None:
    prompt = chatml("Write one sentence about the ocean.")
    full = client.generate(prompt, max_tokens=32)
    words = [w for w in re.findall(r"[A-Za-z]{5,}", full.text)[2:] if full.text.count(w) == 1]
    assert words, f"no usable stop word in {full.text!r}"
    word = words[0]
    stopped = client.generate(prompt, max_tokens=32, stop=[word])
    assert stopped.finish_reason == "stop"
    assert word not in stopped.text
    assert stopped.text.strip(), "the text before the stop word is kept"
    assert full.text.startswith(stopped.text)
    assert full.text[len(stopped.text):].lstrip().startswith(word), (full.text, stopped.text, word)
    assert stopped.num_tokens < full.num_tokens
    for interval in (1, 3):  # 3: responses of several tokens, a stop word's first tokens among them
        streamed = collect_stream(client, prompt, max_tokens=32, stop=[word], stream_interval=interval)
        assert "".join(c.text for c in streamed) == stopped.text  # no part of the stop word leaks out
        assert streamed[-1].finish_reason == "stop"


def test_max_tokens_ends_with_length(client: Client) -> None:
    prompt = chatml("Tell me a long story about a dragon.")
    out = client.generate(prompt, max_tokens=20, **IGNORE_EOS)
    assert (out.num_tokens, out.finish_reason) == (20, "length")
    chunks = collect_stream(client, prompt, max_tokens=20, **IGNORE_EOS)
    assert (chunks[-1].num_tokens, chunks[-1].finish_reason) == (20, "length")
    assert "".join(c.text for c in chunks) == out.text


# ---- sampling --------------------------------------------------------------------------------------------

def test_seed_makes_sampling_reproducible(grpc_client: Client, http_client: Client) -> None:
    prompt = chatml("Write a short poem about the sea.")
    sampling = {"max_tokens": 32, "temperature": 0.9, "top_p": 0.95}
    first = grpc_client.generate(prompt, seed=1234, **sampling).text
    assert http_client.generate(prompt, seed=1234, **sampling).text == first
    assert "".join(grpc_client.stream(prompt, seed=1234, **sampling)) == first
    with ThreadPoolExecutor(3) as pool:  # batched together, each still follows its own seed
        others = list(pool.map(lambda seed: grpc_client.generate(prompt, seed=seed, **sampling).text,
                               (4321, 7, 99)))
    assert len({first, *others}) > 1, f"different seeds, same text: {first!r}"


# ---- cancellation ----------------------------------------------------------------------------------------

def test_cancelled_stream_stops_on_the_server(client: Client, server: RunningServer) -> None:
    """Closing a stream early cancels its request; a stream running beside it is untouched."""
    cancels_before = server.log_text().count(CANCEL_LINE)
    started = threading.Event()

    def neighbour() -> list[StreamChunk]:
        chunks = []
        prompt = chatml("Describe a busy city market.")
        for chunk in client.stream_chunks(prompt, max_tokens=48, **IGNORE_EOS):
            chunks.append(chunk)
            started.set()
        return chunks

    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(neighbour)
        assert started.wait(CLIENT_TIMEOUT_S), "the neighbouring stream never started"
        long_stream = client.stream(chatml("Tell me a very long story about a dragon."), max_tokens=1000,
                                    **IGNORE_EOS)
        deltas = [next(long_stream) for _ in range(3)]
        long_stream.close()
        neighbour_chunks = other.result(timeout=CLIENT_TIMEOUT_S)

    assert "".join(deltas).strip()
    assert (neighbour_chunks[-1].finish_reason, neighbour_chunks[-1].num_tokens) == ("length", 48)
    deadline = time.monotonic() + 10.0
    while server.log_text().count(CANCEL_LINE) <= cancels_before and time.monotonic() < deadline:
        time.sleep(0.2)
    new_lines = [line for line in server.log_text().splitlines() if CANCEL_LINE in line][cancels_before:]
    assert new_lines, f"no new '{CANCEL_LINE}' line in {server.log_file}"
    assert "Paris" in client.generate(PARIS, max_tokens=32).text


# ---- bad input -------------------------------------------------------------------------------------------

# (prompt, sampling, what the error message must contain)
BAD_REQUESTS = [
    ("", {}, ["text_input"]),
    ("hi", {"max_tokens": 0}, ["max_tokens", "0"]),
    ("hi", {"max_tokens": -1}, ["max_tokens", "-1"]),
    ("hi", {"max_tokens": 100000}, ["max_tokens", "100000"]),
    ("hi", {"top_p": -0.5}, ["top_p", "-0.5"]),  # 0 is "off" (TensorRT-LLM), negative is bad
    ("hi", {"top_p": 1.5}, ["top_p", "1.5"]),
    ("hi", {"temperature": -1.0}, ["temperature", "-1"]),
    ("hello " * 3000, {}, ["text_input"]),
    ("hi", {"beam_width": 2}, ["beam_width", "2"]),
    ("hi", {"stream_interval": 0}, ["stream_interval", ">= 1", "0"]),
]


def test_bad_requests_are_rejected_naming_the_field(client: Client, protocol: str) -> None:
    problems = []
    for prompt, sampling, expected in BAD_REQUESTS:
        for mode in ("generate", "stream"):
            label = f"{mode} {prompt[:12]!r} {sampling}"
            try:
                if mode == "generate":
                    client.generate(prompt, **sampling)
                else:
                    list(client.stream(prompt, **sampling))
            except ScaleLLMError as exc:
                missing = [s for s in expected if s not in exc.message]
                if missing:
                    problems.append(f"{label}: message {exc.message!r} lacks {missing}")
                if protocol == "http" and exc.status != 400:
                    problems.append(f"{label}: HTTP status {exc.status}, expected 400")
            else:
                problems.append(f"{label}: accepted")
    assert not problems, "\n".join(problems)
    out = client.generate(PARIS, max_tokens=32)  # the server is still fine
    assert "Paris" in out.text and out.finish_reason == "stop"


def http_post(url: str, body: bytes, accept: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": accept})
    try:
        with NO_PROXY.open(request, timeout=CLIENT_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def grpc_raw(server: RunningServer, text: bytes, max_tokens: int,
             ) -> tuple[grpcclient.InferResult | None, str]:
    """One request with raw BYTES for text_input (what the client, which takes str, cannot send)."""
    arrivals: queue.SimpleQueue = queue.SimpleQueue()
    triton = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = [grpcclient.InferInput("text_input", [1, 1], "BYTES"),
              grpcclient.InferInput("max_tokens", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([[text]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    try:
        triton.start_stream(callback=lambda result, error: arrivals.put((result, error)))
        triton.async_stream_infer("ensemble", inputs)
        result, error = arrivals.get(timeout=CLIENT_TIMEOUT_S)
    finally:
        triton.stop_stream()
        triton.close()
    return result, "" if error is None else error.message()


def test_invalid_utf8_prompt_is_rejected(server: RunningServer) -> None:
    status, body = http_post(f"{server.http_url}/v2/models/ensemble/generate",
                             b'{"text_input": "\xff\xfe", "max_tokens": 4}')
    assert status == 400, body
    assert "text_input" in json.loads(body)["error"]
    result, error = grpc_raw(server, b"\xff\xfe", 4)
    assert result is None and "text_input" in error, error
    result, error = grpc_raw(server, "café".encode(), 4)  # the same path with valid UTF-8 works
    assert error == "" and result is not None


# ---- plain HTTP (what curl users do) ---------------------------------------------------------------------

def test_http_generate_endpoint_with_plain_json(server: RunningServer) -> None:
    body = json.dumps({"text_input": PARIS, "max_tokens": 32}).encode()
    status, raw = http_post(f"{server.http_url}/v2/models/ensemble/generate", body)
    assert status == 200, raw
    answer = json.loads(raw)
    assert "Paris" in answer["text_output"]
    assert answer["finish_reason"] == "stop"
    assert answer["num_output_tokens"] > 0


def test_http_generate_stream_sends_server_sent_events(server: RunningServer) -> None:
    body = json.dumps({"text_input": PARIS, "max_tokens": 32, "stream": True}).encode()
    url = f"{server.http_url}/v2/models/ensemble/generate_stream"
    status, raw = http_post(url, body, accept="text/event-stream")
    assert status == 200, raw
    events = [json.loads(block.removeprefix("data:").strip())
              for block in raw.decode().split("\n\n") if block.strip()]
    assert len(events) > 1, events
    assert [e for e in events[:-1] if "finish_reason" in e] == []  # only the last event says why it ended
    assert events[-1]["finish_reason"] == "stop"
    text = "".join(e["text_output"] for e in events)
    assert "Paris" in text
    whole_body = {"text_input": PARIS, "max_tokens": 32, "exclude_input_in_output": True}
    _, whole = http_post(f"{server.http_url}/v2/models/ensemble/generate", json.dumps(whole_body).encode())
    assert text == json.loads(whole)["text_output"]  # a stream never repeats the prompt (TensorRT-LLM)


# ---- the command line ------------------------------------------------------------------------------------

CLI_MODES = {"grpc": ["--protocol", "grpc"], "grpc-stream": ["--protocol", "grpc", "--stream"],
             "http-stream": ["--protocol", "http", "--stream"]}


@pytest.mark.parametrize("args", list(CLI_MODES.values()), ids=list(CLI_MODES))
def test_cli_answers(server: RunningServer, args: list[str]) -> None:
    cli = Path(sys.prefix) / "bin" / "scalellm-client"
    assert cli.is_file(), f"{cli} missing: is the project installed in this environment?"
    url = server.http_url if "http" in args else server.grpc_url
    done = subprocess.run([str(cli), "--chatml", "--url", url, *args, "--max-tokens", "32",
                           "What is the capital of France?"],
                          cwd=ROOT, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
