"""Every required input of every model, walked from the contract table: a request without it, with it empty, or
with no inputs at all is refused with a 4xx (gRPC INVALID_ARGUMENT, an error on a stream) naming it, over HTTP
generate / generate_stream / infer and gRPC stream_infer / ModelInfer, in the decoupled deployment (the session's
server) and the non-decoupled one (``plain_server``), and the server answers the next request."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import NO_PROXY, RunningServer
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from scalellm.triton.contract import LLM, MODEL_TENSORS, PRE, PRE_INPUTS, Tensor

pytestmark = pytest.mark.server
TIMEOUT_S = 60.0

# A valid value of each required input; the walk fails if the contract gains a required input without one here.
EXAMPLES = {
    "text_input": np.array([[b"Hi"]], dtype=object),
    "QUERY": np.array([[b"Hi"]], dtype=object),
    "input_ids": np.array([[504, 3575]], dtype=np.int32),
    "TOKENS_BATCH": np.array([[[504, 3575]]], dtype=np.int32),
    "SEQUENCE_LENGTH": np.array([[2]], dtype=np.int32),
}
# An optional input each model reads: with it, a request passes Triton's count of inputs and the model must refuse.
COMPANIONS = {"ensemble": "max_tokens", PRE: "REQUEST_OUTPUT_LEN", LLM: "request_output_len",
              "postprocessing": "NUM_OUTPUT_TOKENS"}
REQUIRED = [(model, t) for model, (inputs, _) in MODEL_TENSORS.items() for t in inputs if t.required]


def empty(tensor: Tensor) -> np.ndarray:
    """The input present but empty: an empty string, or no elements along its first variable dimension."""
    if tensor.dtype == "STRING":
        return np.array([[b""]], dtype=object)
    return np.zeros((1, *(0 for _ in tensor.dims)), dtype=np.int32)


def named(tensor: Tensor) -> str:
    """The name a refusal of ``tensor`` must contain: the ensemble field it carries, else its own."""
    return tensor.field or tensor.name


def cases(model: str) -> list[tuple[str, dict[str, np.ndarray], str]]:
    """(what, inputs, the name the refusal must contain) for ``model``'s required inputs."""
    inputs, _ = MODEL_TENSORS[model]
    required = [t for t in inputs if t.required]
    companion = next(t for t in inputs if t.name == COMPANIONS[model])
    valid = {t.name: EXAMPLES[t.name] for t in required}
    valid[companion.name] = np.array([[4]], dtype=np.int32)
    walked = []
    for tensor in required:
        missing = {k: v for k, v in valid.items() if k != tensor.name}
        walked.append((f"without {tensor.name}", missing, named(tensor)))
        walked.append((f"{tensor.name} empty", {**valid, tensor.name: empty(tensor)}, named(tensor)))
    # No inputs at all: Triton counts them against the model's non-optional inputs (the ensemble runs
    # preprocessing first, so there it names QUERY, text_input's name in preprocessing).
    first = [t.name for t in (PRE_INPUTS if model == "ensemble" else inputs) if not t.optional]
    walked.append(("no inputs", {}, first[0]))
    return walked


# ---- one request over each endpoint: the refusal's (status, message) ------------------------------------------

def http_generate(url: str, model: str, inputs: dict[str, np.ndarray], stream: bool = False) -> tuple[int, str]:
    body = {}
    for name, value in inputs.items():  # [1, 1] as a scalar, [1, n] as a list
        flat = [v.decode() if isinstance(v, bytes) else v for v in value.reshape(-1).tolist()]
        body[name] = flat[0] if value.shape == (1, 1) else flat
    endpoint = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"{url}/v2/models/{model}/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_generate_stream(url: str, model: str, inputs: dict[str, np.ndarray]) -> tuple[int, str]:
    return http_generate(url, model, inputs, stream=True)


