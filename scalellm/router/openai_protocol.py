"""OpenAI request bodies -> ensemble fields (validated, errors naming the field), and the response objects.

Supported: ``model``, ``messages`` / ``prompt`` (one string), ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``presence_penalty``, ``frequency_penalty``, ``n`` (1 to 64:
the engine's ``num_return_sequences``), ``stream``, ``stream_options.include_usage``, ``logprobs`` (the sampled
tokens' log-probs; no alternatives, so ``top_logprobs`` / completions ``logprobs`` above 0 are refused), and
vLLM's extras ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stream_interval``. A field that would change the answer but is not implemented (``UNSUPPORTED``: tools,
structured output, logit bias, ...) is refused
naming it; other fields (``user``, ``metadata``, ``store``, ...) do not change the answer and are ignored.

``finish_reason`` is only ever one of OpenAI's values: the engine's ``stop`` and ``length`` as they are, its
``timeout`` (the request's deadline cut it short, the text so far is valid) as ``length``; ``shutdown`` and
``cancelled`` (the answer is incomplete for a reason other than a limit) are errors (``finish_error``).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_N = 64  # the engine's bound on num_return_sequences
# Fields that change the answer and are not implemented -> why; refused when set to anything but NEUTRAL's value.
UNSUPPORTED = {
    "tools": "tool calling is not implemented",
    "tool_choice": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    "response_format": "structured output is not implemented (only {\"type\": \"text\"})",
    "logit_bias": "logit bias is not implemented",
    "audio": "audio output is not implemented",
    "modalities": "only text output is implemented ([\"text\"])",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "web search is not implemented",
    "reasoning_effort": "this is not a reasoning model",
}
NEUTRAL: dict[str, Any] = {"tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"]}
# The engine's finish reasons -> OpenAI's (the others are errors: ``finish_error``).
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length"}


class OpenAIError(Exception):
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``; ``retry_after_s`` sends
    ``Retry-After``."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# What OpenAI's API does when a request leaves them out: sample at temperature 1 over the whole distribution.
# Sent explicitly, because the ensemble follows TensorRT-LLM and decodes greedily without top_k / top_p.
OPENAI_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


def bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param)


def rate_limited(message: str, retry_after_s: int) -> OpenAIError:
    """429 as OpenAI answers a rate limit (type ``requests``, code ``rate_limit_exceeded``): SDKs retry it after
    ``Retry-After``."""
    return OpenAIError(429, message, type_="requests", code="rate_limit_exceeded", retry_after_s=retry_after_s)


def openai_finish(reason: str) -> str:
    """The OpenAI ``finish_reason`` for the engine's, or the ``OpenAIError`` that ends the answer instead."""
    if reason in FINISH_REASONS:
        return FINISH_REASONS[reason]
    raise finish_error(reason)


def finish_error(reason: str) -> OpenAIError:
    if reason == "shutdown":
        return OpenAIError(503, "the server shut down before the answer was complete; retry", retry_after_s=1)
    return OpenAIError(500, f"the answer ended incomplete on the server (finish reason {reason!r})")


@dataclass
class GenerationRequest:
    """One OpenAI request, checked: what to send to the ensemble and how to answer."""

    model: str
    stream: bool
    include_usage: bool
    logprobs: bool
    max_tokens: int | None  # None: the router's default
    n: int = 1
    fields: dict[str, Any] = field(default_factory=dict)  # ensemble sampling fields
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # completions


def _number(body: dict[str, Any], name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(f"{name} must be {kind} (got {value!r})", name)
    if not math.isfinite(value) or not low <= value <= high:
        raise bad(f"{name} must be in [{low}, {high}] (got {value})", name)
    return value


def _bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false (got {value!r})", name)
    return value


def _common(body: dict[str, Any]) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required (a string; see GET /v1/models)", "model")
    for name, why in UNSUPPORTED.items():
        value = body.get(name)
        if value not in (None, [], {}) and value != NEUTRAL.get(name):
            raise bad(f"{name} is not supported: {why}", name)
    n = _number(body, "n", 1, MAX_N, integer=True) or 1
    stream = _bool(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    if options and not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    include_usage = _bool(options, "include_usage")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: max_tokens}, name, 1, 2**31 - 1, integer=True)
    fields: dict[str, Any] = dict(OPENAI_SAMPLING_DEFAULTS)
    for key, low, high, integer, target in (
        ("temperature", 0.0, 2.0, False, "temperature"),
        ("top_p", 1e-9, 1.0, False, "top_p"),
        ("seed", 0, 2**63 - 1, True, "seed"),
        ("presence_penalty", -2.0, 2.0, False, "presence_penalty"),
        ("frequency_penalty", -2.0, 2.0, False, "frequency_penalty"),
        ("top_k", 0, 2**31 - 1, True, "top_k"),
        ("min_p", 0.0, 1.0, False, "min_p"),
        ("repetition_penalty", 1e-9, 100.0, False, "repetition_penalty"),
        ("min_tokens", 0, 2**31 - 1, True, "min_tokens"),
        ("stream_interval", 1, 2**31 - 1, True, "stream_interval"),
    ):
        value = _number(body, key, low, high, integer)
        if value is not None:
            fields[target] = value
    stop = body.get("stop")
    if stop is not None:
        words = [stop] if isinstance(stop, str) else stop
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise bad("stop must be a non-empty string or a list of them", "stop")
        if words:
            fields["stop_words"] = words
    if _bool(body, "ignore_eos"):
        fields["end_id"] = -1
    if n > 1:
        fields["num_return_sequences"] = n
    return GenerationRequest(model=model, stream=stream, include_usage=include_usage, logprobs=False,
                             max_tokens=max_tokens, n=n, fields=fields)


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where}.content must be a string or a list of text parts", "messages")


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    request = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages is required: a non-empty list of {role, content}", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a role", "messages")
        if message["role"] not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}].role {message['role']!r} is not supported "
                      "(system, developer, user, assistant)", "messages")
        role = "system" if message["role"] == "developer" else message["role"]
        checked.append({"role": role, "content": _text_content(message.get("content"), f"messages[{i}]")})
    request.messages = checked
    request.logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, 20, integer=True)
    if top:
        raise bad("top_logprobs must be 0: the engine returns the sampled tokens' log-probs, not alternatives",
                  "top_logprobs")
    return request


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    request = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt must be a string (or a list of one string)", "prompt")
    if not prompt:
        raise bad("prompt must not be empty", "prompt")
    request.prompt = prompt
    for name in ("echo", "suffix"):
        if body.get(name):
            raise bad(f"{name} is not supported", name)
    best_of = _number(body, "best_of", 1, 1, integer=True)
    if best_of not in (None, 1):
        raise bad("best_of must be 1", "best_of")
    logprobs = _number(body, "logprobs", 0, 5, integer=True)
    if logprobs:
        raise bad("logprobs must be 0: the engine returns the sampled tokens' log-probs, not alternatives",
                  "logprobs")
    request.logprobs = logprobs == 0
    return request


# ---- responses -------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(tokens: list[tuple[str, float]]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in tokens]}


def completion_logprobs(tokens: list[tuple[str, float]], offset: int) -> dict[str, Any]:
    offsets = []
    for t, _ in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": [t for t, _ in tokens], "token_logprobs": [lp for _, lp in tokens],
            "top_logprobs": None, "text_offset": offsets}
