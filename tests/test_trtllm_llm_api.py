"""The LLM-API model's translation: official tensorrt_llm request tensors -> SamplingParams fields -> outputs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from scalellm.triton.tensors import InvalidInput
from scalellm.trtllm.llm_api import output_arrays, sampling_kwargs, token_log_probs, unflatten_words


def i32(*values: int) -> np.ndarray:
    return np.asarray([list(values)], dtype=np.int32)


def word_list(*words: list[int]) -> np.ndarray:
    """The [1, 2, N] layout our preprocessing (and NVIDIA's) produces."""
    tokens = [t for w in words for t in w]
    offsets = list(np.cumsum([len(w) for w in words]))
    width = max(len(tokens), 1)
    return np.asarray([[tokens + [0] * (width - len(tokens)), offsets + [-1] * (width - len(offsets))]],
                      dtype=np.int32)


def test_word_lists_unflatten_into_token_sequences() -> None:
    assert unflatten_words(word_list([5], [7, 8, 9], [11])) == [[5], [7, 8, 9], [11]]
    assert unflatten_words(None) == []
    with pytest.raises(InvalidInput, match="offsets must rise"):
        unflatten_words(np.asarray([[[1, 2], [3, -1]]], dtype=np.int32))


def test_request_maps_onto_sampling_params_fields() -> None:
    kwargs = sampling_kwargs({
        "request_output_len": i32(16), "end_id": i32(2), "pad_id": i32(2),
        "temperature": np.asarray([[0.7]], dtype=np.float32), "runtime_top_k": i32(40),
        "runtime_top_p": np.asarray([[0.9]], dtype=np.float32), "seed": np.asarray([[7]], dtype=np.uint64),
        "return_log_probs": np.asarray([[True]]), "stop_words_list": word_list([13], [21, 22]),
        "bad_words_list": word_list([99]),
    })
    assert kwargs["max_tokens"] == 16 and kwargs["end_id"] == 2 and kwargs["pad_id"] == 2
    assert kwargs["top_k"] == 40 and kwargs["seed"] == 7 and kwargs["logprobs"] == 1
    assert kwargs["temperature"] == pytest.approx(0.7) and kwargs["top_p"] == pytest.approx(0.9)
    assert kwargs["stop_token_ids"] == [13] and kwargs["stop_words"] == [[21, 22]]
    assert kwargs["bad_token_ids"] == [99] and "bad_words" not in kwargs


def test_official_conventions_end_id_minus_one_and_greedy_without_top_k_or_top_p() -> None:
    kwargs = sampling_kwargs({"request_output_len": i32(4), "end_id": i32(-1),
                              "temperature": np.asarray([[1.0]], dtype=np.float32),
                              "runtime_top_p": np.asarray([[0.0]], dtype=np.float32)})
    assert kwargs == {"max_tokens": 4, "ignore_eos": True, "temperature": 1.0, "top_k": 1}
    top_k_only = sampling_kwargs({"request_output_len": i32(4), "runtime_top_k": i32(5)})
    assert (top_k_only["top_k"], top_k_only["top_p"]) == (5, 1.0)


@pytest.mark.parametrize(("inputs", "message"), [
    ({"request_output_len": i32(0)}, "max_tokens must be >= 1 (got 0)"),
    ({"request_output_len": i32(4), "beam_width": i32(2)}, "beam_width must be 1"),
    ({"request_output_len": i32(4), "runtime_top_p": np.asarray([[1.5]], dtype=np.float32)}, "top_p must be <= 1.0"),
])
def test_bad_requests_name_the_field(inputs: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        sampling_kwargs(inputs)


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