def http_infer(url: str, model: str, inputs: dict[str, np.ndarray]) -> tuple[int, str]:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=TIMEOUT_S)
    tensors = []
    for name, value in inputs.items():
        tensors.append(httpclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype)))
        tensors[-1].set_data_from_numpy(value)
    try:
        client.infer(model, tensors)
        return 200, ""
    except InferenceServerException as exc:
        return int(exc.status() or 0), exc.message() or ""
    finally:
        client.close()


def _grpc_inputs(inputs: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    tensors = []
    for name, value in inputs.items():
        tensors.append(grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype)))
        tensors[-1].set_data_from_numpy(value)
    return tensors


GRPC_4XX = {"StatusCode.INVALID_ARGUMENT": 400}


def grpc_infer(url: str, model: str, inputs: dict[str, np.ndarray]) -> tuple[int, str]:
    client = grpcclient.InferenceServerClient(url)
    try:
        client.infer(model, _grpc_inputs(inputs), client_timeout=TIMEOUT_S)
        return 200, ""
    except InferenceServerException as exc:
        return GRPC_4XX.get(str(exc.status()), 500), exc.message() or ""
    finally:
        client.close()


def grpc_stream(url: str, model: str, inputs: dict[str, np.ndarray]) -> tuple[int, str]:
    """An error on the stream counts as the 4xx of this protocol (a stream has no status per request)."""
    results: queue.SimpleQueue = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: results.put(error))
        client.async_stream_infer(model, _grpc_inputs(inputs))
        error = results.get(timeout=TIMEOUT_S)
        return (200, "") if error is None else (400, error.message() or "")
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


Send = Callable[[str, str, dict[str, np.ndarray]], tuple[int, str]]


def endpoints(server: RunningServer, model: str, decoupled: bool) -> list[tuple[str, Send, str]]:
    """(endpoint, how to send, its URL) that serve ``model`` in this deployment."""
    grpc, http = server.grpc_url, server.http_url
    chosen: list[tuple[str, Send, str]] = [("grpc stream_infer", grpc_stream, grpc)]
    if model in ("ensemble", LLM):  # decoupled or not: generate, generate_stream
        chosen += [("http generate", http_generate, http), ("http generate_stream", http_generate_stream, http)]
    if not decoupled or model not in ("ensemble", LLM):  # KServe infer serves only non-decoupled models
        chosen += [("grpc ModelInfer", grpc_infer, grpc), ("http infer", http_infer, http)]
    return chosen


def walk(server: RunningServer, model: str, decoupled: bool, served_as: str) -> None:
    failures = []
    for what, inputs, name in cases(model):
        for endpoint, send, url in endpoints(server, model, decoupled):
            if endpoint.startswith("http generate") and any(v.ndim > 2 for v in inputs.values()):
                continue  # generate's JSON carries only scalars and lists
            status, message = send(url, served_as, inputs)
            if not (400 <= status < 500 and name in message):
                failures.append(f"{served_as} {what} over {endpoint}: {status} {message[:200]!r}")
    assert not failures, "\n".join(failures)
    answered = grpc_stream(server.grpc_url, "ensemble", {"text_input": EXAMPLES["text_input"],
                                                          "max_tokens": np.array([[2]], dtype=np.int32)})
    assert answered == (200, ""), answered


@pytest.mark.parametrize("model", list(MODEL_TENSORS))
def test_decoupled_deployment_refuses_naming_the_required_input(server: RunningServer, model: str) -> None:
    walk(server, model, decoupled=True, served_as=model)


@pytest.mark.parametrize("model", list(MODEL_TENSORS))
def test_non_decoupled_deployment_refuses_naming_the_required_input(plain_server: RunningServer,
                                                                    model: str) -> None:
    walk(plain_server, model, decoupled=False, served_as="tensorrt_llm" if model == LLM else model)


def test_every_required_input_has_an_example() -> None:
    assert {t.name for _, t in REQUIRED} == set(EXAMPLES)
    assert all(any(t.name == COMPANIONS[model] and t.optional for t in MODEL_TENSORS[model][0])
               for model in MODEL_TENSORS)
