"""The in-flight batching engine: one background loop thread over scheduler, model runner and sampler.

Callers ``submit`` sequences and ``cancel`` them from any thread; the loop picks both up between steps,
so a request that arrives while others generate joins at the next step, and a finished one leaves at once.
Outputs are handed to each sequence's ``on_output`` callback from the loop thread: keep callbacks cheap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from scalellm.config import EngineConfig
from scalellm.engine.admission import Admission, EngineFailed, ServerDraining, default_queue_size, exceeds_context
from scalellm.engine.block_manager import BlockManager
from scalellm.engine.deadlines import Deadlines
from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.sampler import sample
from scalellm.engine.scheduler import ScheduledWork, Scheduler
from scalellm.engine.sequence import FinishedRequest, RequestOutput, RequestTimings, SamplingParams, Sequence

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StepStats:
    """What one step did, for metrics (handed to ``LLMEngine.on_step``)."""

    batch_size: int
    prefill_tokens: int
    generated_tokens: int
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions_total: int
    prefix_hit_tokens_total: int
    ttft_s: list[float] = field(default_factory=list)  # arrival -> first token, for requests that got one
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive tokens of a request


def on_fresh_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on a short-lived thread; its result, or its exception re-raised here.

    Why: torch's OpenMP runtime (libgomp) keeps a pool of worker threads per thread that ran a parallel op,
    and once its pools hold more threads than there are CPUs it stops spinning between parallel regions.
    Loading the weights on the caller's thread (Triton's stub thread) would leave such a pool behind and
    make every op of the engine thread wake its workers through the kernel: the batch-1 step took 20.7 ms
    instead of 9.3 ms with 2 threads on a 2-core EPYC. A pool dies with its thread, so load on one that ends.
    """
    box: list = []

    def call() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    thread = threading.Thread(target=call, name="scalellm-load")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.runner = on_fresh_thread(ModelRunner, config)
        self.model_config = self.runner.model_config
        self.max_model_len = min(config.scheduler.max_model_len, self.model_config.max_position_embeddings)
        self.blocks = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.on_step: Callable[[StepStats], None] | None = None  # called from the loop thread
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # reliability: bounded admission, deadlines, drain, death of the loop thread (admission.py, deadlines.py)
        s = config.scheduler
        queue_size = s.max_queue_size if s.max_queue_size is not None else default_queue_size(
            s, self.blocks.num_blocks, self.blocks.block_size)
        self.admission = Admission(s.max_num_seqs, queue_size)
        self.deadlines = Deadlines()
        self.failure: BaseException | None = None  # why the loop thread died
        self._idle_reported = True

    # ---- public API (any thread) ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scalellm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def check_fits(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never run (a message naming the bound), or None."""
        problem = exceeds_context(prompt_len, max_tokens, self.max_model_len)
        if problem:
            return problem
        total = prompt_len + max_tokens
        blocks = -(-total // self.blocks.block_size)
        if blocks > self.blocks.num_blocks:
            return (f"prompt + max_tokens = {total} tokens needs {blocks} KV-cache blocks but the cache "
                    f"has {self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens")
        return None

    def submit(self, seq: Sequence, timeout_s: float | None = None) -> None:
        """Queue ``seq``; ValueError if it can never run, ``admission.Unavailable`` if not now."""
        problem = self.check_fits(len(seq.prompt_ids), seq.params.max_tokens)
        if problem:
            raise ValueError(problem)
        with self.admission.lock:
            self.admission.admit()
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            self._inbox.put(("add", (seq, deadline)))

    @property
    def alive(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def drain(self, deadline_unix_s: float) -> None:
        """Admit nothing more; what is in the engine at ``deadline_unix_s`` ends with reason "shutdown"."""
        self.admission.close(ServerDraining("server shutting down: not accepting new requests; retry elsewhere"))
        self.deadlines.drain_at(deadline_unix_s)
        self._inbox.put(("wake", None))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    # ---- loop thread ----
    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.deadlines.next_wakeup_s(0.5)) if block else self._inbox.get_nowait()
            while True:
                kind, payload = item
                if kind == "add":
                    seq, deadline = payload
                    self._by_id[seq.request_id] = seq
                    self.deadlines.add(seq.request_id, deadline)
                    self.scheduler.add(seq)
                elif kind == "cancel" and payload in self._by_id:
                    self._finish(self._by_id[payload], "cancelled")
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _loop(self) -> None:
        try:
            self.runner.nice_workers(self.config.worker_nice)  # torch's OpenMP pool on this thread, niced
            self.runner.own_threads()
            self._serve()
        except BaseException as exc:  # the thread is dying: fail every request, admit none (see _die)
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        log.critical("engine loop thread died: %r", exc, exc_info=exc)
        self.failure = exc
        self.admission.close(EngineFailed(f"engine failed ({exc!r}); the server needs a restart"))
        self._drain_inbox(block=False)  # admission is closed: nothing more arrives after this
        for seq in list(self._by_id.values()):
            try:
                self._finish(seq, "error", error=f"engine failed: {exc!r}")
            except Exception:
                log.exception("failing %s", seq.request_id)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox(block=not self.scheduler.has_work())
            for request_id, reason in self.deadlines.expired(list(self._by_id)):
                if request_id in self._by_id:
                    self._finish(self._by_id[request_id], reason)
            if not self.scheduler.has_work():
                self._report_idle()
                continue
            try:
                self.step()
            except Exception as exc:  # fail the running requests, keep serving the next ones
                log.exception("engine step failed")
                for seq in list(self._by_id.values()):
                    self._finish(seq, "error", error=f"engine step failed: {exc}")

    def step(self) -> list[ScheduledWork]:
        work = self.scheduler.schedule()
        if not work:
            return work
        now_ns = time.time_ns()
        for w in work:
            w.seq.first_scheduled_ns = w.seq.first_scheduled_ns or now_ns
        logits = self.runner.run(work)
        samplers = [w.seq for w in work if w.samples]
        prefill = 0
        for w in work:
            if w.seq.num_computed < len(w.seq.prompt_ids):
                prefill += w.num_tokens
            w.seq.num_computed += w.num_tokens
            self.blocks.commit_full_blocks(w.seq)
        ttft, itl = [], []
        if samplers:
            with self.runner.sampler_threads(samplers):
                result = sample(logits, samplers)
            now_ns = time.time_ns()
            for i, seq in enumerate(samplers):
                if seq.first_token_ns:
                    itl.append((now_ns - seq.last_token_ns) / 1e9)
                else:
                    seq.first_token_ns = now_ns
                    ttft.append((now_ns - seq.arrival_ns) / 1e9)
                seq.last_token_ns = now_ns
                lp = result.log_probs[i] if result.log_probs is not None else None
                self._append_token(seq, result.token_ids[i], lp)
        self._idle_reported = False
        if self.on_step is not None:
            self.on_step(StepStats(
                batch_size=len(work),
                prefill_tokens=prefill,
                generated_tokens=len(samplers),
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                kv_blocks_used=self.blocks.num_used,
                kv_blocks_total=self.blocks.num_blocks,
                preemptions_total=self.scheduler.num_preemptions,
                prefix_hit_tokens_total=self.blocks.prefix_hit_tokens,
                ttft_s=ttft,
                itl_s=itl,
            ))
        return work

    def _append_token(self, seq: Sequence, token: int, log_prob: float | None) -> None:
        p = seq.params
        if token in p.stop_token_ids and len(seq.output_ids) >= p.min_tokens:
            self._finish(seq, "stop")
            return
        seq.output_ids.append(token)
        if log_prob is not None:
            seq.log_probs.append(log_prob)
        for stop in p.stop_sequences:
            if len(seq.output_ids) >= p.min_tokens + len(stop) and tuple(seq.output_ids[-len(stop):]) == stop:
                del seq.output_ids[-len(stop):]
                del seq.log_probs[len(seq.output_ids):]
                self._finish(seq, "stop")
                return
        if len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            self._finish(seq, "length")
            return
        self._emit(seq)

    def _emit(self, seq: Sequence, finish_reason: str | None = None, error: str | None = None) -> None:
        """Report the output tokens not reported before (all of them once the request is finished)."""
        n = len(seq.output_ids) - (0 if finish_reason else seq.held_back())
        start, seq.num_reported = seq.num_reported, max(n, seq.num_reported)
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=seq.output_ids[start:n],
            num_output_tokens=seq.num_reported,
            finish_reason=finish_reason,
            new_log_probs=seq.log_probs[start:n] if seq.params.return_log_probs else None,
            num_cached_tokens=seq.num_cached_tokens,
            timings=RequestTimings(seq.arrival_ns, seq.first_scheduled_ns, seq.first_token_ns, seq.last_token_ns),
            error=error,
        )
        try:
            seq.on_output(out)
        except Exception:
            log.exception("output callback failed for %s", seq.request_id)

    def _report_idle(self) -> None:
        """Once the engine empties outside a step (cancel, timeout): metrics see the blocks given back."""
        if self._idle_reported:
            return
        self._idle_reported = True
        if self.on_step is None:
            return
        try:  # metrics must never take the loop down
            self.on_step(StepStats(batch_size=0, prefill_tokens=0, generated_tokens=0,
                                   running=0, waiting=0, kv_blocks_used=self.blocks.num_used,
                                   kv_blocks_total=self.blocks.num_blocks,
                                   preemptions_total=self.scheduler.num_preemptions,
                                   prefix_hit_tokens_total=self.blocks.prefix_hit_tokens))
        except Exception:
            log.exception("on_step failed while idle")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.remove(seq)
        if self._by_id.pop(seq.request_id, None) is not None:
            self.admission.release()
            self.deadlines.discard(seq.request_id)
        self._idle_reported = False
        seq.finish_reason = reason
        self._emit(seq, reason, error)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[FinishedRequest]:
        """Submit ``prompts`` together and wait for all (in-process use: tests, benchmarks)."""
        done = threading.Semaphore(0)
        results: dict[int, FinishedRequest] = {}
        seqs: list[Sequence] = []

        def on_output(index: int) -> Callable[[RequestOutput], None]:
            def record(out: RequestOutput) -> None:
                if out.finish_reason is not None:
                    seq = seqs[index]
                    log_probs = list(seq.log_probs) if params.return_log_probs else None
                    results[index] = FinishedRequest(seq.prompt_ids + seq.output_ids, len(seq.output_ids),
                                                     out.finish_reason, log_probs, seq.num_cached_tokens)
                    done.release()
            return record

        for i, ids in enumerate(prompts):
            seqs.append(Sequence(f"local-{id(results)}-{i}", list(ids), params, on_output(i)))
        for seq in seqs:
            self.submit(seq)
        for _ in prompts:
            done.acquire()
        return [results[i] for i in range(len(prompts))]
