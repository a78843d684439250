"""tensorrtllm_backend compatibility against the real (decoupled) tritonserver of the session.

Encodes what NVIDIA's own clients (inflight_batcher_llm/client/*.py, tools/inflight_batcher_llm/
end_to_end_test.py) rely on: the shapes they index (``text_output[0].decode()``, ``output_ids[0][0]``,
``sequence_length[0][0]``, ``sequence_index[0][0]``), the sampling semantics (greedy unless ``top_k`` or
``top_p`` asks for sampling), the official tensors we implement or refuse, and that Triton loads exactly the
configs rendered from the contract.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import http_json

from scalellm.config import DEFAULT_MAX_TOKENS
from scalellm.triton.contract import MODEL_TENSORS, ensemble_steps
from scalellm_client import chatml

if TYPE_CHECKING:
    from conftest import RunningServer

pytestmark = pytest.mark.server
TIMEOUT_S = 180.0
PARIS = chatml("What is the capital of France?")


def tensor(name: str, value: np.ndarray) -> grpcclient.InferInput:
    dtype = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(bool): "BOOL",
             np.dtype(np.float32): "FP32", np.dtype(np.uint64): "UINT64"}[value.dtype]
    t = grpcclient.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


def stream_infer(server: RunningServer, model: str, inputs: dict[str, np.ndarray]) -> list[grpcclient.InferResult]:
    """Every response of one request over gRPC stream_infer (what the official clients use)."""
    results: queue.SimpleQueue = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, [tensor(k, v) for k, v in inputs.items()],
                                  enable_empty_final_response=True)
        responses = []
        while True:
            result, error = results.get(timeout=TIMEOUT_S)
            assert error is None, error
            if result.get_response().outputs:
                responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    return responses


def text(s: str) -> np.ndarray:
    return np.array([[s.encode()]], dtype=object)


def i32(v: int) -> np.ndarray:
    return np.array([[v]], dtype=np.int32)


def flag(v: bool) -> np.ndarray:
    return np.array([[v]], dtype=bool)


def f32(v: float) -> np.ndarray:
    return np.array([[v]], dtype=np.float32)


# ---- the configs Triton loads are the contract ----------------------------------------------------------

@pytest.mark.parametrize("model", ["ensemble", "preprocessing", "llm", "postprocessing"])
def test_triton_loads_the_configs_rendered_from_the_contract(server: RunningServer, model: str) -> None:
    status, config = http_json(f"{server.http_url}/v2/models/{model}/config")
    assert status == 200, config
    inputs, outputs = MODEL_TENSORS[model]
    for declared, loaded in ((inputs, config["input"]), (outputs, config["output"])):
        expected = [(t.name, f"TYPE_{t.dtype}", [str(d) for d in t.dims]) for t in declared]
        assert [(t["name"], t["data_type"], [str(d) for d in t["dims"]]) for t in loaded] == expected
    assert [t.get("optional", False) for t in config["input"]] == [t.optional for t in inputs]
    if model == "ensemble":
        steps = [(s["model_name"], s["input_map"], s["output_map"]) for s in config["ensemble_scheduling"]["step"]]
        assert steps == ensemble_steps()


# ---- official shapes ------------------------------------------------------------------------------------

def test_ensemble_text_output_is_one_string_per_request(server: RunningServer) -> None:
    (result,) = stream_infer(server, "ensemble", {"text_input": text(PARIS), "max_tokens": i32(16),
                                                 "exclude_input_in_output": flag(True)})
    output = result.as_numpy("text_output")
    assert output.shape == (1,)
    assert "Paris" in output[0].decode("utf-8")  # what NVIDIA's clients do
    # One sequence of an unbatched request: no sequence_index nor batch_index, as TensorRT-LLM's backend sends
    # them (NVIDIA's clients read a missing one as 0).
    assert result.as_numpy("sequence_index") is None and result.as_numpy("batch_index") is None
    echoed = stream_infer(server, "ensemble", {"text_input": text(PARIS), "max_tokens": i32(16)})[0]
    echoed_text = echoed.as_numpy("text_output")[0].decode()  # the prompt first: TensorRT-LLM's default
    assert echoed_text.startswith("system\nYou are") and echoed_text.endswith("\nassistant\n" + output[0].decode())


def test_llm_returns_batch_beam_tokens(server: RunningServer) -> None:
    prompt = np.array([[504, 3575, 282, 4649, 314]], dtype=np.int32)  # "The capital of France is"
    inputs = {"input_ids": prompt, "input_lengths": i32(5), "request_output_len": i32(8), "end_id": i32(0)}
    (whole,) = stream_infer(server, "llm", inputs)
    ids, length = whole.as_numpy("output_ids"), whole.as_numpy("sequence_length")
    assert ids.shape == (1, 1, 13) and length.tolist() == [[13]]
    assert list(ids[0][0][:5]) == prompt[0].tolist()  # the prompt first: exclude_input_in_output is false
    streamed = stream_infer(server, "llm", {**inputs, "streaming": flag(True)})
    new = [t for r in streamed for t in r.as_numpy("output_ids")[0][0][: r.as_numpy("sequence_length")[0][0]]]
    assert new == list(ids[0][0][5:])  # a stream sends only new tokens


def test_greedy_unless_top_k_or_top_p_asks_for_sampling(server: RunningServer) -> None:
    """What end_to_end_grpc_client.py sends by default (temperature 1.0, no top_k / top_p, the prompt echoed):
    TensorRT-LLM decodes it greedily, so the answer is the greedy reference's, streamed or not, every time."""
    base = {"text_input": text(PARIS), "max_tokens": i32(16)}

    def answer(**extra: np.ndarray) -> bytes:
        return b"".join(r.as_numpy("text_output")[0] for r in stream_infer(server, "ensemble", {**base, **extra}))

    reference = answer(temperature=f32(0.0))
    assert reference.decode().endswith("The capital of France is Paris.")
    default = {"temperature": f32(1.0), "beam_width": i32(1), "stream": flag(False)}
    for extra in (default, {**default, "top_k": i32(0), "top_p": f32(0.0)}):
        assert [answer(**extra) for _ in range(2)] == [reference] * 2
    streamed = answer(**{**default, "stream": flag(True)})
    assert streamed == answer(temperature=f32(0.0), exclude_input_in_output=flag(True)) and reference.endswith(streamed)


