"""The router in front of two real replicas: Triton's protocols and the OpenAI API through it, load split,
prefix-aware routing, cancellation when the client leaves, and a replica killed mid-run.

One module-scoped stack (two tritonservers with a small KV pool, the router as a subprocess) serves every test;
the failover test, which kills a replica, restarts it when done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from conftest import IN_FLIGHT, MODEL_DIR, model_repository, poll, settled
from reliability_support import render_repository
from routerstack import RouterProcess, http_status, metric, scrape, small_model_dir, start_replicas
from transformers import AutoTokenizer
from tritonclient.utils import InferenceServerException

from scalellm.engine.admission import is_retryable
from scalellm.serving import TritonServer
from scalellm.triton.contract import FIELDS
from scalellm_client import AsyncClient, Client, ScaleLLMError

pytestmark = pytest.mark.server
QUESTION = "What is the capital of France?"
CLIENT_TIMEOUT_S = 180.0
# Generating this many tokens takes minutes on CPU: a request still generating after a cancel would be seen.
LONG = 1500


@dataclass
class Stack:
    replicas: list[TritonServer]
    router: RouterProcess
    model_dir: Path
    model: str
    tmp: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model_repository()  # a clear failure when the model is not built
    tmp = tmp_path_factory.mktemp("router")
    model_dir = small_model_dir(MODEL_DIR, tmp)
    replicas = start_replicas(model_dir, 2, tmp)
    router = RouterProcess(replicas, model_dir, tmp / "router.log", args=["--served-model-name", "smollm2"])
    try:
        router.start()
        yield Stack(replicas, router, model_dir, "smollm2", tmp)
    finally:
        router.stop()
        for server in replicas:
            server.stop()
    # Every request is answered or cancelled by now: one still counted in flight was leaked (e.g. a dropped
    # upstream connection that Triton 2.51 never releases) and would hold up a graceful shutdown.
    for server in replicas:
        assert server.log_file is not None
        leaked = [line for line in server.log_file.read_text(errors="replace").splitlines() if IN_FLIGHT.search(line)]
        assert not leaked, f"{server.log_file}: {leaked[0]}"


@pytest.fixture(scope="module")
def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.router.http_url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S,
                         max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(stack: Stack):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(stack.model_dir / "engine"))


def router_metric(stack: Stack, family: str, replica: TritonServer | None = None) -> float:
    labels = {"replica": f"127.0.0.1:{replica.http_port}"} if replica is not None else {}
    return metric(scrape(f"{stack.router.http_url}/metrics"), family, **labels)


def engine_idle_state(stack: Stack) -> list[tuple[float, float]]:
    """(requests running, KV blocks used) of each replica's engine."""
    pages = [scrape(r.metrics_url) for r in stack.replicas]
    return [(metric(p, "scalellm_requests_running"), metric(p, "scalellm_kv_cache_blocks_used")) for p in pages]


def engines_stop_generating(stack: Stack, since: float, timeout_s: float = 10.0, still_s: float = 0.5) -> float:
    """Seconds from ``since`` until the engines' token counters last moved (then held still for ``still_s``)."""
    def tokens() -> float:
        return sum(metric(scrape(r.metrics_url), "scalellm_generation_tokens_total") for r in stack.replicas)

    start = last_change = since
    last = tokens()
    while time.monotonic() - last_change < still_s:
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"the engines still generate {timeout_s} s after the client left")
        time.sleep(0.05)
        now = tokens()
        if now != last:
            last, last_change = now, time.monotonic()
    return last_change - since


def step_engines(stack: Stack) -> None:
    """One short request per replica: the engines publish their gauges from their steps' summaries, and a cancel
    that leaves an engine idle takes no step of its own."""
    for replica in stack.replicas:
        with Client(replica.grpc_url, timeout_s=CLIENT_TIMEOUT_S) as direct:
            direct.generate("Hi", max_tokens=1)


