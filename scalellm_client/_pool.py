"""Idle connections kept for reuse by the synchronous transports (thread-safe)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Generic, TypeVar

from ._types import ScaleLLMError

T = TypeVar("T")


class Pool(Generic[T]):
    """One connection per call in flight: ``borrow`` an idle one (or a new one from ``connect``),
    ``give_back`` it when the call ended cleanly so the next call skips the reconnect, or
    ``discard`` it. Calls from many threads therefore never share a connection."""

    def __init__(self, connect: Callable[[], T], disconnect: Callable[[T], None]) -> None:
        self._connect = connect
        self._disconnect = disconnect
        self._idle: queue.SimpleQueue[T] = queue.SimpleQueue()
        self.closed = False

    def borrow(self) -> tuple[T, bool]:
        """``(connection, reused)``: ``reused`` says the server may have closed it meanwhile."""
        if self.closed:
            raise ScaleLLMError("client is closed")
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            return self._connect(), False

    def give_back(self, connection: T, reusable: bool = True) -> None:
        if reusable and not self.closed:
            self._idle.put(connection)
        else:
            self.discard(connection)

    def discard(self, connection: T) -> None:
        try:
            self._disconnect(connection)
        except Exception:  # closing a broken connection may fail; it is gone either way
            pass

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                self.discard(self._idle.get_nowait())
            except queue.Empty:
                return
