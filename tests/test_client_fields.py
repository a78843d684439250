"""The client's request fields of the contract, what it makes of a model's configuration,
and that its docstring keeps up with its keywords (pure: no server)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from scalellm_client import ScaleLLMError, build_request
from scalellm_client._request import SAMPLING_INPUTS, ModelInfo, for_model, one_sequence, to_arrays
from scalellm_client.chat import chatml
from scalellm_client.client import ClientBase


def test_the_client_docstring_names_every_sampling_keyword() -> None:
    documented = ClientBase.__doc__ or ""
    missing = [key for key in SAMPLING_INPUTS if not re.search(rf"\b{key}\b", documented)]
    assert not missing, f"Client's docstring does not mention {missing}"


def test_top_p_zero_means_off_and_is_sent() -> None:
    """tensorrtllm_backend's clients send top_p=0 for "off": the client must not refuse it."""
    assert build_request("Hi", stream=False, top_p=0)["top_p"] == 0.0


def test_temperature_alone_asks_for_sampling_explicitly() -> None:
    """The server is greedy without top_k / top_p (TensorRT-LLM); the client's temperature=0.8 means sampling."""
    assert build_request("Hi", stream=False, temperature=0.8)["top_p"] == 1.0
    assert build_request("Hi", stream=False, min_p=0.1)["top_p"] == 1.0
    assert "top_p" not in build_request("Hi", stream=False, temperature=0.8, top_k=5)
    assert build_request("Hi", stream=False, temperature=0.8, top_p=0.5)["top_p"] == 0.5
    assert "top_p" not in build_request("Hi", stream=False, temperature=0.0)
    assert "top_p" not in build_request("Hi", stream=False)


def test_new_contract_fields_map_to_ensemble_names() -> None:
    fields = build_request("Hi", stream=False, chat=True, num_return_sequences=3, return_num_input_tokens=True,
                           return_num_output_tokens=False)
    assert fields == {"text_input": "Hi", "apply_chat_template": True,
                      "num_return_sequences": 3, "return_num_input_tokens": True, "exclude_input_in_output": True,
                      "return_num_output_tokens": False, "stream": False}
    assert "apply_chat_template" not in build_request("Hi", stream=False, chat=False)
    arrays = {name: (array, dtype) for name, array, dtype in to_arrays(fields)}
    assert arrays["num_return_sequences"][1] == "INT32" and arrays["num_return_sequences"][0].dtype == np.int32
    assert arrays["apply_chat_template"][1] == "BOOL" and arrays["apply_chat_template"][0].shape == (1, 1)


def test_stream_of_text_refuses_several_sequences() -> None:
    one_sequence({"num_return_sequences": 1})
    one_sequence({})
    with pytest.raises(ValueError, match="num_return_sequences"):
        one_sequence({"num_return_sequences": 2})


DECOUPLED_ENSEMBLE = {"name": "ensemble", "model_transaction_policy": {"decoupled": True},
                      "input": [{"name": "text_input"}, {"name": "apply_chat_template"}]}
PLAIN_ENSEMBLE = {"name": "ensemble", "input": [{"name": "text_input"}]}


def test_model_info_reads_the_transaction_policy_from_either_protocols_config() -> None:
    http_info = ModelInfo.from_config(DECOUPLED_ENSEMBLE)
    assert http_info == ModelInfo(decoupled=True, inputs=frozenset({"text_input", "apply_chat_template"}))
    assert ModelInfo.from_config({"config": DECOUPLED_ENSEMBLE}) == http_info  # gRPC's as_json wraps it
    assert ModelInfo.from_config(PLAIN_ENSEMBLE).decoupled is False


def test_a_model_that_is_not_decoupled_cannot_stream() -> None:
    plain = ModelInfo.from_config(PLAIN_ENSEMBLE)
    fields = build_request("Hi", stream=False)
    assert for_model(fields, "ensemble", plain) == fields
    with pytest.raises(ScaleLLMError, match="not decoupled.*generate"):
        for_model(build_request("Hi", stream=True), "ensemble", plain)


def test_chat_uses_the_server_template_when_declared_else_client_chatml() -> None:
    fields = build_request("Hi", stream=True, chat=True)
    assert for_model(fields, "ensemble", ModelInfo.from_config(DECOUPLED_ENSEMBLE)) == fields
    older = ModelInfo(decoupled=True, inputs=frozenset({"text_input"}))
    adapted = for_model(fields, "ensemble", older)
    assert "apply_chat_template" not in adapted and adapted["text_input"] == chatml("Hi")
    assert fields["text_input"] == "Hi"  # the caller's fields are left alone


