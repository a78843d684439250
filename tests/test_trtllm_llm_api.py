"""The LLM-API model's translation: official tensorrt_llm request tensors -> the llm model's parser (the
contract's defaults and bounds) -> SamplingParams fields -> the official outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from scalellm.triton.request import LLMRequest, parse
from scalellm.triton.tensors import InvalidInput
from scalellm.trtllm.llm_api import engine_limits, output_arrays, sampling_kwargs, token_log_probs

EOS = 2


@pytest.fixture
def limits(tmp_path: Path):
    """The bounds of a 256-token LLM() over a checkpoint with a 1000-token vocabulary and one end token."""
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000, "eos_token_id": EOS}))
    return engine_limits({"model": str(tmp_path), "max_seq_len": 256}, decoupled=True)


def i32(*values: int) -> np.ndarray:
    return np.asarray([list(values)], dtype=np.int32)


def word_list(*words: list[int]) -> np.ndarray:
    """The [1, 2, N] layout our preprocessing (and NVIDIA's) produces."""
    tokens = [t for w in words for t in w]
    offsets = list(np.cumsum([len(w) for w in words]))
    width = max(len(tokens), 1)
    return np.asarray([[tokens + [0] * (width - len(tokens)), offsets + [-1] * (width - len(offsets))]],
                      dtype=np.int32)


def request(limits, **tensors: np.ndarray) -> LLMRequest:
    """What the model parses from a request with these official input tensors (and a 3-token prompt)."""
    return parse({"input_ids": i32(5, 6, 7), **tensors}.get, limits)


def kwargs_of(limits, **tensors: np.ndarray) -> dict:
    (sample,) = request(limits, **tensors).samples
    return sampling_kwargs(sample, limits.eos_token_ids)


def test_limits_come_from_the_checkpoint_and_model_yaml(limits) -> None:
    assert (limits.vocab_size, limits.eos_token_ids, limits.max_model_len) == (1000, (EOS,), 256)
    assert limits.check_fits(200, 56) is None
    assert "exceeds the context length of 256 tokens" in limits.check_fits(200, 57)


def test_request_maps_onto_sampling_params_fields(limits) -> None:
    kwargs = kwargs_of(limits, request_output_len=i32(16), end_id=i32(9), pad_id=i32(2),
                       temperature=np.asarray([[0.7]], dtype=np.float32), runtime_top_k=i32(40),
                       runtime_top_p=np.asarray([[0.9]], dtype=np.float32), seed=np.asarray([[7]], dtype=np.uint64),
                       repetition_penalty=np.asarray([[1.1]], dtype=np.float32), min_tokens=i32(3),
                       return_log_probs=np.asarray([[True]]), stop_words_list=word_list([13], [21, 22]),
                       bad_words_list=word_list([99]))
    assert kwargs["max_tokens"] == 16 and kwargs["end_id"] == 9 and "pad_id" not in kwargs  # pad_id: ignored
    assert kwargs["top_k"] == 40 and kwargs["seed"] == 7 and kwargs["logprobs"] == 1 and kwargs["min_tokens"] == 3
    assert kwargs["temperature"] == pytest.approx(0.7) and kwargs["top_p"] == pytest.approx(0.9)
    assert kwargs["repetition_penalty"] == pytest.approx(1.1) and "presence_penalty" not in kwargs
    assert kwargs["stop_token_ids"] == [13] and kwargs["stop_words"] == [[21, 22]]
    assert kwargs["bad_token_ids"] == [99] and "bad_words" not in kwargs


def test_the_contracts_defaults_hold_on_the_llm_api_path_too(limits) -> None:
    parsed = request(limits)
    assert parsed.echoed_prompt == [5, 6, 7]  # exclude_input_in_output defaults to false: the prompt comes first
    assert request(limits, exclude_input_in_output=np.asarray([[True]])).echoed_prompt == []
    assert request(limits, streaming=np.asarray([[True]])).echoed_prompt == []  # a stream never repeats it
    assert kwargs_of(limits) == {"max_tokens": 16, "top_k": 1}  # greedy, the model's end tokens, 16 tokens


def test_official_conventions_end_id_minus_one_and_greedy_without_top_k_or_top_p(limits) -> None:
    kwargs = kwargs_of(limits, request_output_len=i32(4), end_id=i32(-1),
                       temperature=np.asarray([[1.0]], dtype=np.float32),
                       runtime_top_p=np.asarray([[0.0]], dtype=np.float32))
    assert kwargs == {"max_tokens": 4, "ignore_eos": True, "top_k": 1}
    top_k_only = kwargs_of(limits, request_output_len=i32(4), runtime_top_k=i32(5))
    assert (top_k_only["top_k"], top_k_only["top_p"]) == (5, 1.0)
    assert kwargs_of(limits, end_id=i32(EOS)) == {"max_tokens": 16, "top_k": 1}  # the model's own end token


@pytest.mark.parametrize(("tensors", "message"), [
    ({"request_output_len": i32(0)}, "max_tokens must be >= 1 (got 0)"),
    ({"request_output_len": i32(254)}, "max_tokens: prompt (3 tokens) + max_tokens (254) = 257 exceeds"),
    ({"beam_width": i32(2)}, "beam_width must be 1"),
    ({"runtime_top_p": np.asarray([[1.5]], dtype=np.float32)}, "top_p must be <= 1.0"),
    ({"input_ids": i32(5, 1000)}, "input_ids must be in [0, 1000)"),
    ({"stop_words_list": np.asarray([[[1, 2], [3, -1]]], dtype=np.int32)}, "stop_words_list: word list offsets"),
])
def test_bad_requests_name_the_field(limits, tensors: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        request(limits, **tensors)


def test_streaming_needs_the_decoupled_deployment(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000, "eos_token_id": [EOS, 3]}))
    limits = engine_limits({"model": str(tmp_path), "max_seq_len": 256}, decoupled=False)
    assert limits.eos_token_ids == (EOS, 3)
    with pytest.raises(InvalidInput, match="needs the decoupled deployment"):
        request(limits, streaming=np.asarray([[True]]))