# ---- OpenAI API ------------------------------------------------------------------------------------------
def chat(oai: openai.OpenAI, stack: Stack, **kwargs: object):  # type: ignore[no-untyped-def]
    kwargs = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0.0, "max_tokens": 32,
              **kwargs}
    return oai.chat.completions.create(model=stack.model, **kwargs)


def test_openai_chat_answers_paris_with_exact_usage(oai: openai.OpenAI, stack: Stack, tokenizer) -> None:  # type: ignore[no-untyped-def]
    answer = chat(oai, stack)
    assert answer.choices[0].message.content == "The capital of France is Paris."
    assert answer.choices[0].finish_reason == "stop"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    # The same prompt straight to a replica: the engine's own token count.
    with Client(stack.replicas[0].grpc_url, timeout_s=CLIENT_TIMEOUT_S) as direct:
        expected = direct.generate(prompt, max_tokens=32, temperature=0.0)
    assert expected.text == answer.choices[0].message.content
    assert answer.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert answer.usage.completion_tokens == expected.num_tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_openai_stream_concatenates_to_the_whole_answer(oai: openai.OpenAI, stack: Stack) -> None:
    messages = [{"role": "user", "content": "Write a short poem about the sea, with an emoji."}]
    whole = chat(oai, stack, messages=messages, max_tokens=48)
    chunks = list(chat(oai, stack, messages=messages, max_tokens=48, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_openai_completions_logprobs_stop_seed_and_models(oai: openai.OpenAI, stack: Stack) -> None:
    assert [m.id for m in oai.models.list()] == [stack.model]
    done = oai.completions.create(model=stack.model, prompt="Once upon a time", max_tokens=6, logprobs=0,
                                  temperature=0.0, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 6
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    stopped = chat(oai, stack, stop=["Paris"])
    assert stopped.choices[0].message.content == "The capital of France is"
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [chat(oai, stack, temperature=1.0, seed=1234, max_tokens=16).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_openai_n_returns_n_choices(oai: openai.OpenAI, stack: Stack) -> None:
    """n is the engine's num_return_sequences: one choice per sequence (each its own seed offset), streamed
    chunks tagged with their choice's index, usage summed over the choices."""
    sampling = {"temperature": 1.0, "seed": 7, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    whole = chat(oai, stack, n=3, **sampling)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in whole.choices)
    assert len({c.message.content for c in whole.choices}) == 3, [c.message.content for c in whole.choices]
    assert whole.usage.completion_tokens == 3 * 12
    chunks = list(chat(oai, stack, n=3, stream=True, stream_options={"include_usage": True}, **sampling))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == [c.message.content for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == 3 * 12


def test_a_request_without_max_tokens_gets_the_ensembles_default_through_every_door(
        oai: openai.OpenAI, stack: Stack) -> None:
    """One default max_tokens: the contract table's, whether a request comes through the OpenAI API or Triton's
    protocols, through the router or straight to a replica."""
    openai_tokens = oai.completions.create(model=stack.model, prompt="Once upon a time",
                                           extra_body={"ignore_eos": True}).usage.completion_tokens
    with Client(stack.router.grpc_url, timeout_s=CLIENT_TIMEOUT_S) as routed, \
            Client(stack.replicas[0].http_url, protocol="http", timeout_s=CLIENT_TIMEOUT_S) as direct:
        triton_tokens = {routed.generate("Once upon a time", end_id=-1).num_tokens,
                         direct.generate("Once upon a time", end_id=-1).num_tokens}
    assert {openai_tokens} == triton_tokens == {FIELDS["max_tokens"].default}


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "smollm2"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "model"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model"),
    (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(),
     400, "temperature"),
    (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "n": 65}).encode(), 400, "n"),
    (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                 "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}).encode(), 400, "tools"),
    (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                 "response_format": {"type": "json_object"}}).encode(), 400, "response_format"),
    (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                 "logit_bias": {"42": 10}}).encode(), 400, "logit_bias"),
    (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(),
     400, "max_tokens"),
    (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 100000}).encode(), 400, "max_tokens"),
])
def test_openai_bad_input_gets_an_openai_error(stack: Stack, body: bytes, status: int, param: str | None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.router.http_port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == status, error
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


def test_api_key_is_required_when_set(stack: Stack) -> None:
    with RouterProcess(stack.replicas, stack.model_dir, stack.tmp / "router-key.log",
                       args=["--api-key", "sesame", "--served-model-name", stack.model]) as router:
        refused = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            refused.models.list()
        assert http_status(f"{router.http_url}/health") == 200  # probes need no key
        allowed = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="sesame", max_retries=0,
                                timeout=CLIENT_TIMEOUT_S)
        assert "Paris" in chat(allowed, stack).choices[0].message.content
        with pytest.raises(ScaleLLMError, match="API key"), Client(router.http_url, protocol="http") as client:
            client.generate(QUESTION, max_tokens=4)
        grpc_client = grpcclient.InferenceServerClient(router.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match="API key"):
                grpc_client.get_model_metadata("ensemble")
            metadata = grpc_client.get_model_metadata("ensemble", headers={"authorization": "Bearer sesame"})
            assert metadata.name == "ensemble"
        finally:
            grpc_client.close()


