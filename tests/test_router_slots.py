"""The router's slots and queue (scalellm/router/slots.py) and the launcher's CPU split, without servers."""

from __future__ import annotations

import asyncio

import pytest

from scalellm.router import slots as slots_module
from scalellm.router.config import ReplicaAddress
from scalellm.router.launch import cpu_list, cpu_sets, parse_cpu_list
from scalellm.router.metrics import RouterMetrics
from scalellm.router.policy import Policy
from scalellm.router.replicas import Replica
from scalellm.router.slots import Overloaded, SlotQueue


def queue_of(replicas: int, slots: int, queue_size: int) -> SlotQueue:
    metrics = RouterMetrics()
    members = [Replica(ReplicaAddress("127.0.0.1", 8000 + 10 * i, 8001 + 10 * i), metrics) for i in range(replicas)]
    for replica in members:
        replica.set_healthy(True)
    return SlotQueue(members, Policy(), metrics, replica_slots=slots, queue_size=queue_size)


def test_requests_take_free_slots_then_wait_in_order_then_are_refused_at_once() -> None:
    async def run() -> None:
        queue = queue_of(replicas=2, slots=1, queue_size=2)
        deadline = asyncio.get_running_loop().time() + 60
        held = [await queue.acquire("a", 1, deadline), await queue.acquire("b", 1, deadline)]
        assert {slot.replica.name for slot in held} == {r.name for r in queue.replicas}  # one on each
        first = asyncio.ensure_future(queue.acquire("c", 1, deadline))
        second = asyncio.ensure_future(queue.acquire("d", 1, deadline))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="server busy: 2 requests already wait") as full:
            await queue.acquire("e", 1, deadline)
        assert full.value.reason == "queue_full" and full.value.retry_after_s >= 1
        queue.release(held[1], completed=True)  # the freed slot goes to the first waiter
        placed = await first
        assert placed.replica is held[1].replica and not second.done()
        queue.release(held[0], completed=True)
        assert (await second).replica is held[0].replica
        assert queue.metrics.rejected.labels("queue_full")._value.get() == 1

    asyncio.run(run())


def test_a_waiter_is_refused_at_its_deadline_and_one_that_leaves_frees_its_place() -> None:
    async def run() -> None:
        queue = queue_of(replicas=1, slots=1, queue_size=4)
        loop = asyncio.get_running_loop()
        held = await queue.acquire("a", 1, loop.time() + 60)
        with pytest.raises(Overloaded, match="no replica had room") as late:
            await queue.acquire("b", 1, loop.time() + 0.05)
        assert late.value.reason == "queue_timeout"
        leaving = asyncio.ensure_future(queue.acquire("c", 1, loop.time() + 60))
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        queue.release(held, completed=True)
        assert queue.replicas[0].load.in_flight == 0  # nobody holds a slot for the one that left
        assert (await queue.acquire("d", 1, loop.time() + 60)).replica is queue.replicas[0]

    asyncio.run(run())


def test_retry_after_grows_with_the_requests_ahead() -> None:
    async def run() -> None:
        queue = queue_of(replicas=1, slots=1, queue_size=0)
        await queue.acquire("a", 1, asyncio.get_running_loop().time() + 60)
        waits = [queue.refuse("queue_full", "test").retry_after_s for _ in range(4)]
        assert waits == sorted(waits) and waits[-1] > waits[0], waits  # each refused one queues behind the last

    asyncio.run(run())


def test_retry_after_sends_back_no_more_in_one_second_than_the_router_takes_at_once() -> None:
    async def run() -> None:
        queue = queue_of(replicas=2, slots=1, queue_size=1)  # room for 3 at once
        deadline = asyncio.get_running_loop().time() + 60
        held = [await queue.acquire(str(i), 1, deadline) for i in range(2)]
        for slot in held:
            queue.release(slot, completed=True)  # a pace: requests hold their slot for a moment only
        await queue.acquire("a", 1, deadline)
        await queue.acquire("b", 1, deadline)
        waits = [queue.refuse("queue_full", "test").retry_after_s for _ in range(12)]
        assert waits == sorted(waits), waits
        assert max(waits.count(second) for second in set(waits)) <= 3, waits

    asyncio.run(run())


def test_a_busy_replica_takes_no_more_than_it_runs_for_a_while() -> None:
    async def run() -> None:
        queue = queue_of(replicas=1, slots=4, queue_size=4)
        replica, deadline = queue.replicas[0], asyncio.get_running_loop().time() + 60
        running = await queue.acquire("a", 1, deadline)
        refused = await queue.acquire("b", 1, deadline)
        queue.full(refused)  # its engine answered "server busy" with one other request running
        queue.release(refused, completed=False)
        assert replica.load.in_flight == 1 and not queue.has_room(replica)  # 1 of 4 slots used, yet full
        queue.release(running, completed=True)
        assert queue.has_room(replica)  # room for what it held when it refused

    asyncio.run(run())


class Clock:
    """Stands in for the time module in scalellm.router.slots: a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_busy_replica_is_probed_with_one_request_then_gets_its_slots_back(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(slots_module, "time", clock)

    async def run() -> None:
        queue = queue_of(replicas=1, slots=8, queue_size=4)
        replica, deadline = queue.replicas[0], asyncio.get_running_loop().time() + 60
        running = [await queue.acquire(str(i), 1, deadline) for i in range(2)]
        refused = await queue.acquire("refused", 1, deadline)
        queue.full(refused)  # "server busy" with two others running
        queue.release(refused, completed=False)
        assert not queue.has_room(replica)
        clock.now += slots_module.BUSY_HOLD_S / 2
        assert not queue.has_room(replica)  # no probe before the hold is over
        clock.now += slots_module.BUSY_HOLD_S / 2
        probe = await queue.acquire("probe", 1, deadline)  # one more, not all 8 slots at once
        assert probe.replica is replica and not queue.has_room(replica)
        queue.full(probe)  # still busy: capped at what it runs again, and the hold starts over
        queue.release(probe, completed=False)
        clock.now += slots_module.BUSY_HOLD_S
        assert queue.has_room(replica) and replica.load.in_flight == 2
        clock.now += 3 * slots_module.BUSY_HOLD_S  # no "busy" for a while: back to its 8 slots
        more = [await queue.acquire(f"more-{i}", 1, deadline) for i in range(6)]
        assert replica.load.in_flight == 8 and not queue.has_room(replica)
        for slot in running + more:
            queue.release(slot, completed=True)

    asyncio.run(run())


def test_cpu_sets_split_the_cpus_and_check_named_ones() -> None:
    assert cpu_sets("auto", 2, [0, 1]) == [[0], [1]]
    assert cpu_sets("auto", 3, range(8)) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert cpu_sets("auto", 1, [0, 1]) is None and cpu_sets("off", 2, [0, 1]) is None  # one replica: every core
    assert cpu_sets("0-1|2,3", 2, range(4)) == [[0, 1], [2, 3]]
    assert parse_cpu_list("0-2,5") == [0, 1, 2, 5] and cpu_list([0, 1, 2, 5]) == "0-2,5"
    for spec, count, available, message in (("auto", 3, [0, 1], "needs a core of its own"),
                                            ("0-1|1-2", 2, range(4), "overlap"),
                                            ("0|1", 3, range(4), "2 CPU sets for 3 replicas"),
                                            ("4|5", 2, range(4), "not available"),
                                            ("0-x|1", 2, range(4), "not a CPU list")):
        with pytest.raises(ValueError, match=message):
            cpu_sets(spec, count, available)
