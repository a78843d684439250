"""Admission control, deadlines, drain and the death of the loop thread, on the real engine in process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import require_engine

from scalellm.config import CacheConfig, EngineConfig, SchedulerConfig
from scalellm.drain import DrainWatch, write_drain_file
from scalellm.engine.admission import Admission, EngineFailed, ServerBusy, ServerDraining, default_queue_size
from scalellm.engine.deadlines import MAX_TIMEOUT_MS, Deadlines, request_timeout_s
from scalellm.engine.engine import LLMEngine
from scalellm.engine.sequence import RequestOutput, SamplingParams, Sequence

PROMPT = [1, 9690, 314, 253, 1345, 30]  # any ids: the engine neither knows nor cares what text they were
LONG = SamplingParams(max_tokens=1000, stop_token_ids=())  # far longer than any test waits for
SHORT = SamplingParams(max_tokens=3, stop_token_ids=())


class Outcome:
    """Collects a request's outputs (``token_ids``: every output token); ``wait`` blocks until the final one."""

    def __init__(self) -> None:
        self.final: RequestOutput | None = None
        self.outputs = 0
        self.token_ids: list[int] = []
        self._done = threading.Event()

    def __call__(self, out: RequestOutput) -> None:
        self.outputs += 1
        self.token_ids += out.new_token_ids
        if out.finish_reason is not None:
            self.final = out
            self._done.set()

    def started(self) -> bool:
        return self.outputs > 0

    def wait(self, timeout_s: float = 120.0) -> RequestOutput:
        assert self._done.wait(timeout_s), "request never finished"
        assert self.final is not None
        return self.final


def submit(engine: LLMEngine, name: str, params: SamplingParams, timeout_s: float | None = None) -> Outcome:
    outcome = Outcome()
    engine.submit(Sequence(name, list(PROMPT), params, outcome), timeout_s)
    return outcome


def wait_until(predicate, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def engine_dir() -> Path:
    return require_engine()


def make_engine(engine_dir: Path, max_num_seqs: int = 4, max_queue_size: int | None = 2) -> LLMEngine:
    config = EngineConfig(engine_dir=str(engine_dir), cache=CacheConfig(num_blocks=256),
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_queue_size=max_queue_size))
    return LLMEngine(config)


# ---- pure parts -------------------------------------------------------------------------------------------

def test_admission_counts_in_flight_and_rejects_past_the_bound() -> None:
    admission = Admission(max_running=2, max_waiting=1)
    for _ in range(3):
        admission.admit()
    with pytest.raises(ServerBusy, match=r"limit is 3 \(2 running \+ max_queue_size 1 waiting\); retry later"):
        admission.admit()
    admission.release()
    admission.admit()  # room again
    admission.close(ServerDraining("server shutting down"))
    admission.release()
    with pytest.raises(ServerDraining):
        admission.admit()
    assert admission.rejected == 2


def test_default_queue_is_sized_from_the_kv_cache() -> None:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512)
    assert default_queue_size(config, num_blocks=1024, block_size=16) == 32  # 16384 cached tokens / 512
    assert default_queue_size(config, num_blocks=16, block_size=16) == 8  # never fewer than max_num_seqs


def test_request_timeout_bounds_and_default() -> None:
    assert request_timeout_s(None) is None
    assert request_timeout_s(0, default_ms=0) is None
    assert request_timeout_s(None, default_ms=2500) == 2.5
    assert request_timeout_s(100, default_ms=2500) == 0.1
    with pytest.raises(ValueError, match=f"timeout_ms must be between 0 and {MAX_TIMEOUT_MS}"):
        request_timeout_s(MAX_TIMEOUT_MS + 1)


def test_deadlines_expire_in_order_and_drain_ends_everything() -> None:
    deadlines = Deadlines()
    now = time.monotonic()
    deadlines.add("a", now)
    deadlines.add("b", now + 3600.0)
    deadlines.add("c", None)
    deadlines.add("d", now)
    deadlines.discard("d")  # finished before its deadline
    assert deadlines.expired(["a", "b", "c"]) == [("a", "timeout")]
    deadlines.drain_at(time.time() - 1)
    assert deadlines.expired(["b", "c"]) == [("b", "shutdown"), ("c", "shutdown")]