# ---- Triton's protocols through the router ----------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_clients_through_the_router(stack: Stack, protocol: str) -> None:
    url = stack.router.grpc_url if protocol == "grpc" else stack.router.http_url
    direct_url = stack.replicas[1].grpc_url if protocol == "grpc" else stack.replicas[1].http_url
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    with Client(url, protocol=protocol, timeout_s=CLIENT_TIMEOUT_S) as client, \
            Client(direct_url, protocol=protocol, timeout_s=CLIENT_TIMEOUT_S) as direct:
        routed = client.generate(prompt, max_tokens=32)
        assert routed.text == "The capital of France is Paris."
        assert routed == direct.generate(prompt, max_tokens=32)
        assert "".join(client.stream(prompt, max_tokens=32)) == routed.text
        with pytest.raises(ScaleLLMError, match="max_tokens"):
            client.generate(prompt, max_tokens=0)


def test_32_concurrent_streams_are_split_between_the_replicas(stack: Stack) -> None:
    before = [router_metric(stack, "scalellm_router_requests_routed_total", r) for r in stack.replicas]

    async def run_all() -> list[str]:
        async with AsyncClient(stack.router.grpc_url, timeout_s=CLIENT_TIMEOUT_S) as client:
            async def one(i: int) -> str:
                return "".join([d async for d in client.stream(f"Request {i}: count to ten.", max_tokens=16,
                                                               end_id=-1)])
            return await asyncio.gather(*(one(i) for i in range(32)))

    texts = asyncio.run(run_all())
    assert all(texts)
    routed = [router_metric(stack, "scalellm_router_requests_routed_total", r) - b
              for r, b in zip(stack.replicas, before, strict=True)]
    assert sum(routed) == 32
    assert all(0.35 * 32 <= n <= 0.65 * 32 for n in routed), routed


def test_prefix_aware_routing_raises_prefix_cache_hits(stack: Stack) -> None:
    """Groups of requests sharing a long system prompt: the prefix policy keeps each group on one replica, so
    its prefix is computed once, where least-tokens alternates replicas and computes it twice."""

    def hits() -> float:
        return settled(lambda: sum(metric(scrape(r.metrics_url), "scalellm_prefix_cache_hit_tokens_total")
                                   for r in stack.replicas))

    def workload(router: RouterProcess, tag: str) -> float:
        start = hits()
        with Client(router.grpc_url, timeout_s=CLIENT_TIMEOUT_S) as client:
            for group in range(3):
                system = f"System {tag}{group}: " + " ".join(f"rule {tag}{group}-{i} is to be kind."
                                                              for i in range(30))
                for question in range(3):
                    client.generate(f"{system}\nQuestion {question}: why?", max_tokens=2)
        return hits() - start

    with RouterProcess(stack.replicas, stack.model_dir, stack.tmp / "router-least.log") as least:
        least_hits = workload(least, "a")
    with RouterProcess(stack.replicas, stack.model_dir, stack.tmp / "router-prefix.log",
                       args=["--policy", "prefix"]) as prefix:
        prefix_hits = workload(prefix, "b")
        assert router_metric_at(prefix, "scalellm_router_prefix_routed_total") >= 6
    print(f"prefix-cache hit tokens, 3 groups x 3 requests: least-tokens {least_hits:.0f}, prefix {prefix_hits:.0f}")
    assert prefix_hits > least_hits, (prefix_hits, least_hits)