def test_streamed_responses_repeat_no_constant(server: RunningServer) -> None:
    """Each streamed response carries its text and the count so far; what cannot change (the prompt tokens served
    from the prefix cache) comes once, in the first, and the finish reason once, in the last. Every tensor costs a
    response a trip through postprocessing and the frontend."""
    inputs = {"text_input": text(PARIS), "max_tokens": i32(6), "stream": flag(True),
              "exclude_input_in_output": flag(True)}
    responses = stream_infer(server, "ensemble", inputs)
    assert len(responses) >= 2
    names = [{o.name for o in r.get_response().outputs} for r in responses]
    assert all({"text_output", "num_output_tokens"} <= n for n in names)
    assert [n for n in names[:-1] if "finish_reason" in n] == [] and "finish_reason" in names[-1]
    assert "num_cached_tokens" in names[0] and not any("num_cached_tokens" in n for n in names[1:])
    assert not any({"batch_index", "sequence_index"} & n for n in names)
    counts = [int(r.as_numpy("num_output_tokens")[0][0]) for r in responses]
    assert counts == sorted(counts) and counts[-1] == 6


# ---- num_return_sequences -------------------------------------------------------------------------------

def samples(server: RunningServer, n: int, **extra: np.ndarray) -> list[str]:
    inputs = {"text_input": text(chatml("Write a short poem about the sea.")), "max_tokens": i32(24),
              "num_return_sequences": i32(n), "exclude_input_in_output": flag(True), **extra}
    responses = stream_infer(server, "ensemble", inputs)
    assert len(responses) == n
    by_index = {int(r.as_numpy("sequence_index")[0][0]): r for r in responses}
    assert sorted(by_index) == list(range(n))
    return [by_index[i].as_numpy("text_output")[0].decode() for i in range(n)]


