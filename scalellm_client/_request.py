"""Turn ``generate(prompt, **sampling)`` arguments into ensemble inputs (pure, no I/O).

The tensor names, Triton datatypes and shapes are the ensemble contract (tensorrtllm_backend's
``inflight_batcher_llm`` names): batch 1, so scalars are ``[1, 1]`` and word lists ``[1, n]``.

Why the client cancels explicitly (the transports' ``cancel`` methods do what this says):
Triton 2.51 does not pass a cancelled *ensemble* request on to its composing models, so closing the
gRPC stream or the HTTP connection alone leaves the ``llm`` step generating for a client that has
gone, and Triton then counts the request in flight forever. Every request therefore carries a unique
request id (the HTTP JSON ``id``), which the ensemble passes on to ``llm``, and ``llm`` accepts a
control request holding only ``cancel_request_id``. A client that leaves a request early sends that
control request, then reads the abandoned stream to its final ("cancelled") response, so the request
is released normally; only if that response does not come within ``DRAIN_TIMEOUT_S`` is the stream
or connection dropped.
"""

from __future__ import annotations

import math
import numbers
import operator
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._types import ScaleLLMError
from .chat import chatml

CANCEL_TIMEOUT_S = 2.0  # seconds an explicit cancel may take; it is best effort
DRAIN_TIMEOUT_S = 5.0  # after a cancel, how long to wait for the abandoned request's final response

# keyword argument -> (ensemble input name, Triton datatype). BYTES entries are word lists.
SAMPLING_INPUTS: Mapping[str, tuple[str, str]] = {
    "max_tokens": ("max_tokens", "INT32"),
    "chat": ("apply_chat_template", "BOOL"),
    "temperature": ("temperature", "FP32"),
    "top_k": ("top_k", "INT32"),
    "top_p": ("top_p", "FP32"),
    "min_p": ("min_p", "FP32"),
    "seed": ("seed", "UINT64"),
    "stop": ("stop_words", "BYTES"),
    "bad_words": ("bad_words", "BYTES"),
    "num_return_sequences": ("num_return_sequences", "INT32"),
    "exclude_input_in_output": ("exclude_input_in_output", "BOOL"),
    "return_log_probs": ("return_log_probs", "BOOL"),
    "return_perf_metrics": ("return_perf_metrics", "BOOL"),
    "return_num_input_tokens": ("return_num_input_tokens", "BOOL"),
    "return_num_output_tokens": ("return_num_output_tokens", "BOOL"),
    "repetition_penalty": ("repetition_penalty", "FP32"),
    "presence_penalty": ("presence_penalty", "FP32"),
    "frequency_penalty": ("frequency_penalty", "FP32"),
    "min_tokens": ("min_tokens", "INT32"),
    "end_id": ("end_id", "INT32"),
    "pad_id": ("pad_id", "INT32"),
    "beam_width": ("beam_width", "INT32"),
    "length_penalty": ("length_penalty", "FP32"),
    "stream_interval": ("stream_interval", "INT32"),
}

INPUT_DTYPES: Mapping[str, str] = {
    "text_input": "BYTES",
    "stream": "BOOL",
    **{name: dtype for name, dtype in SAMPLING_INPUTS.values()},
}

