"""Per-request deadlines (queue + generation) and the drain deadline, checked by the engine loop.

A request past its own deadline ends with finish reason ``"timeout"``; once a drain deadline has passed,
every request still in the engine ends with ``"shutdown"``. Both keep the tokens generated so far.
"""

from __future__ import annotations

import heapq
import time

TIMEOUT = "timeout"
SHUTDOWN = "shutdown"


class Deadlines:
    """Owned by the engine loop thread (``add``/``discard``/``expired``); ``drain_at`` from any thread."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []  # (monotonic deadline, request id); stale entries skipped
        self._live: dict[str, float] = {}
        self.drain_deadline: float | None = None  # monotonic

    def add(self, request_id: str, deadline: float | None) -> None:
        """Track ``deadline`` (``time.monotonic()`` seconds, taken when the request arrived; None: none)."""
        if deadline is None:
            return
        self._live[request_id] = deadline
        heapq.heappush(self._heap, (deadline, request_id))

    def discard(self, request_id: str) -> None:
        self._live.pop(request_id, None)

    def drain_at(self, deadline_unix_s: float) -> None:
        self.drain_deadline = time.monotonic() + max(0.0, deadline_unix_s - time.time())

    def next_wakeup_s(self, default: float) -> float:
        """How long the idle loop may sleep without missing a deadline."""
        now = time.monotonic()
        soonest = [d for d in (self._heap[0][0] if self._heap else None, self.drain_deadline) if d is not None]
        return max(0.0, min([default, *(d - now for d in soonest)]))

    def expired(self, in_flight: list[str]) -> list[tuple[str, str]]:
        """(request id, finish reason) of every request in ``in_flight`` whose time is up."""
        now = time.monotonic()
        if self.drain_deadline is not None and now >= self.drain_deadline:
            return [(rid, SHUTDOWN) for rid in in_flight]
        out = []
        while self._heap and self._heap[0][0] <= now:
            deadline, rid = heapq.heappop(self._heap)
            if self._live.get(rid) == deadline:
                del self._live[rid]
                out.append((rid, TIMEOUT))
        return out


MAX_TIMEOUT_MS = 86_400_000  # one day: longer is a client bug, not a deadline


def request_timeout_s(timeout_ms: int | None, default_ms: int = 0) -> float | None:
    """A request's ``timeout_ms`` input (absent or 0: the model's ``default_timeout_ms``; 0 there: none)."""
    value = int(timeout_ms) if timeout_ms is not None else 0
    if value < 0 or value > MAX_TIMEOUT_MS:
        raise ValueError(f"timeout_ms must be between 0 and {MAX_TIMEOUT_MS} (got {value})")
    value = value or default_ms
    return value / 1000.0 if value > 0 else None