def router_metric_at(router: RouterProcess, family: str, **labels: str) -> float:
    return metric(scrape(f"{router.http_url}/metrics"), family, **labels)


# ---- cancellation ----------------------------------------------------------------------------------------
def _read_until_tokens(sock_file, events: int) -> None:  # type: ignore[no-untyped-def]
    seen = 0
    while seen < events:
        line = sock_file.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data:"):
            seen += 1


@pytest.mark.parametrize("api", ["openai", "triton-http", "grpc"])
def test_client_that_leaves_frees_the_engine(stack: Stack, api: str) -> None:
    """A client drops its stream after a few tokens: every engine's running requests and KV blocks go back to
    what they were before it came (the request would otherwise generate for minutes)."""
    idle = poll(lambda: engine_idle_state(stack), lambda state: not any(running for running, _ in state))
    assert all(running == 0 for running, _ in idle)
    cancelled = router_metric(stack, "scalellm_router_requests_cancelled_total")
    if api == "grpc":
        client = grpcclient.InferenceServerClient(stack.router.grpc_url)
        arrivals: list[object] = []
        client.start_stream(callback=lambda result, error: arrivals.append(error or result))
        inputs = []
        for name, value, dtype in (("text_input", [[b"Tell me a long story."]], "BYTES"),
                                   ("max_tokens", [[LONG]], "INT32"), ("end_id", [[-1]], "INT32"),
                                   ("stream", [[True]], "BOOL")):
            array = np.array(value, dtype=object if dtype == "BYTES" else
                             {"INT32": np.int32, "BOOL": np.bool_}[dtype])
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        client.async_stream_infer("ensemble", inputs, request_id="leaving")
        deadline = time.monotonic() + 60
        while len(arrivals) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(arrivals) >= 3, arrivals
        left = time.monotonic()
        client.stop_stream(cancel_requests=True)  # the gRPC stream is cancelled: the client left
        client.close()
    else:
        if api == "openai":
            path = "/v1/completions"
            body = {"model": stack.model, "prompt": "Tell me a long story.", "max_tokens": LONG, "stream": True,
                    "ignore_eos": True}
        else:
            path = "/v2/models/ensemble/generate_stream"
            body = {"text_input": "Tell me a long story.", "max_tokens": LONG, "end_id": -1, "stream": True}
        sock = socket.create_connection(("127.0.0.1", stack.router.http_port), timeout=60)
        payload = json.dumps(body).encode()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        sock_file = sock.makefile("rb")
        _read_until_tokens(sock_file, 3)
        left = time.monotonic()
        sock.shutdown(socket.SHUT_RDWR)  # the client leaves mid-stream
        sock.close()
    stopped = engines_stop_generating(stack, since=left)
    print(f"{api}: the engine's token counter last moved {stopped:.3f} s after the client left")
    step_engines(stack)
    # no request running, every KV block back (once published: every 0.2 s)
    assert poll(lambda: engine_idle_state(stack), lambda state: state == idle) == idle
    assert router_metric(stack, "scalellm_router_requests_cancelled_total") == cancelled + 1


# ---- overload ----------------------------------------------------------------------------------------------
HOLDING = 1500  # tokens of a stream that holds its slot for the rest of a test (minutes on CPU); then cancelled


