"""Admission control: a bounded number of requests in the engine, and a clean "busy" answer past it.

An engine with ``max_num_seqs`` slots admits at most ``max_num_seqs + max_queue_size`` requests at once
(running + waiting, preempted ones included); the next gets ``ServerBusy`` at once instead of waiting
without bound. Draining or a dead engine closes admission for good. The llm model turns every
``Unavailable`` into ``TritonError.UNAVAILABLE``. Triton 2.51 does not carry that code to clients of a
decoupled model: HTTP ``generate``/``generate_stream`` answer 400 and a gRPC stream carries only the error
message (prefixed "in ensemble 'ensemble', " through the ensemble). So the message is the contract: it
holds one of ``RETRYABLE``, and the router recognises it with ``is_retryable`` (scalellm/router/upstream.py,
triton_grpc.py): it tries the request again, on another replica first, and what it cannot place gets 429/503 +
Retry-After (scalellm/router/slots.py).
"""

from __future__ import annotations

import threading

from scalellm.config import SchedulerConfig

RETRYABLE = ("server busy", "server shutting down", "engine failed")


def exceeds_context(prompt_len: int, max_tokens: int, max_model_len: int) -> str | None:
    """Why prompt + max_tokens can never fit a ``max_model_len``-token context (a message naming it), or None."""
    total = prompt_len + max_tokens
    if total > max_model_len:
        return (f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"context length of {max_model_len} tokens")
    return None


def is_retryable(message: str) -> bool:
    """Whether an error message from the server means "not now, retry later or elsewhere"."""
    return any(marker in message for marker in RETRYABLE)


class Unavailable(RuntimeError):
    """The engine cannot take this request now; ``reason`` labels the rejection metric."""

    reason = "unavailable"


class ServerBusy(Unavailable):
    reason = "busy"


class ServerDraining(Unavailable):
    reason = "draining"


class EngineFailed(Unavailable):
    reason = "engine_failed"


def default_queue_size(config: SchedulerConfig, num_blocks: int, block_size: int) -> int:
    """Without ``max_queue_size``: as many waiting requests as the KV cache holds prefill chunks of
    ``max_num_batched_tokens`` (what it can start soon), and never fewer than ``max_num_seqs``."""
    return max(config.max_num_seqs, num_blocks * block_size // config.max_num_batched_tokens)


class Admission:
    """Counts requests admitted and not yet finished; thread-safe (``submit`` runs on Triton's threads)."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.lock = threading.Lock()  # held by the engine around admit + enqueue, so close() is a barrier
        self.in_flight = 0
        self.rejected = 0
        self._closed: Unavailable | None = None

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_waiting

    def admit(self) -> None:
        """Count one more request in (call with ``lock`` held), or raise an ``Unavailable``."""
        if self._closed is not None:
            self.rejected += 1
            raise type(self._closed)(str(self._closed))
        if self.in_flight >= self.capacity:
            self.rejected += 1
            raise ServerBusy(
                f"server busy: {self.in_flight} requests in flight, the limit is {self.capacity} "
                f"({self.max_running} running + max_queue_size {self.max_waiting} waiting); retry later"
            )
        self.in_flight += 1

    def release(self) -> None:
        with self.lock:
            self.in_flight = max(0, self.in_flight - 1)

    def close(self, error: Unavailable) -> None:
        """Reject every later request with ``error`` (draining, or the engine died)."""
        with self.lock:
            if self._closed is None or isinstance(error, EngineFailed):
                self._closed = error
