"""Read ensemble outputs into Completion / StreamChunk, and SSE framing for HTTP streaming.

Outputs arrive as numpy arrays (gRPC, shapes ``[1, ...]``) or JSON values (HTTP ``generate``:
a scalar or a possibly nested list), so every reader goes through ``np.asarray`` and takes the
first batch row / first beam.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._types import Completion, ScaleLLMError, StreamChunk

Outputs = Mapping[str, Any]


def _first(value: Any) -> Any | None:
    if value is None:
        return None
    flat = np.asarray(value, dtype=object).reshape(-1)
    return flat[0] if flat.size else None


def output_text(outputs: Outputs, name: str) -> str:
    item = _first(outputs.get(name))
    if item is None:
        return ""
    if isinstance(item, bytes | np.bytes_):
        return bytes(item).decode("utf-8", errors="replace")
    return str(item)


def _int(outputs: Outputs, name: str) -> int:
    item = _first(outputs.get(name))
    return 0 if item is None else int(item)


def _cum_log_prob(outputs: Outputs) -> float | None:
    item = _first(outputs.get("cum_log_probs"))
    return None if item is None else float(item)


def _log_probs(outputs: Outputs) -> list[float] | None:
    """Beam 0's per-token log-probs from ``[1, beams, n]``, ``[1, n]``, ``[n]`` or a nested JSON list."""
    value = outputs.get("output_log_probs")
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        return None
    if array.ndim > 1:
        array = array.reshape(-1, array.shape[-1])[0]
    return [float(x) for x in array.reshape(-1)]


PERF_OUTPUTS = ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")


def _timings(outputs: Outputs) -> dict[str, int] | None:
    """The engine's marks, or None when the server sent none (return_perf_metrics not set: all 0)."""
    marks = {name: _int(outputs, name) for name in PERF_OUTPUTS}
    return marks if any(marks.values()) else None


def to_completion(outputs: Outputs) -> Completion:
    return Completion(
        text=output_text(outputs, "text_output"),
        num_tokens=_int(outputs, "num_output_tokens"),
        finish_reason=output_text(outputs, "finish_reason"),
        cum_log_prob=_cum_log_prob(outputs),
        log_probs=_log_probs(outputs),
        num_cached_tokens=_int(outputs, "num_cached_tokens"),
        timings=_timings(outputs),
    )


def to_chunk(outputs: Outputs) -> StreamChunk:
    return StreamChunk(
        text=output_text(outputs, "text_output"),
        num_tokens=_int(outputs, "num_output_tokens"),
        finish_reason=output_text(outputs, "finish_reason"),
        timings=_timings(outputs),
    )


def single(responses: list[Outputs]) -> Outputs:
    """The one response a ``stream=false`` request must produce."""
    if len(responses) != 1:
        raise ScaleLLMError(f"expected one response to a non-streaming request, got {len(responses)}")
    return responses[0]


class SSEParser:
    """Incremental Server-Sent Events framing: feed it lines, get each event's ``data`` back.

    Only ``data:`` fields matter to Triton's ``generate_stream``; comments and other fields
    are ignored. An event ends at a blank line (or at end of stream: call ``flush``).
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: bytes | str) -> str | None:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def parse_event(data: str) -> dict[str, Any]:
    """One SSE event's JSON; an ``{"error": ...}`` event becomes ScaleLLMError."""
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