def test_outputs_have_the_official_batch_beam_token_shapes() -> None:
    arrays = output_arrays([4, 5, 6], [-0.1, -0.2, -0.3], -0.6)
    assert arrays["output_ids"].shape == (1, 1, 3) and arrays["output_ids"].dtype == np.int32
    assert arrays["sequence_length"].tolist() == [[3]]
    assert arrays["output_log_probs"].shape == (1, 1, 3)
    assert arrays["cum_log_probs"].shape == (1, 1) and arrays["cum_log_probs"][0, 0] == pytest.approx(-0.6)
    quiet = output_arrays([4], None, None)
    assert quiet["output_log_probs"].size == 0 and quiet["cum_log_probs"].size == 0  # not asked: empty
    assert quiet["arrival_time_ns"].tolist() == [[0]]  # perf marks not asked for: 0, as the CPU engine
    timed = output_arrays([4], None, None, {"arrival_time_ns": 5, "first_scheduled_time_ns": 6,
                                            "first_token_time_ns": 7, "last_token_time_ns": 8})
    assert [timed[n][0, 0] for n in ("arrival_time_ns", "last_token_time_ns")] == [5, 8]


def test_token_log_probs_reads_floats_or_logprob_dicts() -> None:
    class Logprob:
        def __init__(self, logprob: float) -> None:
            self.logprob = logprob

    assert token_log_probs([-0.5, -1.5], [3, 4]) == [-0.5, -1.5]
    assert token_log_probs([{3: Logprob(-0.25)}, {4: Logprob(-2.0), 9: Logprob(-0.1)}], [3, 4]) == [-0.25, -2.0]
