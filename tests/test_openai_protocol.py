"""OpenAI request bodies into ensemble fields: what is accepted, and errors that name the field and bound."""

from __future__ import annotations

import pytest

from scalellm.router.openai_protocol import OpenAIError, parse_chat, parse_completion

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
    ({"model": "m", "messages": USER, "n": 3}, "n", "n must be"),
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
