"""OpenAI request bodies into ensemble fields: what is accepted, and errors that name the field and bound."""

from __future__ import annotations

import pytest

from scalellm.router.openai_protocol import OpenAIError, openai_finish, parse_chat, parse_completion

USER = [{"role": "user", "content": "hi"}]


def test_chat_request_maps_to_ensemble_fields() -> None:
    request = parse_chat({"model": "m", "messages": USER, "temperature": 0.5, "top_p": 0.9, "seed": 7,
                          "stop": "END", "max_tokens": 12, "presence_penalty": 0.1, "frequency_penalty": -0.1,
                          "stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
                          "top_k": 5, "ignore_eos": True, "stream_interval": 4, "user": "ignored"})
    assert request.fields == {"temperature": 0.5, "top_p": 0.9, "seed": 7, "stop_words": ["END"],
                              "presence_penalty": 0.1, "frequency_penalty": -0.1, "top_k": 5, "stream_interval": 4,
                              "end_id": -1}
    assert (request.max_tokens, request.stream, request.include_usage, request.logprobs) == (12, True, True, True)
    assert parse_chat({"model": "m", "messages": USER}).max_tokens is None  # the router's default applies
    assert parse_chat({"model": "m", "messages": USER, "max_completion_tokens": 3}).max_tokens == 3


def test_openai_sampling_defaults_are_sent_explicitly() -> None:
    """OpenAI samples at temperature 1, top_p 1 when a request leaves them out; the ensemble would be greedy."""
    for parse, body in ((parse_chat, {"messages": USER}), (parse_completion, {"prompt": "hi"})):
        assert parse({"model": "m", **body}).fields == {"temperature": 1.0, "top_p": 1.0}
        assert parse({"model": "m", "temperature": 0, **body}).fields == {"temperature": 0, "top_p": 1.0}
        assert parse({"model": "m", "top_k": 3, **body}).fields == {"temperature": 1.0, "top_p": 1.0, "top_k": 3}


def test_n_and_the_neutral_values_of_unsupported_fields_are_accepted() -> None:
    request = parse_chat({"model": "m", "messages": USER, "n": 3, "tools": [], "tool_choice": "none",
                          "response_format": {"type": "text"}, "logit_bias": {}, "modalities": ["text"],
                          "parallel_tool_calls": True, "user": "u", "metadata": {"a": "b"}, "store": False})
    openai_defaults = {"temperature": 1.0, "top_p": 1.0}
    assert request.n == 3 and request.fields == {**openai_defaults, "num_return_sequences": 3}
    assert parse_chat({"model": "m", "messages": USER}).fields == openai_defaults  # n = 1: the ensemble's default


def test_finish_reasons_are_openais() -> None:
    assert [openai_finish(r) for r in ("stop", "length", "timeout")] == ["stop", "length", "length"]
    with pytest.raises(OpenAIError, match="shut down") as shutdown:
        openai_finish("shutdown")
    assert shutdown.value.status == 503 and shutdown.value.headers() == {"Retry-After": "1"}
    with pytest.raises(OpenAIError, match="cancelled") as cancelled:
        openai_finish("cancelled")
    assert cancelled.value.status == 500 and cancelled.value.body()["error"]["type"] == "server_error"


def test_chat_content_parts_and_roles() -> None:
    request = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert request.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"messages": USER}, "model", "model is required"),
    ({"model": "m"}, "messages", "messages is required"),
    ({"model": "m", "messages": []}, "messages", "non-empty"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages", "not supported"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "text"),
    ({"model": "m", "messages": USER, "temperature": 2.5}, "temperature", r"\[0.0, 2.0\] \(got 2.5\)"),
    ({"model": "m", "messages": USER, "temperature": "hot"}, "temperature", "must be a number"),
    ({"model": "m", "messages": USER, "top_p": 0}, "top_p", "top_p must be in"),
    ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens", r"\[1, "),
    ({"model": "m", "messages": USER, "max_tokens": 1.5}, "max_tokens", "integer"),
    ({"model": "m", "messages": USER, "seed": -1}, "seed", "seed must be in"),
    ({"model": "m", "messages": USER, "n": 65}, "n", r"n must be in \[1, 64\]"),
    ({"model": "m", "messages": USER, "n": 0}, "n", "n must be"),
    ({"model": "m", "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "tools is not supported"),
    ({"model": "m", "messages": USER, "tool_choice": "auto"}, "tool_choice", "tool calling"),
    ({"model": "m", "messages": USER, "response_format": {"type": "json_object"}}, "response_format",
     "structured output"),
    ({"model": "m", "messages": USER, "logit_bias": {"50256": -100}}, "logit_bias", "logit bias"),
    ({"model": "m", "messages": USER, "modalities": ["text", "audio"]}, "modalities", "text"),
    ({"model": "m", "messages": USER, "stop": [""]}, "stop", "stop must be"),
    ({"model": "m", "messages": USER, "stream": "yes"}, "stream", "true or false"),
    ({"model": "m", "messages": USER, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"model": "m", "messages": USER, "top_logprobs": 2}, "top_logprobs", "alternatives"),
    ({"model": "m", "messages": USER, "stream_interval": 0}, "stream_interval", r"\[1, "),
])
def test_bad_chat_requests_name_the_field(body: dict, param: str, message: str) -> None:
    with pytest.raises(OpenAIError, match=message) as caught:
        parse_chat(body)
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_completion_requests() -> None:
    request = parse_completion({"model": "m", "prompt": ["Once"], "logprobs": 0})
    assert (request.prompt, request.logprobs) == ("Once", True)
    assert parse_completion({"model": "m", "prompt": "x"}).logprobs is False
    for body, param in (({"model": "m", "prompt": [1, 2]}, "prompt"), ({"model": "m", "prompt": ""}, "prompt"),
                        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
                        ({"model": "m", "prompt": "x", "logprobs": 3}, "logprobs"),
                        ({"model": "m", "prompt": "x", "best_of": 2}, "best_of")):
        with pytest.raises(OpenAIError) as caught:
            parse_completion(body)
        assert caught.value.param == param
