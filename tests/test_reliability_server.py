"""Overload, drain and a dying stub, each against its own real tritonserver started by the real launcher.

Each test renders the built repository with the llm limits it needs (see ``reliability_support``) and
runs ``python -m scalellm.serving`` as a child process, as compose would. Timeouts in here only keep a
broken server from hanging the suite; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tritonclient.grpc.aio as grpc_aio
from reliability_support import (
    NO_PROXY,
    STREAM_TIMEOUT_S,
    Launcher,
    metric,
    processes_using,
    render_repository,
    stream,
    stub_pid,
    wait_for_metric,
)

from scalellm.engine.admission import is_retryable
from scalellm_client import chatml

if TYPE_CHECKING:
    from conftest import RunningServer

pytestmark = pytest.mark.server

PROMPTS = [chatml(q) for q in ("What is the capital of France?", "Name a primary color.", "What is 2+2?",
                               "Say hello in Spanish.")]
BUSY = "server busy"


async def until_running(server: Launcher, count: int, tasks: list[asyncio.Task]) -> None:
    """Until ``count`` requests are in the engine; a request that ended first fails the test at once."""
    while metric(server.metrics_url, "scalellm_requests_running") < count:
        done = [t for t in tasks if t.done()]
        assert not done, f"a request ended before all {count} were running: {done[0].result()}"
        await asyncio.sleep(0.1)


@pytest.fixture
def launch(tmp_path: Path):
    """Start launchers on repositories rendered with llm parameters; each is killed (group) at teardown."""
    started: list[Launcher] = []

    def start(*args: str, **llm_params: str | int) -> Launcher:
        root = tmp_path / f"server{len(started)}"
        root.mkdir()
        launcher = Launcher(render_repository(root, **llm_params), root, *args)
        started.append(launcher)
        launcher.wait_ready()
        return launcher

    yield start
    for launcher in started:
        launcher.close()


def test_256_streams_against_64_slots_complete_or_get_busy_and_nothing_leaks(launch) -> None:
    server = launch(max_num_seqs=64, max_queue_size=32, kv_cache_blocks=512)
    # before any request the pool is already published: an idle replica's KV-cache usage is 0/512, not 0/0
    assert metric(server.metrics_url, "scalellm_kv_cache_blocks_total") == 512

    async def run() -> tuple[list[dict], list[dict]]:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            # 24 tokens each: the crowd arrives long before the first 96 finish, so some must be told "busy"
            fields = [{"text_input": p, "max_tokens": 24, "stream": True, "end_id": 0} for p in PROMPTS]
            alone = [await stream(client, f) for f in fields]  # each prompt's answer with the engine to itself
            crowd = await asyncio.gather(*(stream(client, fields[i % len(fields)], request_id=f"crowd-{i}")
                                           for i in range(256)))
            return alone, list(crowd)
        finally:
            await client.close()

    alone, crowd = asyncio.run(asyncio.wait_for(run(), STREAM_TIMEOUT_S))
    assert all(a["finish_reason"] == "length" and a["text"] for a in alone), alone
    served = busy = 0
    for i, result in enumerate(crowd):
        if result["error"] is not None:
            assert BUSY in result["error"] and is_retryable(result["error"]), result
            busy += 1
        else:
            assert (result["text"], result["finish_reason"]) == (alone[i % len(PROMPTS)]["text"], "length"), i
            served += 1
    assert served >= 64 + 32 and busy > 0  # never fewer than the slots + queue served; the rest told to retry
    assert served + busy == 256
    print(f"256 streams against 64 slots + 32 queued: {served} served, {busy} told busy")  # shown with -s
    assert metric(server.metrics_url, "scalellm_requests_rejected_total") == busy
    assert wait_for_metric(server.metrics_url, "scalellm_kv_cache_blocks_used", 0) == 0
    assert metric(server.metrics_url, "scalellm_requests_running") == 0
    assert metric(server.metrics_url, "scalellm_requests_waiting") == 0


def test_sigterm_with_16_in_flight_drains_them_and_exits_0(launch) -> None:
    grace_s = 20
    server = launch(f"--drain-grace={grace_s}", max_num_seqs=16, kv_cache_blocks=256)

    async def run() -> tuple[list[dict], dict]:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            short = [{"text_input": PROMPTS[i % 4], "max_tokens": 32, "stream": True, "end_id": 0} for i in range(8)]
            long = [{"text_input": PROMPTS[i % 4], "max_tokens": 1500, "stream": True, "end_id": 0}
                    for i in range(8)]  # far past the grace period on any CPU
            tasks = [asyncio.create_task(stream(client, f)) for f in short + long]
            await until_running(server, 16, tasks)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            late = await stream(client, short[0])  # refused: the server is shutting down, retry elsewhere
            body = json.dumps({"text_input": PROMPTS[0], "max_tokens": 4}).encode()
            request = urllib.request.Request(f"{server.http_url}/v2/models/ensemble/generate", data=body)
            with pytest.raises(urllib.error.HTTPError) as refused:
                NO_PROXY.open(request, timeout=60)
            # TritonError.UNAVAILABLE, but Triton 2.51's generate endpoint answers every error of a decoupled
            # model with 400: the message is what tells "retry elsewhere" (see admission.is_retryable)
            assert refused.value.code in (400, 503)
            assert is_retryable(json.loads(refused.value.read())["error"])
            return list(await asyncio.gather(*tasks)), late
        finally:
            await client.close()

    results, late = asyncio.run(asyncio.wait_for(run(), STREAM_TIMEOUT_S))
    code = server.wait(timeout_s=grace_s + 60)
    assert code == 0, server.transcript()
    assert [r["error"] for r in results] == [None] * 16, results
    assert [r["finish_reason"] for r in results[:8]] == ["length"] * 8
    assert [r["finish_reason"] for r in results[8:]] == ["shutdown"] * 8
    assert all(r["text"] for r in results[8:])  # what was generated before the deadline is kept
    assert "server shutting down" in (late["error"] or "") and is_retryable(late["error"]), late
    assert processes_using(server.repo) == []


def test_killing_the_llm_stub_fails_the_server_fast_and_no_client_hangs(launch) -> None:
    server = launch(max_num_seqs=8, kv_cache_blocks=256)
    stub = stub_pid(server.repo, "llm")

    async def run() -> list[dict | BaseException]:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            fields = {"text_input": PROMPTS[0], "max_tokens": 1500, "stream": True, "end_id": 0}
            tasks = [asyncio.create_task(stream(client, fields)) for _ in range(4)]
            await until_running(server, 4, tasks)
            os.kill(stub, signal.SIGKILL)
            return list(await asyncio.gather(*tasks, return_exceptions=True))
        finally:
            await client.close()

    results = asyncio.run(asyncio.wait_for(run(), STREAM_TIMEOUT_S))  # every client got an answer: none hangs
    code = server.wait(timeout_s=60)
    assert code == 3, server.transcript()
    assert "Python backend stub exited" in server.output.read_text()
    assert not server.is_ready()
    for result in results:  # each stream ended in an error (connection lost), never in a normal finish
        assert isinstance(result, BaseException) or result["error"] or not result["finish_reason"], result
    deadline = time.monotonic() + 10
    while processes_using(server.repo) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(server.repo) == []


def test_timeout_ms_ends_a_request_with_timeout_and_its_tokens_so_far(server: RunningServer) -> None:
    """``timeout_ms`` on the llm model itself (the ensemble maps it there unchanged): the session's server."""
    fields = {"input_ids": np.asarray([[1, 9690, 314, 253, 1345, 30]], dtype=np.int32),
              "request_output_len": np.asarray([[1500]], dtype=np.int32),
              "end_id": np.asarray([[-1]], dtype=np.int32),
              "streaming": np.asarray([[True]]), "timeout_ms": np.asarray([[1500]], dtype=np.uint64)}
    too_long = dict(fields, timeout_ms=np.asarray([[10**12]], dtype=np.uint64))

    async def run() -> tuple[dict, dict]:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            return await stream(client, fields, model="llm"), await stream(client, too_long, model="llm")
        finally:
            await client.close()

    timed_out, refused = asyncio.run(asyncio.wait_for(run(), STREAM_TIMEOUT_S))
    assert timed_out["error"] is None and timed_out["finish_reason"] == "timeout", timed_out
    assert timed_out["responses"] > 1  # tokens streamed before the deadline
    assert "timeout_ms must be <= 86400000" in (refused["error"] or ""), refused
    assert wait_for_metric(server.metrics_url, "scalellm_kv_cache_blocks_used", 0) == 0
