"""An engine serving Triton requests: parse, submit, stream responses back, cancel.

The engine's loop thread only queues outputs; a sender thread turns them into responses, so response IPC
never stalls the engine. The sender takes every output waiting at once, so a request whose responses fall
behind gets its pending tokens in one response (``pacing.py``: coalescing and ``stream_interval``).
``num_return_sequences`` > 1: the first sequence is submitted alone and its siblings (seeds ``seed + i``)
once it has produced output, i.e. once its prompt's full KV blocks are in the prefix cache, so they share
those blocks instead of recomputing them.

Triton-free: the ``llm`` model adapts ``pb_utils`` senders to :class:`Responder`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from scalellm.config import StreamConfig
from scalellm.drain import DrainWatch
from scalellm.engine.admission import Unavailable
from scalellm.engine.deadlines import request_timeout_s
from scalellm.engine.engine import LLMEngine
from scalellm.engine.sequence import RequestOutput, Sequence
from scalellm.triton import response
from scalellm.triton.request import EngineLimits, LLMRequest, parse
from scalellm.triton.tensors import Get, InvalidInput, scalar

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.25


class Responder(Protocol):
    def send(self, tensors: dict[str, np.ndarray] | None, error: str | None = None, final: bool = False,
             invalid: bool = False, unavailable: bool = False) -> None: ...

    def is_cancelled(self) -> bool: ...


@dataclass
class Active:
    triton_id: str
    responder: Responder
    request: LLMRequest
    seqs: list[response.SequenceProgress]
    engine_ids: list[str]
    timeout_s: float | None = None
    pending: list[Sequence] = field(default_factory=list)  # siblings waiting for the first sequence's prefill
    finished: bool = False


class EngineHost:
    def __init__(self, engine: LLMEngine, decoupled: bool, on_log=log.info, default_timeout_ms: int = 0,
                 on_reject: Callable[[str], None] = lambda reason: None,
                 exit_process: Callable[[], None] = lambda: os._exit(1),
                 stream: StreamConfig = StreamConfig()) -> None:  # noqa: B008 - frozen, never mutated
        self.engine = engine
        self.default_timeout_ms = default_timeout_ms
        self.stream = stream
        self.on_reject = on_reject  # counts a rejection by reason (busy, draining, engine_failed)
        self.exit_process = exit_process  # once a dead engine's errors are out: the launcher restarts us
        self.drain_watch = DrainWatch()
        self.draining = False
        self.limits = EngineLimits(
            vocab_size=engine.model_config.vocab_size, eos_token_ids=tuple(engine.model_config.eos_token_ids),
            check_fits=engine.check_fits, max_model_len=engine.max_model_len, decoupled=decoupled,
            block_size=engine.blocks.block_size)
        self.on_log = on_log
        self._ids = itertools.count()
        self._outbox: queue.Queue[tuple[Active, int, RequestOutput] | None] = queue.Queue()
        self._active: dict[int, Active] = {}
        self._thread = threading.Thread(target=self._send_loop, name="llm-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self._outbox.put(None)
        self._thread.join(timeout=10)

    # ---- requests in ----
    def handle(self, get: Get, triton_id: str, responder: Responder) -> None:
        cancel = get("cancel_request_id")
        if cancel is not None or scalar(get("stop"), "stop", False):
            target = triton_id if cancel is None else scalar(cancel, "cancel_request_id")
            self.cancel(target.decode() if isinstance(target, bytes) else str(target))
            responder.send({}, final=True)
            return
        try:
            request = parse(get, self.limits)
        except (InvalidInput, ValueError, TypeError) as exc:
            responder.send(None, error=str(exc), final=True, invalid=True)
            return
        key = next(self._ids)
        interval = request.stream_interval or self.stream.stream_interval
        seqs = [response.start(request, i, interval) for i in range(len(request.samples))]
        engine_ids = [f"{triton_id or 'req'}-{key}-{i}" for i in range(len(seqs))]
        timeout_s = request_timeout_s(request.timeout_ms, self.default_timeout_ms)
        active = Active(triton_id, responder, request, seqs, engine_ids, timeout_s)
        sequences = [Sequence(engine_ids[i], list(request.prompt), params, self._on_output(active, i))
                     for i, params in enumerate(request.samples)]
        active.pending = sequences[1:]
        self._active[key] = active
        try:
            self.engine.submit(sequences[0], timeout_s)  # fits: parse checked it
        except Unavailable as exc:  # busy, draining or failed: the client may retry (elsewhere)
            del self._active[key]
            self.on_reject(exc.reason)
            responder.send(None, error=str(exc), final=True, unavailable=True)

    def _on_output(self, active: Active, index: int):
        return lambda out: self._outbox.put((active, index, out))

    def cancel(self, triton_id: str) -> None:
        """Cancel by the client's request id (Triton 2.51 does not pass an ensemble's cancellation on)."""
        for active in list(self._active.values()):
            if triton_id and active.triton_id == triton_id and not active.finished:
                self._cancel(active)

    def _cancel(self, active: Active, reason: str = "cancelled by the client") -> None:
        self.on_log(f"llm: request {active.engine_ids[0]} {reason}")
        if active.pending:  # siblings never submitted: nothing of theirs will come
            active.pending = []
            for seq in active.seqs[1:]:
                seq.done = True
        for engine_id, seq in zip(active.engine_ids, active.seqs, strict=True):
            if not seq.done:
                self.engine.cancel(engine_id)

    # ---- responses out ----
    def _send_loop(self) -> None:
        last_poll = time.monotonic()
        while True:
            try:
                waiting = [self._outbox.get(timeout=CANCEL_POLL_S), *self._taken_waiting()]
            except queue.Empty:
                waiting = []
            if None in waiting:  # stop
                return
            touched: dict[tuple[int, int], tuple[Active, int]] = {}
            for active, index, out in waiting:
                self._guarded(active, self._receive, active, index, out)
                touched[id(active), index] = (active, index)
            for active, index in touched.values():  # every waiting output is in: send what is due
                if active.seqs[index].pacer.due():
                    self._guarded(active, self._flush, active, index)
            if time.monotonic() - last_poll >= CANCEL_POLL_S:
                last_poll = time.monotonic()
                self._watch_lifecycle()
                for active in list(self._active.values()):
                    if not active.finished and active.responder.is_cancelled():
                        self._cancel(active)

    def _taken_waiting(self) -> list:
        """Every output queued now, without waiting for more."""
        taken = []
        while True:
            try:
                taken.append(self._outbox.get_nowait())
            except queue.Empty:
                return taken

    def _guarded(self, active: Active, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a client gone mid-stream must not stop the sender
            self._finish(active)
            self._cancel(active, f"stopped: sending a response failed: {exc}")

    def _watch_lifecycle(self) -> None:
        """Start the drain the launcher announced (scalellm/drain.py); exit the process once a dead engine's
        requests have all been failed, so the launcher sees the fault and the server gets restarted."""
        deadline = self.drain_watch.deadline()
        if deadline is not None and not self.draining:
            self.draining = True
            self.on_log(f"llm: draining, requests still running at +{deadline - time.time():.0f} s "
                        "end with finish reason 'shutdown'")
            self.engine.drain(deadline)
        if self.engine.failure is not None and self._outbox.empty():
            log.error("llm: engine thread died (%r); exiting", self.engine.failure)
            time.sleep(0.5)  # let the error responses already sent reach Triton
            self.exit_process()

    def _finish(self, active: Active) -> None:
        active.finished = True
        for key, other in list(self._active.items()):
            if other is active:
                del self._active[key]

    def _receive(self, active: Active, index: int, out: RequestOutput) -> None:
        if active.finished:
            return
        if index == 0 and active.pending:  # the first sequence's prompt blocks are now in the prefix cache
            siblings, active.pending = active.pending, []
            if out.finish_reason in ("cancelled", "error"):
                for seq in active.seqs[1:]:
                    seq.done = True
            else:
                for sibling in siblings:
                    try:
                        self.engine.submit(sibling, active.timeout_s)
                    except Unavailable as exc:
                        self.on_reject(exc.reason)
                        self._finish(active)
                        self._cancel(active, f"refused: {exc}")
                        active.responder.send(None, error=str(exc), final=True, unavailable=True)
                        return
        if out.error:
            self._finish(active)
            self._cancel(active, f"failed: {out.error}")
            active.responder.send(None, error=out.error, final=True)
            return
        if active.seqs[index].pacer.add(out):
            self._flush(active, index)

    def _flush(self, active: Active, index: int) -> None:
        """Send the sequence's pending output as one response."""
        seq = active.seqs[index]
        out = seq.pacer.take()
        if active.finished or out is None:
            return
        tensors = response.tensors(active.request, seq, out, self.limits.block_size)
        if tensors is None:
            return
        final = all(seq.done for seq in active.seqs) and not active.pending
        if final:
            self._finish(active)
        active.responder.send(tensors, final=final)
