"""Property-based requests (hypothesis) against the session's real server, over both protocols.

Every ensemble input is drawn from values a hostile or careless client might send: out-of-range numbers,
NaN and infinities, empty and invalid-UTF-8 text, wrong dtypes, odd shapes. Whatever arrives, each
request must end in a success (finish reason "stop" or "length") or a client error with a message
(HTTP 400; over gRPC the error a stream carries), never a server error or a hang; afterwards the server
still answers and every KV-cache block is back in the pool. Examples are bounded so the suite stays fast.

One exception, Triton's and not ours: its HTTP frontend answers a JSON field of the wrong type (a string for
``max_tokens``) with 500 "Unable to parse 'data': ...", before any model sees the request. Front doors
(the router) check types themselves; over gRPC the same request gets a clean data-type error.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpc_aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import ENSEMBLE_DTYPES, NO_PROXY, stream, wait_for_metric

from scalellm_client import chatml

if TYPE_CHECKING:
    from conftest import RunningServer

pytestmark = pytest.mark.server

EXAMPLES = 60  # per protocol; each is a real request through the whole ensemble
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -2.5, 1e-9, 1e30, -1e30])
FLOATS = EDGE_FLOATS | st.floats(allow_nan=True, allow_infinity=True, width=32)
SMALL_INTS = st.integers(-3, 8) | st.sampled_from([2**31 - 1, -(2**31), 50_000, 10**6])
WORDS = st.lists(st.text(max_size=12), max_size=4)
TEXT = st.text(max_size=80) | st.sampled_from(["", " ", "\x00", "😀" * 20, chatml("What is 2+2?")])


REQUEST = st.fixed_dictionaries(
    {"text_input": TEXT, "max_tokens": st.integers(-3, 6) | st.sampled_from([2**31 - 1, 100_000])},
    optional={
        "stop_words": WORDS,
        "bad_words": WORDS,
        "end_id": SMALL_INTS,
        "pad_id": SMALL_INTS,
        "top_k": SMALL_INTS,
        "top_p": FLOATS,
        "temperature": FLOATS,
        "length_penalty": FLOATS,
        "repetition_penalty": FLOATS,
        "presence_penalty": FLOATS,
        "frequency_penalty": FLOATS,
        "min_tokens": SMALL_INTS,
        "random_seed": st.integers(0, 2**64 - 1),
        "return_log_probs": st.booleans(),
        "exclude_input_in_output": st.booleans(),
        "beam_width": SMALL_INTS,
        "stream": st.booleans(),
    },
)
# A field sent with the wrong dtype (Triton itself must refuse it cleanly).
WRONG_TYPE = st.sampled_from([("max_tokens", "ten"), ("temperature", "hot"), ("stream", 3), ("top_k", 1.5)])

OK_REASONS = ("stop", "length")


def as_arrays(request: dict[str, Any], wrong: tuple[str, Any] | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in request.items():
        if name in ("stop_words", "bad_words"):
            fields[name] = np.asarray([value or [""]], dtype=object)
        elif name == "text_input":
            fields[name] = np.asarray([[value.encode("utf-8", "surrogatepass")]], dtype=object)
        else:
            fields[name] = np.asarray([[value]], dtype=ENSEMBLE_DTYPES[name])
    if wrong is not None:
        name, value = wrong
        fields[name] = np.asarray([[value]])
    return fields


def as_json(request: dict[str, Any], wrong: tuple[str, Any] | None) -> bytes:
    body = dict(request)
    if wrong is not None:
        body[wrong[0]] = wrong[1]
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


def http_post(url: str, body: bytes, endpoint: str) -> tuple[int, str]:
    request = urllib.request.Request(f"{url}/v2/models/ensemble/{endpoint}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=120) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def events_of(text: str) -> list[dict[str, Any]]:
    """The JSON body, or each SSE event of it (generate_stream answers errors as events too)."""
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    return events or [json.loads(text)]


def check_http(status: int, text: str, wrong_type: bool) -> None:
    events = events_of(text)
    assert events, text
    last = events[-1]
    if status != 200:
        assert last.get("error"), text
        if wrong_type and status == 500 and last["error"].startswith("Unable to parse"):
            return  # Triton 2.51's own JSON parser calls a wrongly typed field a server error (see module doc)
        assert status == 400, (status, text)
        return
    if "error" in last:  # an error after the stream began: still a message, never an empty end
        assert last["error"], text
        return
    assert last.get("finish_reason") in OK_REASONS, text


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(request=REQUEST, wrong=st.none() | st.none() | WRONG_TYPE)
def test_fuzzed_http_requests_succeed_or_get_400(server: RunningServer, request: dict, wrong) -> None:
    endpoint = "generate_stream" if request.get("stream") else "generate"
    status, text = http_post(server.http_url, as_json(request, wrong), endpoint)
    check_http(status, text, wrong_type=wrong is not None)


@FUZZ
@given(request=REQUEST, wrong=st.none() | st.none() | WRONG_TYPE)
def test_fuzzed_grpc_requests_succeed_or_get_an_error_message(server: RunningServer, request: dict, wrong) -> None:
    async def once() -> dict[str, Any]:
        client = grpc_aio.InferenceServerClient(server.grpc_url)
        try:
            return await stream(client, as_arrays(request, wrong))
        finally:
            await client.close()

    result = asyncio.run(asyncio.wait_for(once(), 180))  # a failed call or a hang fails the test
    if result["error"] is not None:
        assert result["error"] and "engine failed" not in result["error"], result
    else:
        assert result["finish_reason"] in OK_REASONS, result


def test_after_fuzzing_the_server_answers_and_no_kv_block_is_held(server: RunningServer) -> None:
    """Runs after the fuzz tests (file order): nothing they sent left blocks behind or broke the server."""
    status, text = http_post(server.http_url, json.dumps({"text_input": chatml("What is the capital of France?"),
                                                           "max_tokens": 16}).encode(), "generate")
    assert status == 200 and "Paris" in json.loads(text)["text_output"], text
    assert wait_for_metric(server.metrics_url, "scalellm_kv_cache_blocks_used", 0) == 0
    assert wait_for_metric(server.metrics_url, "scalellm_requests_running", 0) == 0