_INT_BOUNDS = {"INT32": (-(2**31), 2**31 - 1), "UINT64": (0, 2**64 - 1)}
_NUMPY_DTYPES = {"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_}


def build_request(prompt: str, *, stream: bool, **sampling: Any) -> dict[str, Any]:
    """Ensemble inputs for one request as ``{input name: JSON-able value}``.

    Only ``text_input``, ``exclude_input_in_output`` (default True: the answer without the prompt),
    ``stream`` and the sampling arguments the caller set (not None) are included, so the server's
    defaults apply to the rest (``max_tokens`` too: the ensemble's own default, one value for every
    client); plus ``top_p=1.0`` when the caller asks for sampling with ``temperature`` > 0 or ``min_p`` > 0
    but sets neither ``top_k`` nor ``top_p`` (see :func:`sampling_intent`). Word lists (``stop``,
    ``bad_words``) accept a str or a list of str; empty lists are left out.
    ``chat=True`` asks the server to apply the model's chat template to the prompt (one user turn).
    Raises TypeError for an unknown argument or a value of the wrong type, ValueError for an
    integer outside the input's datatype range.
    """
    unknown = sorted(set(sampling) - set(SAMPLING_INPUTS))
    if unknown:
        raise TypeError(f"unexpected sampling argument(s): {', '.join(unknown)}; "
                        f"expected some of: {', '.join(SAMPLING_INPUTS)}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str (got {type(prompt).__name__})")
    sampling = sampling_intent({"exclude_input_in_output": True, **sampling})  # the server's default: echo
    fields: dict[str, Any] = {"text_input": prompt}
    for key, value in sampling.items():
        if value is None:
            continue
        name, dtype = SAMPLING_INPUTS[key]
        value = _coerce(key, value, dtype)
        if value == [] or (key == "chat" and value is False):
            continue
        fields[name] = value
    fields["stream"] = bool(stream)
    return fields


def sampling_intent(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """``sampling`` with ``top_p=1.0`` added when it asks for sampling by temperature or min_p alone.

    The server follows TensorRT-LLM: without ``top_k`` or ``top_p`` it decodes greedily whatever the
    temperature. A caller of this client who writes ``temperature=0.8`` means sampling (as in OpenAI's and
    vLLM's APIs), so the client says so explicitly: over the whole distribution (top_p 1.0)."""
    asked = any(isinstance(sampling.get(k), numbers.Real) and sampling[k] > 0 for k in ("temperature", "min_p"))
    if asked and sampling.get("top_k") is None and sampling.get("top_p") is None:
        return {**sampling, "top_p": 1.0}
    return dict(sampling)


def _coerce(key: str, value: Any, dtype: str) -> Any:
    """Check one argument against its datatype; return it as a plain Python value."""
    if dtype == "BYTES":
        words = [value] if isinstance(value, str) else value
        if not isinstance(words, list | tuple) or not all(isinstance(w, str) for w in words):
            raise TypeError(f"{key} must be a str or a list of str (got {value!r})")
        return list(words)
    if dtype == "BOOL":
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{key} must be a bool (got {value!r})")
        return bool(value)
    if isinstance(value, bool):  # bool is an int subclass; True as a temperature is a mistake
        raise TypeError(f"{key} must be a number (got {value!r})")
    if dtype == "FP32":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{key} must be a number (got {value!r})") from None
        if not math.isfinite(number):
            raise ValueError(f"{key} must be finite (got {number})")
        return number
    try:
        integer = operator.index(value)
    except TypeError:
        raise TypeError(f"{key} must be an int (got {value!r})") from None
    low, high = _INT_BOUNDS[dtype]
    if not low <= integer <= high:
        raise ValueError(f"{key} must be in [{low}, {high}] for {dtype} (got {integer})")
    return integer


def one_sequence(sampling: Mapping[str, Any]) -> None:
    """``stream()`` yields one text; several sequences' deltas interleave, so they need ``stream_chunks``."""
    if sampling.get("num_return_sequences") not in (None, 1):
        raise ValueError("stream() joins the deltas of one sequence: with num_return_sequences > 1 use "
                         "stream_chunks(), whose chunks carry the sequence's index")


def num_sequences(fields: Mapping[str, Any]) -> int:
    """How many sequences (each ending with its own ``finish_reason``) the request asks for."""
    return max(1, int(fields.get("num_return_sequences", 1)))


@dataclass(frozen=True)
class ModelInfo:
    """What the client needs to know of the served model: its transaction policy and its inputs."""

    decoupled: bool
    inputs: frozenset[str]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelInfo:
        """From Triton's model configuration as JSON (HTTP ``/config``; gRPC's is wrapped in ``config``)."""
        config = config.get("config", config)
        policy = config.get("model_transaction_policy") or {}
        return cls(decoupled=bool(policy.get("decoupled", False)),
                   inputs=frozenset(tensor["name"] for tensor in config.get("input", [])))


def for_model(fields: Mapping[str, Any], model: str, info: ModelInfo) -> dict[str, Any]:
    """``fields`` as ``model`` can serve them.

    A model that is not decoupled answers each request with exactly one response, so it cannot
    stream: asking it to is a ScaleLLMError. ``chat=True`` against a server whose ensemble has no
    ``apply_chat_template`` input (older builds) falls back to formatting the prompt as ChatML here
    (SmolLM2's template, see ``chat.chatml``).
    """
    if fields.get("stream") and not info.decoupled:
        raise ScaleLLMError(f"model {model!r} is not decoupled (one response per request), so it cannot "
                            "stream: call generate(), or serve a repository built in decoupled mode")
    adapted = dict(fields)
    if adapted.get("apply_chat_template") and "apply_chat_template" not in info.inputs:
        del adapted["apply_chat_template"]
        adapted["text_input"] = chatml(adapted["text_input"])
    return adapted


def new_request_id() -> str:
    """A unique Triton request id, so an abandoned request can be cancelled explicitly by id."""
    return uuid.uuid4().hex


def to_arrays(fields: Mapping[str, Any]) -> list[tuple[str, np.ndarray, str]]:
    """``(name, array, Triton datatype)`` per input, shaped ``[1, 1]`` or ``[1, n]`` (batch of one)."""
    arrays = []
    for name, value in fields.items():
        dtype = INPUT_DTYPES[name]
        if dtype == "BYTES":
            items = value if isinstance(value, list) else [value]
            array = np.array([[item.encode("utf-8") for item in items]], dtype=np.object_)
        else:
            array = np.array([[value]], dtype=_NUMPY_DTYPES[dtype])
        arrays.append((name, array, dtype))
    return arrays


def normalize_url(url: str | None, protocol: str) -> str:
    """``host:port`` for gRPC, ``http(s)://host:port`` for HTTP; the default port follows Triton's."""
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http' (got {protocol!r})")
    if url is None:
        return "127.0.0.1:8001" if protocol == "grpc" else "http://127.0.0.1:8000"
    url = url.rstrip("/")
    if protocol == "grpc":
        for scheme in ("grpc://", "http://"):
            url = url.removeprefix(scheme)
        return url
    return url if "://" in url else f"http://{url}"