def test_num_return_sequences_samples_reproducibly(server: RunningServer) -> None:
    sampled = {"temperature": f32(0.9), "top_p": f32(1.0), "random_seed": np.array([[7]], dtype=np.uint64)}
    first = samples(server, 3, **sampled)
    assert len(set(first)) == 3, first
    assert samples(server, 3, **sampled) == first
    greedy = samples(server, 3, temperature=f32(0.9))  # no top_k / top_p: greedy, as in TensorRT-LLM
    assert len(set(greedy)) == 1 and greedy[0]


# ---- optional outputs and refused inputs ----------------------------------------------------------------

def test_optional_outputs_only_when_asked(server: RunningServer) -> None:
    url = f"{server.http_url}/v2/models/ensemble/generate"
    prompt = chatml("What is the capital of France?", system="You are a helpful assistant. " * 20)  # > 1 KV block
    status, plain = http_json(url, {"text_input": prompt, "max_tokens": 8})
    assert status == 200, plain
    assert not {"arrival_time_ns", "num_input_tokens", "cum_log_probs", "output_log_probs"} & set(plain)
    status, full = http_json(url, {"text_input": prompt, "max_tokens": 8, "return_perf_metrics": True,
                                   "return_num_input_tokens": True, "return_log_probs": True})
    assert status == 200, full
    assert full["num_input_tokens"] > 8 and full["num_output_tokens"] == plain["num_output_tokens"]
    assert 0 < full["arrival_time_ns"] <= full["first_token_time_ns"] <= full["last_token_time_ns"]
    assert full["cum_log_probs"] < 0
    assert full["kv_cache_alloc_total_blocks"] == full["kv_cache_alloc_new_blocks"] + full["kv_cache_reused_blocks"]
    assert full["kv_cache_reused_blocks"] > 0  # the same prompt was just served: its full blocks are cached


def test_max_tokens_is_optional(server: RunningServer) -> None:
    status, out = http_json(f"{server.http_url}/v2/models/ensemble/generate",
                            {"text_input": "Once upon a time", "end_id": 0})
    assert status == 200, out
    assert (out["num_output_tokens"], out["finish_reason"]) == (DEFAULT_MAX_TOKENS, "length")


@pytest.mark.parametrize(("field", "value"), [
    ("return_context_logits", True), ("return_generation_logits", True), ("embedding_bias_words", ["x"]),
    ("guided_decoding_guide_type", "json"), ("beam_width", 2),
])
def test_unimplemented_official_inputs_are_refused_naming_them(server: RunningServer, field: str,
                                                               value: object) -> None:
    status, body = http_json(f"{server.http_url}/v2/models/ensemble/generate",
                             {"text_input": "hi", "max_tokens": 4, field: value})
    assert status == 400 and field in body["error"], body


def test_chat_template_is_applied_on_request(server: RunningServer) -> None:
    status, out = http_json(f"{server.http_url}/v2/models/ensemble/generate",
                            {"text_input": "What is the capital of France?", "apply_chat_template": True,
                             "exclude_input_in_output": True, "max_tokens": 32})
    assert status == 200, out
    assert "Paris" in out["text_output"] and out["finish_reason"] == "stop"


def test_official_stop_signal_ends_a_request(server: RunningServer) -> None:
    """tensorrtllm_backend's stop: a second request with ``stop`` = true and the same request id."""
    results: queue.SimpleQueue = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    ids = np.array([[504, 3575, 282, 4649, 314]], dtype=np.int32)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("llm", [tensor("input_ids", ids), tensor("request_output_len", i32(1000)),
                                          tensor("end_id", i32(-1)), tensor("streaming", flag(True))],
                                  request_id="stop-me")
        first, error = results.get(timeout=TIMEOUT_S)
        assert error is None, error
        client.async_stream_infer("llm", [tensor("stop", flag(True))], request_id="stop-me")
        reasons = []  # a stop that is ignored ends in "length" after 1000 tokens, and the loop times out
        while "cancelled" not in reasons:
            result, error = results.get(timeout=TIMEOUT_S)
            assert error is None, error
            if result.get_response().outputs and result.as_numpy("finish_reason") is not None:
                reasons.append(result.as_numpy("finish_reason")[0][0].decode())
        assert set(reasons[:-1]) <= {""}
    finally:
        client.stop_stream()
        client.close()