@contextlib.contextmanager
def holding(router: RouterProcess, count: int) -> Iterator[None]:
    """``count`` raw Triton HTTP streams through ``router``, each past its first token (so holding a slot);
    dropped on exit, which stops them in the engines."""
    socks = []
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", router.http_port), timeout=CLIENT_TIMEOUT_S)
            socks.append(sock)
            payload = json.dumps({"text_input": f"Holder {i}: tell me a long story.", "max_tokens": HOLDING,
                                  "end_id": -1, "stream": True}).encode()
            sock.sendall(b"POST /v2/models/ensemble/generate_stream HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
            _read_until_tokens(sock.makefile("rb"), 1)
        yield
    finally:
        for sock in socks:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def post(router: RouterProcess, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", router.http_port, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def grpc_stream_error(router: RouterProcess, prompt: str) -> str:
    """The error the router's gRPC stream carries for one request (or "" if it was answered)."""
    client = grpcclient.InferenceServerClient(router.grpc_url)
    arrivals: list[object] = []
    client.start_stream(callback=lambda result, error: arrivals.append(error or result))
    try:
        inputs = []
        for name, value, dtype in (("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
                                   ("max_tokens", np.array([[4]], dtype=np.int32), "INT32")):
            tensor = grpcclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        client.async_stream_infer("ensemble", inputs, request_id="overload")
        poll(lambda: list(arrivals), bool, timeout_s=CLIENT_TIMEOUT_S)
    finally:
        client.stop_stream()
        client.close()
    first_arrival = arrivals[0]
    return str(first_arrival) if isinstance(first_arrival, InferenceServerException) else ""


def assert_engines_idle(stack: Stack) -> None:
    step_engines(stack)
    state = poll(lambda: engine_idle_state(stack), lambda s: not any(running or blocks for running, blocks in s),
                 timeout_s=15.0)
    assert state == [(0.0, 0.0)] * len(stack.replicas), state


def test_a_full_router_answers_every_door_at_once_with_retry_after(stack: Stack) -> None:
    """Both replicas' one slot each held, one request waiting in the queue of one: every other request is refused
    at once (OpenAI 429 in its rate-limit shape, Triton HTTP 503, a gRPC error saying "server busy", each telling
    when to retry), and the waiting one is refused when its queue time is up; nothing of theirs ran."""
    args = ["--served-model-name", stack.model, "--replica-slots", "1", "--queue-size", "1", "--queue-timeout", "4"]
    chat_body = {"model": stack.model, "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}]}
    with RouterProcess(stack.replicas, stack.model_dir, stack.tmp / "router-full.log", args=args) as router, \
            holding(router, 2), concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, router, "/v1/chat/completions", chat_body)
        poll(lambda: router_metric_at(router, "scalellm_router_queue_length"), lambda n: n == 1)
        status, headers, body = post(router, "/v1/chat/completions", chat_body)
        error = json.loads(body)["error"]
        assert status == 429, body
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert "server busy" in error["message"]
        assert int(headers["Retry-After"]) >= 1
        infer = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [QUESTION]},
                            {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [4]}]}
        for endpoint, request in (("generate", {"text_input": QUESTION, "max_tokens": 4}),
                                  ("generate_stream", {"text_input": QUESTION, "max_tokens": 4, "stream": True}),
                                  ("infer", infer)):
            status, headers, body = post(router, f"/v2/models/ensemble/{endpoint}", request)
            assert status == 503 and int(headers["Retry-After"]) >= 1, body
            assert is_retryable(json.loads(body)["error"]), body
        grpc_error = grpc_stream_error(router, QUESTION)
        assert is_retryable(grpc_error) and "retry after" in grpc_error, grpc_error
        status, headers, body = waiting.result()
        assert status == 429 and int(headers["Retry-After"]) >= 1, body
        assert "no replica had room" in json.loads(body)["error"]["message"]
        rejected = {reason: router_metric_at(router, "scalellm_router_requests_rejected_total", reason=reason)
                    for reason in ("queue_full", "queue_timeout")}
        assert sum(rejected.values()) == 6 and rejected["queue_timeout"] >= 1, rejected
        assert router_metric_at(router, "scalellm_router_requests_routed_total") == 2  # only the holders ran
        assert router_metric_at(router, "scalellm_router_queue_length") == 0
        assert router_metric_at(router, "scalellm_router_queue_wait_seconds_count") >= 1
    assert_engines_idle(stack)


