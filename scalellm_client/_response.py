"""Read ensemble outputs into Completion / StreamChunk, and SSE framing for HTTP streaming.

Outputs arrive as numpy arrays (gRPC) or JSON values (HTTP: a scalar or a possibly nested list), in
either of the shapes servers use: ``text_output`` ``[1, 1]`` (older builds) or one string per
request (NVIDIA's 1-D shape), and several strings when one response carries several sequences.
So every reader flattens with ``np.asarray`` and takes the k-th value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._types import Choice, Completion, ScaleLLMError, StreamChunk

Outputs = Mapping[str, Any]

PERF_OUTPUTS = ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")


def _flat(outputs: Outputs, name: str) -> list[Any]:
    value = outputs.get(name)
    return [] if value is None else list(np.asarray(value, dtype=object).reshape(-1))


def _at(values: Sequence[Any], k: int) -> Any | None:
    """The k-th value, or the only one (a per-request value shared by every sequence), or None."""
    if k < len(values):
        return values[k]
    return values[0] if len(values) == 1 else None


def _text(item: Any | None) -> str:
    if item is None:
        return ""
    if isinstance(item, bytes | np.bytes_):
        return bytes(item).decode("utf-8", errors="replace")
    return str(item)


def _int(item: Any | None) -> int | None:
    return None if item is None else int(item)


def output_text(outputs: Outputs, name: str) -> str:
    """The first value of a BYTES output as text ("" when absent)."""
    return _text(_at(_flat(outputs, name), 0))


def count_finished(outputs: Outputs) -> int:
    """How many sequences this response ends (a non-empty ``finish_reason`` each)."""
    return sum(1 for reason in _flat(outputs, "finish_reason") if _text(reason))


def _log_prob_rows(outputs: Outputs) -> list[list[float]]:
    """Per-token log-probs, one row per sequence, from ``[1, seqs, n]``, ``[1, n]``, ``[n]`` or nested JSON."""
    value = outputs.get("output_log_probs")
    if value is None:
        return []
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        return []
    return [[float(x) for x in row] for row in array.reshape(-1, array.shape[-1])]


def _timings(outputs: Outputs) -> dict[str, int] | None:
    """The engine's marks, or None when the server sent none (return_perf_metrics not set)."""
    marks = {name: _int(_at(_flat(outputs, name), 0)) or 0 for name in PERF_OUTPUTS}
    return marks if any(marks.values()) else None


def _choices(outputs: Outputs, first_index: int) -> list[Choice]:
    """The sequences one response carries, numbered by ``sequence_index`` when the server sends it."""
    texts = _flat(outputs, "text_output") or [""]
    indices, reasons = _flat(outputs, "sequence_index"), _flat(outputs, "finish_reason")
    tokens, cum_log_probs, rows = _flat(outputs, "num_output_tokens"), _flat(outputs, "cum_log_probs"), \
        _log_prob_rows(outputs)
    choices = []
    for k, text in enumerate(texts):
        index = _int(_at(indices, k))
        cum_log_prob = _at(cum_log_probs, k)
        choices.append(Choice(index=first_index + k if index is None else index, text=_text(text),
                              num_tokens=_int(_at(tokens, k)) or 0, finish_reason=_text(_at(reasons, k)),
                              cum_log_prob=None if cum_log_prob is None else float(cum_log_prob),
                              log_probs=_at(rows, k)))
    return choices


def _first_int(responses: Sequence[Outputs], name: str) -> int | None:
    for outputs in responses:
        value = _int(_at(_flat(outputs, name), 0))
        if value is not None:
            return value
    return None


def to_completion(responses: Sequence[Outputs], sequences: int = 1) -> Completion:
    """The responses of one ``stream=false`` request: one per sequence, or one holding them all."""
    choices: list[Choice] = []
    for outputs in responses:
        choices += _choices(outputs, len(choices))
    if len(choices) != sequences:
        raise ScaleLLMError(f"expected {sequences} sequence(s) in the response(s) to a non-streaming request, "
                            f"got {len(choices)} in {len(responses)} response(s)")
    choices.sort(key=lambda choice: choice.index)
    return Completion(choices=choices, num_input_tokens=_first_int(responses, "num_input_tokens"),
                      num_cached_tokens=_first_int(responses, "num_cached_tokens") or 0,
                      timings=next(filter(None, map(_timings, responses)), None))


def to_chunk(outputs: Outputs) -> StreamChunk:
    choice = _choices(outputs, 0)[0]
    return StreamChunk(text=choice.text, num_tokens=choice.num_tokens, finish_reason=choice.finish_reason,
                       timings=_timings(outputs), index=choice.index,
                       num_input_tokens=_first_int([outputs], "num_input_tokens"))


class SSEParser:
    """Incremental Server-Sent Events framing: feed it lines, get back the events they complete.

    Only ``data:`` fields matter to Triton's ``generate_stream``; comments and other fields are
    ignored. An event ends at a blank line, or at the end of the stream (feed ``b""``).
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: bytes | str) -> list[dict[str, Any]]:
        """The events (parsed, see ``parse_event``) that ``line`` completes; ``b""`` ends the stream."""
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        text = line.rstrip("\r\n")
        if text.startswith("data:"):
            value = text[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        if text:  # a field (or comment) of an unfinished event
            return []
        data, self._data = "\n".join(self._data), []
        return [parse_event(data)] if data else []


def parse_event(data: str) -> dict[str, Any]:
    """One SSE event's (or ``generate`` response's) JSON; an ``{"error": ...}`` event becomes ScaleLLMError."""
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise ScaleLLMError(f"malformed event from server: {data[:200]!r} ({exc})") from None
    if not isinstance(event, dict):
        raise ScaleLLMError(f"malformed event from server: {data[:200]!r}")
    if "error" in event:
        raise ScaleLLMError(str(event["error"]))
    return event


def error_message(body: bytes) -> str:
    """The server's message from an HTTP error body (``{"error": msg}``, possibly SSE-framed),
    else the body itself."""
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("data:"):  # generate_stream frames even its error body as an SSE event
        text = text[5:]
    try:
        event = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(event, dict) and "error" in event:
        return str(event["error"])
    return text.strip()