def test_drain_watch_sees_the_launchers_file(tmp_path: Path) -> None:
    path = tmp_path / "drain.json"
    watch = DrainWatch(str(path))
    assert watch.deadline() is None
    deadline = write_drain_file(path, grace_s=7.0)
    assert watch.deadline() == pytest.approx(deadline)


# ---- the real engine ---------------------------------------------------------------------------------------

def test_a_full_engine_says_busy_at_once_and_serves_everyone_it_admitted(engine_dir: Path) -> None:
    engine = make_engine(engine_dir, max_num_seqs=2, max_queue_size=2)  # not started: nothing leaves yet
    try:
        admitted = [submit(engine, f"r{i}", SHORT) for i in range(4)]
        with pytest.raises(ServerBusy, match="server busy"):
            submit(engine, "one-too-many", SHORT)
        engine.start()
        outs = [o.wait() for o in admitted]
        assert [o.finish_reason for o in outs] == ["length"] * 4
        assert len({tuple(o.token_ids) for o in admitted}) == 1  # same prompt, greedy: same answer
        wait_until(lambda: engine.admission.in_flight == 0, "admission to empty")
        assert engine.blocks.num_used == 0
        assert submit(engine, "after", SHORT).wait().finish_reason == "length"  # room again
    finally:
        engine.stop()


def test_a_request_past_its_deadline_ends_with_timeout_and_keeps_its_tokens(engine_dir: Path) -> None:
    engine = make_engine(engine_dir)
    try:
        queued = submit(engine, "expires-in-queue", LONG, timeout_s=0.01)
        time.sleep(0.05)  # past its deadline before the engine ever runs it
        engine.start()
        out = queued.wait()
        assert (out.finish_reason, out.num_output_tokens) == ("timeout", 0)
        running = submit(engine, "expires-running", LONG, timeout_s=3.0)
        untimed = submit(engine, "no-deadline", SHORT)
        assert untimed.wait().finish_reason == "length"
        out = running.wait()
        assert out.finish_reason == "timeout"
        assert 0 < out.num_output_tokens < LONG.max_tokens
        wait_until(lambda: engine.admission.in_flight == 0, "admission to empty")
        assert engine.blocks.num_used == 0
    finally:
        engine.stop()


def test_drain_refuses_new_requests_and_ends_the_rest_with_shutdown(engine_dir: Path) -> None:
    engine = make_engine(engine_dir, max_queue_size=None)
    engine.start()
    try:
        short = submit(engine, "short", SHORT)
        long = submit(engine, "long", LONG)
        wait_until(long.started, "the long request to start")
        engine.drain(time.time() + 2.0)
        with pytest.raises(ServerDraining, match="server shutting down"):
            submit(engine, "late", SHORT)
        assert short.wait().finish_reason == "length"
        out = long.wait()
        assert out.finish_reason == "shutdown" and out.num_output_tokens > 0
        wait_until(lambda: engine.admission.in_flight == 0, "admission to empty")
        assert engine.blocks.num_used == 0
    finally:
        engine.stop()


def test_a_dead_loop_thread_fails_every_request_and_refuses_new_ones(engine_dir: Path) -> None:
    engine = make_engine(engine_dir)
    steps = []

    def die_on_third_step(stats) -> None:  # a fault the loop cannot recover from (not an Exception)
        steps.append(stats)
        if len(steps) == 3:
            raise SystemExit("simulated fatal fault in the engine loop")

    engine.on_step = die_on_third_step
    engine.start()
    try:
        outcomes = [submit(engine, f"r{i}", LONG) for i in range(3)]
        outs = [o.wait() for o in outcomes]
        assert [o.finish_reason for o in outs] == ["error"] * 3
        assert all("engine failed" in (o.error or "") for o in outs)
        wait_until(lambda: not engine.alive, "the loop thread to end")
        assert isinstance(engine.failure, SystemExit)
        with pytest.raises(EngineFailed, match="needs a restart"):
            submit(engine, "late", SHORT)
    finally:
        engine.stop()