def test_openai_sdk_retries_ride_out_a_burst_of_three_times_capacity(stack: Stack) -> None:
    """Room for 3 (one slot per replica + a queue of 1), 9 requests at once through the openai SDK with its
    default retries: the 429s carry Retry-After (from the pace the router has seen), the SDK waits that long, and
    every request is answered."""
    args = ["--served-model-name", stack.model, "--replica-slots", "1", "--queue-size", "1"]
    with RouterProcess(stack.replicas, stack.model_dir, stack.tmp / "router-burst.log", args=args) as router:
        sdk = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S)

        def ask(i: int) -> str | None:
            return sdk.chat.completions.create(model=stack.model, max_tokens=4, messages=[
                {"role": "user", "content": f"Question {i}: what is the capital of France?"}]).choices[0].finish_reason

        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # a router in service has seen its pace
            list(pool.map(ask, range(100, 102)))
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            finishes = list(pool.map(ask, range(9)))
        assert all(reason in ("stop", "length") for reason in finishes), finishes
        refused = router_metric_at(router, "scalellm_router_requests_rejected_total")
        assert refused > 0, "the burst never filled the router: nothing was retried"
        print(f"burst of 9 into room for 3: all answered, {refused:.0f} refusals retried by the SDK")
    assert_engines_idle(stack)


def test_request_timeout_ends_the_answer_and_stops_the_engine(stack: Stack) -> None:
    """Past --request-timeout the router stops the request in the engine: an OpenAI stream ends with finish
    reason "length" (the text so far is valid, as at the engine's own deadline), a Triton stream with an error."""
    args = ["--served-model-name", stack.model, "--request-timeout", "3"]
    with RouterProcess(stack.replicas, stack.model_dir, stack.tmp / "router-timeout.log", args=args) as router:
        sdk = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S,
                            max_retries=0)
        chunks = list(sdk.completions.create(model=stack.model, prompt="Tell me a long story.", max_tokens=HOLDING,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
        assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"  # however many came by then
        assert 0 < chunks[-1].usage.completion_tokens < HOLDING  # the timeout, not max_tokens, ended it
        status, _, body = post(router, "/v2/models/ensemble/generate_stream",
                               {"text_input": "Tell me a long story.", "max_tokens": HOLDING, "end_id": -1,
                                "stream": True})
        # an error event after the tokens so far, or a 504 if the time was up before the first one
        assert status in (200, 504) and b"request timeout" in body.rsplit(b"data:", 1)[-1], (status, body[-300:])
        assert router_metric_at(router, "scalellm_router_requests_timed_out_total") == 2
    assert_engines_idle(stack)


def test_a_busy_replica_is_retried_elsewhere_and_a_draining_one_ends_streams_with_an_error(stack: Stack) -> None:
    """A replica whose engine holds one request (max_num_seqs 1, no queue) behind a router told it has 4 slots:
    its "server busy" answers go to the other replica or wait for room, and no client sees one. Then that replica
    drains: an OpenAI stream it runs ends with an error event (not a finish reason OpenAI does not have), and a
    request it refuses as "shutting down" is a 503 with Retry-After."""
    repo = render_repository(stack.tmp / "one-slot", max_num_seqs=1, max_queue_size=0,
                             kv_cache_memory_bytes=64 << 20)
    small = start_replicas(repo.parent, 1, stack.tmp / "one-slot")[0]
    try:
        both = [small, stack.replicas[0]]
        args = ["--served-model-name", stack.model, "--replica-slots", "4"]
        with RouterProcess(both, stack.model_dir, stack.tmp / "router-busy.log", args=args) as router:
            sdk = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S,
                                max_retries=0)  # the router alone must absorb the refusals

            def ask(i: int) -> str:
                return sdk.completions.create(model=stack.model, prompt=f"Request {i}: count to ten.", max_tokens=8,
                                              extra_body={"ignore_eos": True}).choices[0].finish_reason

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                assert list(pool.map(ask, range(8))) == ["length"] * 8
            refused = router_metric_at(router, "scalellm_router_requests_refused_total",
                                       replica=f"127.0.0.1:{small.http_port}")
            assert refused >= 1, "the one-slot replica never said busy"
        with RouterProcess([small], stack.model_dir, stack.tmp / "router-drain.log",
                           args=["--served-model-name", stack.model]) as router:
            sdk = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S,
                                max_retries=0)
            stream = sdk.completions.create(model=stack.model, prompt="Tell me a long story.", max_tokens=HOLDING,
                                            stream=True, extra_body={"ignore_eos": True})
            next(iter(stream))
            small.begin_drain(grace_s=1.0)
            with pytest.raises(openai.APIError, match="shut down"):
                for chunk in stream:
                    assert chunk.choices[0].finish_reason in (None, "stop", "length")
            status, headers, body = post(router, "/v1/completions", {"model": stack.model, "prompt": "Hi",
                                                                     "max_tokens": 2})
            assert status == 503 and int(headers["Retry-After"]) >= 1, body
    finally:
        small.stop()


