"""Result and error types shared by the sync and asyncio clients."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    """A finished generation (``generate``)."""

    text: str
    num_tokens: int
    finish_reason: str
    cum_log_prob: float | None = None
    log_probs: list[float] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the server's prefix cache
    timings: dict[str, int] | None = None  # engine wall-clock marks (ns), with return_perf_metrics=True


@dataclass
class StreamChunk:
    """One streamed response: its text delta (may be empty), tokens generated so far, and
    ``finish_reason`` ("" until the last chunk, then "stop" | "length" | "cancelled")."""

    text: str
    num_tokens: int
    finish_reason: str
    timings: dict[str, int] | None = None  # engine wall-clock marks (ns), with return_perf_metrics=True


class ScaleLLMError(Exception):
    """Any failure reported by (or while reaching) the server.

    ``status`` is the HTTP status code (int) for HTTP errors, "timeout" when ``timeout_s`` ran
    out (either protocol), the gRPC status name (str, e.g. "StatusCode.UNAVAILABLE") when Triton's
    gRPC client reports one, otherwise None.
    """

    def __init__(self, message: str, status: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def timed_out() -> ScaleLLMError:
    return ScaleLLMError("timed out waiting for the server", status="timeout")
