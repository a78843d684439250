"""Non-streaming KServe ``infer`` (gRPC ModelInfer, HTTP /infer) through the router, in front of the session's
non-decoupled server (``plain_server``): what perf_analyzer without ``--streaming`` and tensorrtllm_backend's
non-streaming clients send. Encodes what NVIDIA's ``end_to_end_grpc_client.py`` and ``end_to_end_test.py`` check:
the default request (temperature 1.0, no top_k / top_p) answers the greedy reference, and preprocessing ->
tensorrt_llm -> postprocessing called one by one equals the ensemble."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import MODEL_DIR, RunningServer, http_json
from routerstack import RouterProcess, metric, scrape
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from scalellm_client import chatml

pytestmark = pytest.mark.server
PARIS = chatml("What is the capital of France?")
TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def router(plain_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    tmp = tmp_path_factory.mktemp("router-infer")
    with RouterProcess([plain_server], MODEL_DIR, tmp / "router.log") as process:  # type: ignore[list-item]
        yield process


def client_for(protocol: str, url: str):  # type: ignore[no-untyped-def]
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(url)
    return httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=TIMEOUT_S)


def infer(protocol: str, url: str, model: str, inputs: dict[str, np.ndarray], request_id: str = ""):  # type: ignore[no-untyped-def]
    module = grpcclient if protocol == "grpc" else httpclient
    tensors = []
    for name, value in inputs.items():
        tensors.append(module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype)))
        tensors[-1].set_data_from_numpy(value)
    client = client_for(protocol, url)
    try:
        return client.infer(model, tensors, request_id=request_id)
    finally:
        client.close()


def text(result) -> str:  # type: ignore[no-untyped-def]
    return result.as_numpy("text_output")[0].decode()


def routed(router: RouterProcess) -> float:
    return metric(scrape(f"{router.http_url}/metrics"), "scalellm_router_requests_routed_total")


def test_default_request_answers_the_greedy_reference_through_the_router(
        router: RouterProcess, plain_server: RunningServer) -> None:
    """end_to_end_grpc_client.py's request (temperature 1.0, beam_width 1, stream false, the prompt echoed), as
    perf_analyzer sends it without --streaming: gRPC ModelInfer, then HTTP infer (binary tensors)."""
    question = {"text_input": np.array([[PARIS.encode()]], dtype=object),
                "max_tokens": np.array([[16]], dtype=np.int32)}
    default = {**question, "temperature": np.array([[1.0]], dtype=np.float32),
               "beam_width": np.array([[1]], dtype=np.int32), "stream": np.array([[False]])}
    greedy = {**question, "temperature": np.array([[0.0]], dtype=np.float32)}
    reference = text(infer("grpc", plain_server.grpc_url, "ensemble", greedy))
    assert reference.endswith("The capital of France is Paris.")
    before = routed(router)
    for protocol, url in (("grpc", router.grpc_url), ("grpc", router.grpc_url), ("http", router.http_url)):
        result = infer(protocol, url, "ensemble", default, request_id="client-7")
        assert text(result) == reference, protocol
        response = result.get_response()
        assert (response.id if protocol == "grpc" else response["id"]) == "client-7"  # not the router's own id
    assert routed(router) == before + 3


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_chained_models_equal_the_ensemble_through_the_router(router: RouterProcess, protocol: str) -> None:
    """end_to_end_test.py's functionality test, with its inputs (empty word lists, the end and pad ids)."""
    url = router.grpc_url if protocol == "grpc" else router.http_url
    prompt = np.array([[b"Water boils at 100 degrees Celsius. At what temperature does water boil?"]], dtype=object)
    length, no_words = np.array([[16]], dtype=np.int32), np.array([[b""]], dtype=object)
    pre = infer(protocol, url, "preprocessing", {"QUERY": prompt, "BAD_WORDS_DICT": no_words,
                                                  "STOP_WORDS_DICT": no_words, "REQUEST_OUTPUT_LEN": length})
    llm = infer(protocol, url, "tensorrt_llm", {
        "input_ids": pre.as_numpy("INPUT_ID"), "decoder_input_ids": pre.as_numpy("DECODER_INPUT_ID"),
        "input_lengths": pre.as_numpy("REQUEST_INPUT_LEN"), "request_output_len": pre.as_numpy("REQUEST_OUTPUT_LEN"),
        "end_id": pre.as_numpy("OUT_END_ID"), "pad_id": pre.as_numpy("OUT_PAD_ID"),
        "return_log_probs": np.array([[True]])})
    post = infer(protocol, url, "postprocessing", {"TOKENS_BATCH": llm.as_numpy("output_ids"),
                                                   "SEQUENCE_LENGTH": llm.as_numpy("sequence_length")})
    ensemble = infer(protocol, url, "ensemble", {"text_input": prompt, "max_tokens": length, "bad_words": no_words,
                                                 "stop_words": no_words, "return_log_probs": np.array([[True]])})
    assert post.as_numpy("OUTPUT").tolist() == ensemble.as_numpy("text_output").tolist()
    assert ensemble.as_numpy("cum_log_probs").tolist() == llm.as_numpy("cum_log_probs").tolist()
    assert (ensemble.as_numpy("output_log_probs") == llm.as_numpy("output_log_probs")).all()


def test_refusals_pass_through_the_router_as_they_are(router: RouterProcess) -> None:
    """A request without text_input: HTTP 400 / gRPC INVALID_ARGUMENT naming it; no retry, no cancel."""
    page = scrape(f"{router.http_url}/metrics")
    before = [metric(page, f"scalellm_router_requests_{kind}_total") for kind in ("retried", "cancelled")]
    status, body = http_json(f"{router.http_url}/v2/models/ensemble/infer", {"inputs": [
        {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [4]}]})
    assert status == 400 and "text_input" in body["error"], body
    with pytest.raises(InferenceServerException) as refused:
        infer("grpc", router.grpc_url, "ensemble", {"max_tokens": np.array([[4]], dtype=np.int32)})
    assert str(refused.value.status()) == "StatusCode.INVALID_ARGUMENT" and "text_input" in refused.value.message()
    status, body = http_json(f"{router.http_url}/v2/models/ensemble/infer", {"inputs": "nope"})
    assert status == 400 and "list of inputs" in body["error"], body
    page = scrape(f"{router.http_url}/metrics")
    assert [metric(page, f"scalellm_router_requests_{kind}_total") for kind in ("retried", "cancelled")] == before
    assert metric(page, "scalellm_router_replica_healthy") == 1