# ---- failover (kills a replica; keep it last, it restarts the replica when done) ---------------------------
LONG = 384  # tokens of the streams running when a replica is killed: 48 could all finish first once decode got fast


def test_killed_replica_loses_no_unstarted_request(stack: Stack) -> None:
    """Replica 1 is killed once 8 streams (4 on each replica) have their first tokens: the ones it was running
    end with a clear error; 8 requests sent just then, with no token yet, are all answered in full."""
    victim = stack.replicas[1]

    async def run_all() -> tuple[list[tuple[int, str | None]], list[tuple[int, str | None]]]:
        async with AsyncClient(stack.router.http_url, protocol="http", timeout_s=CLIENT_TIMEOUT_S) as client:
            streaming: set[int] = set()
            all_started = asyncio.Event()

            async def one(i: int) -> tuple[int, str | None]:
                tokens = 0
                try:
                    # the first 8 long enough to be still running when the kill lands, however fast the engine
                    async for chunk in client.stream_chunks(f"Request {i}: tell me a story.",
                                                            max_tokens=LONG if i < 8 else 48, end_id=-1):
                        tokens = chunk.num_tokens
                        if tokens and i < 8:
                            streaming.add(i)
                            if len(streaming) == 8:
                                all_started.set()
                except ScaleLLMError as exc:
                    return tokens, str(exc)
                return tokens, None

            first = [asyncio.ensure_future(one(i)) for i in range(8)]
            await all_started.wait()
            victim.kill_group()  # SIGKILL: no goodbye
            later = [asyncio.ensure_future(one(100 + i)) for i in range(8)]
            return list(await asyncio.gather(*first)), list(await asyncio.gather(*later))

    failed_before = router_metric(stack, "scalellm_router_requests_failed_total", victim)
    try:
        started, unstarted = asyncio.run(run_all())
        errors = [error for _, error in started if error is not None]
        assert errors, "no stream was running on the killed replica"
        assert all("failed mid-stream" in error for error in errors), errors
        assert all(tokens == LONG for tokens, error in started if error is None)
        assert unstarted == [(48, None)] * 8  # retried on the live replica where the dead one got them
        assert router_metric(stack, "scalellm_router_requests_failed_total", victim) - failed_before == len(errors)
        assert router_metric(stack, "scalellm_router_replica_healthy", victim) == 0
        print(f"replica killed: {len(errors)} started streams ended with an error, 16 - {len(errors)} answered in "
              f"full, {router_metric(stack, 'scalellm_router_requests_retried_total', victim):.0f} retried")
    finally:
        victim.stop()
        victim.start()
        victim.wait_ready()
