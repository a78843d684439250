"""Result and error types shared by the sync and asyncio clients."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Choice:
    """One generated sequence (``num_return_sequences`` > 1 gives several, ``index`` 0, 1, ...)."""

    index: int
    text: str
    num_tokens: int  # output tokens (0 if the server did not say)
    finish_reason: str  # "stop" | "length" | "cancelled"
    cum_log_prob: float | None = None
    log_probs: list[float] | None = None


@dataclass
class Completion:
    """A finished generation (``generate``): every sequence in ``choices``, and the first one's
    ``text``, ``num_tokens``, ``finish_reason``, ``cum_log_prob`` and ``log_probs`` at the top."""

    choices: list[Choice]
    num_input_tokens: int | None = None  # prompt tokens, with return_num_input_tokens=True
    num_cached_tokens: int = 0  # prompt tokens served from the server's prefix cache
    timings: dict[str, int] | None = None  # engine wall-clock marks (ns), with return_perf_metrics=True

    @property
    def texts(self) -> list[str]:
        return [choice.text for choice in self.choices]

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def num_tokens(self) -> int:
        return self.choices[0].num_tokens

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def cum_log_prob(self) -> float | None:
        return self.choices[0].cum_log_prob

    @property
    def log_probs(self) -> list[float] | None:
        return self.choices[0].log_probs


@dataclass
class StreamChunk:
    """One streamed response: its text delta (may be empty), tokens generated so far, and
    ``finish_reason`` ("" until the sequence's last chunk, then "stop" | "length" | "cancelled").
    ``index`` says which sequence the chunk belongs to when ``num_return_sequences`` > 1."""

    text: str
    num_tokens: int
    finish_reason: str
    timings: dict[str, int] | None = None  # engine wall-clock marks (ns), with return_perf_metrics=True
    index: int = 0
    num_input_tokens: int | None = None  # with return_num_input_tokens=True


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
