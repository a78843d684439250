"""The client's request builder (pure: no server): names, types, shapes, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from scalellm.triton.contract import ENSEMBLE_INPUTS
from scalellm_client import build_request
from scalellm_client._request import (
    INPUT_DTYPES,
    SAMPLING_INPUTS,
    normalize_url,
    to_arrays,
)

TRITON_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL",
                "UINT64": "TYPE_UINT64"}


def ensemble_inputs() -> dict[str, str]:
    """``{input name: TYPE_*}`` from the request contract (build_engines.py renders the ensemble from it)."""
    return {t.name: f"TYPE_{t.dtype}" for t in ENSEMBLE_INPUTS}


def test_every_input_the_client_sends_is_in_the_ensemble_contract() -> None:
    declared = ensemble_inputs()
    for name, dtype in INPUT_DTYPES.items():
        assert name in declared, f"the client sends {name!r}, which the ensemble does not declare"
        assert declared[name] == TRITON_TYPES[dtype], name


def test_defaults_send_only_what_is_needed() -> None:
    # no max_tokens: the server's own default applies, one value whatever the client
    assert build_request("Hi", stream=False) == {"text_input": "Hi", "exclude_input_in_output": True,
                                                 "stream": False}
    fields = build_request("Hi", stream=True, temperature=None, top_k=None, stop=[])
    assert fields == {"text_input": "Hi", "exclude_input_in_output": True,
                      "stream": True}


def test_sampling_arguments_map_to_ensemble_names() -> None:
    fields = build_request("Hi", stream=False, max_tokens=7, temperature=1, top_k=5, top_p=0.9,
                           seed=2**64 - 1, stop="END", bad_words=["x", "y"], exclude_input_in_output=False,
                           end_id=0, min_tokens=2, return_log_probs=True)
    assert fields == {
        "text_input": "Hi", "max_tokens": 7, "temperature": 1.0, "top_k": 5, "top_p": 0.9,
        "seed": 2**64 - 1, "stop_words": ["END"], "bad_words": ["x", "y"], "exclude_input_in_output": False,
        "end_id": 0, "min_tokens": 2, "return_log_probs": True, "stream": False,
    }
    assert isinstance(fields["temperature"], float)


def test_values_the_server_must_judge_are_passed_through() -> None:
    """Out-of-range values within the datatype are the server's to reject, with its message."""
    fields = build_request("", stream=False, max_tokens=0, top_p=1.5, temperature=-1.0, beam_width=2)
    assert (fields["text_input"], fields["max_tokens"], fields["top_p"]) == ("", 0, 1.5)
    assert (fields["temperature"], fields["beam_width"]) == (-1.0, 2)


def test_unknown_argument_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="max_new_tokens"):
        build_request("Hi", stream=False, max_new_tokens=5)


@pytest.mark.parametrize(
    ("sampling", "error"),
    [
        ({"temperature": True}, TypeError),
        ({"temperature": "hot"}, TypeError),
        ({"max_tokens": 1.5}, TypeError),
        ({"max_tokens": "5"}, TypeError),
        ({"stop": [1, 2]}, TypeError),
        ({"exclude_input_in_output": 1}, TypeError),
        ({"top_p": float("nan")}, ValueError),
        ({"max_tokens": 2**31}, ValueError),
        ({"seed": -1}, ValueError),
        ({"seed": 2**64}, ValueError),
        ({"chat": "yes"}, TypeError),
        ({"num_return_sequences": 2.0}, TypeError),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v.__name__,
)
def test_wrong_types_and_unrepresentable_values_are_refused(sampling: dict, error: type[Exception]) -> None:
    (key,) = sampling
    with pytest.raises(error, match=key):
        build_request("Hi", stream=False, **sampling)


def test_prompt_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="prompt"):
        build_request(b"Hi", stream=False)  # type: ignore[arg-type]


def test_arrays_are_a_batch_of_one_with_triton_datatypes() -> None:
    fields = build_request("héllo 🎉", stream=True, max_tokens=3, top_p=0.5, seed=2**64 - 1, stop=["a", "bc"],
                           return_log_probs=True)
    arrays = {name: (array, dtype) for name, array, dtype in to_arrays(fields)}
    assert set(arrays) == set(fields)
    text, dtype = arrays["text_input"]
    assert (text.shape, text.dtype, dtype) == ((1, 1), np.object_, "BYTES")
    assert text[0, 0] == "héllo 🎉".encode()
    assert arrays["stop_words"][0].shape == (1, 2) and arrays["stop_words"][0][0, 1] == b"bc"
    for name, numpy_type, triton_type in [("max_tokens", np.int32, "INT32"), ("top_p", np.float32, "FP32"),
                                          ("seed", np.uint64, "UINT64"), ("stream", np.bool_, "BOOL"),
                                          ("return_log_probs", np.bool_, "BOOL")]:
        array, dtype = arrays[name]
        assert (array.shape, array.dtype, dtype) == ((1, 1), numpy_type, triton_type), name
    assert int(arrays["seed"][0][0, 0]) == 2**64 - 1


def test_every_sampling_argument_builds_arrays() -> None:
    samples = {"FP32": 0.5, "INT32": 1, "UINT64": 1, "BOOL": True, "BYTES": ["w"]}
    sampling = {key: samples[dtype] for key, (_, dtype) in SAMPLING_INPUTS.items()}
    arrays = to_arrays(build_request("Hi", stream=False, **sampling))
    assert {name for name, _, _ in arrays} == {name for name, _ in SAMPLING_INPUTS.values()} | {
        "text_input", "stream"}


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        (None, "grpc", "127.0.0.1:8001"),
        (None, "http", "http://127.0.0.1:8000"),
        ("grpc://host:9001/", "grpc", "host:9001"),
        ("http://host:9001", "grpc", "host:9001"),
        ("host:9000", "http", "http://host:9000"),
        ("https://host/prefix/", "http", "https://host/prefix"),
    ],
)
def test_urls_are_normalised(url: str | None, protocol: str, expected: str) -> None:
    assert normalize_url(url, protocol) == expected


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValueError, match="protocol"):
        normalize_url(None, "websocket")
