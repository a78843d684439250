"""Where a request waits when every replica is full: slots per replica and one bounded queue with a deadline.

A replica takes at most ``slots`` requests from the router at once: ``--replica-slots``, or by default what its
engine runs at once, its ``llm`` model's ``max_num_seqs`` x instances, read from the replica's model config
(a model without that parameter: no limit). The policy chooses among the healthy replicas with a free slot.
When none has one, the request waits in one FIFO queue of at most ``queue_size`` requests, and a freed slot
goes to the first waiter that may use it. A request that finds the queue full, or still waits at its
deadline, is refused at once with :class:`Overloaded` (the doors answer 429 or 503 with ``Retry-After``), so
nothing waits unseen in an engine's own queue and no client waits without an answer.

A replica that answers "server busy" all the same (other clients use it too, or it holds fewer than its slots)
is taken at its word: it gets no more than the requests it is running then (``full``); after ``BUSY_HOLD_S``
without another "busy" one more, then 3, 7, ... more, up to its slots. So while it stays full a single request
probes it now and then, instead of every waiter being sent back to it at once whenever a fixed hold runs out
(each refusal costs a request one of its attempts).

``Retry-After`` is when the refused request could expect a slot if everything ahead of it drains at the
recent pace: the requests in flight, those queued, and those refused just before it (they come back first),
at the average time a request has held its slot lately; and no more requests are told the same second than
the slots and the queue take at once.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import aiohttp

from .metrics import RouterMetrics
from .policy import Choice, Policy
from .replicas import Replica

HOLD_S_INITIAL = 1.0  # assumed slot hold time until a request has finished (then the first one's time)
HOLD_EWMA_WEIGHT = 0.2  # weight of the latest finished request in the average hold time
MAX_RETRY_AFTER_S = 60
BUSY_HOLD_S = 2.0  # a replica's "server busy" caps it at what it runs; the cap starts to grow after this long
CONFIG_TIMEOUT_S = 5.0
REFRESH_S = 0.25  # the slot watcher's period: it asks only replicas whose slots are not known yet


class Overloaded(Exception):
    """The router cannot place the request now: OpenAI 429, Triton HTTP 503, a gRPC error, with Retry-After.

    The message starts with "server busy", as the engines' own refusal does
    (``scalellm.engine.admission.is_retryable``)."""

    def __init__(self, message: str, retry_after_s: int, reason: str) -> None:
        super().__init__(message)
        self.retry_after_s, self.reason = retry_after_s, reason


@dataclass(eq=False)
class Slot:
    """A request's place on a replica, from ``acquire`` to ``release``."""

    replica: Replica
    choice: Choice
    cost: int
    since: float  # time.monotonic()


@dataclass(eq=False)
class Waiter:
    prompt: str
    cost: int
    exclude: Collection[str]  # replicas this request must not go to (they failed it)
    avoid: Collection[str]  # replicas it goes to only when no other has room (they refused it as busy)
    since: float
    placed: asyncio.Future[Slot] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


async def read_slots(session: aiohttp.ClientSession, replica: Replica, model: str) -> int | None:
    """``max_num_seqs`` x instances of ``model`` on the replica; 0 when its config has no max_num_seqs; None
    when the replica did not answer (ask again later)."""
    url = f"{replica.address.http_url}/v2/models/{model}/config"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=CONFIG_TIMEOUT_S)) as response:
            if response.status != 200:
                return 0
            config = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None
    try:
        seqs = int(config["parameters"]["max_num_seqs"]["string_value"])
    except (KeyError, TypeError, ValueError):
        return 0
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group") or [{}])
    return max(0, seqs) * max(1, instances)


class SlotQueue:
    def __init__(self, replicas: Sequence[Replica], policy: Policy, metrics: RouterMetrics, replica_slots: int,
                 queue_size: int) -> None:
        self.replicas = replicas
        self.policy = policy
        self.metrics = metrics
        self.fixed_slots = replica_slots  # 0: read each replica's own
        self.queue_size = queue_size
        self.read: dict[str, int] = {}  # replica name -> slots read from it (0: no limit)
        self._waiters: deque[Waiter] = deque()
        self._hold_s: float | None = None  # average time a finished request held its slot; None: none yet
        self._held: set[Slot] = set()
        self._capped: dict[str, tuple[int, float]] = {}  # replica name -> (requests, since) at its last "busy"
        self._promised: list[float] = []  # when the requests refused lately were told to come back

    # ---- slots ----
    def slots(self, replica: Replica) -> int | None:
        """The replica's slots (0: no limit); None while unknown (the replica takes nothing until known)."""
        return self.fixed_slots or self.read.get(replica.name)

    def has_room(self, replica: Replica) -> bool:
        slots = self.slots(replica)
        if not replica.healthy or slots is None:
            return False
        if replica.name in self._capped:
            capped, since = self._capped[replica.name]
            periods = min(16, int((time.monotonic() - since) / BUSY_HOLD_S))
            grown = capped + 2**periods - 1  # 1, 3, 7, ... more: back to its slots in a few periods
            if slots == 0 or grown < slots:
                return replica.load.in_flight < grown
        return slots == 0 or replica.load.in_flight < slots

    def full(self, slot: Slot) -> None:
        """The replica refused ``slot``'s request as busy: it has room for no more than its other requests."""
        self._capped[slot.replica.name] = (slot.replica.load.in_flight - 1, time.monotonic())

    async def refresh(self, session: aiohttp.ClientSession, model: str) -> None:
        """Learn the slots of replicas that became healthy, forget those of replicas that went down (a restarted
        replica may come back with another configuration), then hand free slots to waiters."""
        for replica in list(self.replicas):
            if not replica.healthy:
                self.read.pop(replica.name, None)
            elif not self.fixed_slots and replica.name not in self.read:
                slots = await read_slots(session, replica, model)
                if slots is not None:
                    self.read[replica.name] = slots
            self.metrics.slots.labels(replica.name).set(self.slots(replica) or 0)
        self.wake()

    # ---- placing requests ----
    def _place(self, prompt: str, cost: int, exclude: Collection[str], avoid: Collection[str]) -> Slot | None:
        roomy = [i for i, r in enumerate(self.replicas) if r.name not in exclude and self.has_room(r)]
        candidates = [i for i in roomy if self.replicas[i].name not in avoid] or roomy
        if not candidates:
            return None
        choice = self.policy.choose([r.load for r in self.replicas], candidates, prompt)
        slot = Slot(self.replicas[choice.index], choice, cost, time.monotonic())
        slot.replica.begin(cost)
        self._held.add(slot)
        return slot

    async def acquire(self, prompt: str, cost: int, deadline: float, exclude: Collection[str] = (),
                      avoid: Collection[str] = ()) -> Slot:
        """A slot on a replica (counted in its load until ``release``), at once or after waiting in the queue
        until ``deadline`` (the event loop's clock); ``Overloaded`` when the queue is full or time is up."""
        if not self._waiters:
            slot = self._place(prompt, cost, exclude, avoid)
            if slot is not None:
                return slot
        if len(self._waiters) >= self.queue_size:
            raise self.refuse("queue_full", f"{len(self._waiters)} requests already wait for a replica (the "
                              f"router's queue holds {self.queue_size})")
        loop = asyncio.get_running_loop()
        waiter = Waiter(prompt, cost, exclude, avoid, loop.time())
        self._waiters.append(waiter)
        self.metrics.queue_length.set(len(self._waiters))
        self.wake()  # the waiters ahead may be unable to use the free slot this one can
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter.placed
        except TimeoutError:
            if waiter.placed.done() and not waiter.placed.cancelled():
                return waiter.placed.result()  # placed at the deadline itself
            raise self.refuse("queue_timeout", f"no replica had room within {deadline - waiter.since:.0f} s "
                              f"({len(self._waiters) - 1} more requests wait)") from None
        except asyncio.CancelledError:  # the client left while waiting
            if waiter.placed.done() and not waiter.placed.cancelled():
                self.release(waiter.placed.result(), completed=False)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            self.metrics.queue_length.set(len(self._waiters))
            self.metrics.queue_wait.observe(loop.time() - waiter.since)

    def release(self, slot: Slot, completed: bool) -> None:
        """The request left its replica; ``completed``: it ran to its end there, so its time counts in the pace."""
        self._held.discard(slot)
        slot.replica.end(slot.cost)
        if completed:
            held_s = time.monotonic() - slot.since
            self._hold_s = held_s if self._hold_s is None else self._hold_s + HOLD_EWMA_WEIGHT * (held_s - self._hold_s)
        self.wake()

    def wake(self) -> None:
        """Give free slots to the waiters, first come first served (one that may not use any free slot lets the
        next one have it)."""
        for waiter in list(self._waiters):
            if not any(self.has_room(r) for r in self.replicas):
                return
            if waiter.placed.done():
                continue
            slot = self._place(waiter.prompt, waiter.cost, waiter.exclude, waiter.avoid)
            if slot is not None:
                self._waiters.remove(waiter)
                waiter.placed.set_result(slot)

    # ---- refusing ----
    def retry_after_s(self) -> int:
        """Seconds until a request refused now could expect a slot (see the module's docstring)."""
        now = time.monotonic()
        del self._promised[:bisect.bisect_right(self._promised, now)]
        healthy = [r for r in self.replicas if r.healthy]
        in_flight = sum(r.load.in_flight for r in healthy)
        slots = [self.slots(r) or 0 for r in healthy]
        capacity = max(1, in_flight) if 0 in slots or not slots else sum(slots)
        ahead = in_flight + len(self._waiters) + len(self._promised) + 1
        # requests in flight for longer than the average show it is stale (slower requests now, a busier machine)
        hold_s = max([self._hold_s or HOLD_S_INITIAL, *(now - slot.since for slot in self._held)])
        seconds = min(MAX_RETRY_AFTER_S, max(1, math.ceil(hold_s * ahead / capacity)))
        # Retry-After is whole seconds: never send back more requests in one second than the router can take at
        # once (its slots and its queue), or the last of them are refused again (and clients retry only so often)
        room = capacity + self.queue_size
        def told(second: int) -> int:  # requests already told to come back within that second from now
            return (bisect.bisect_right(self._promised, now + second)
                    - bisect.bisect_right(self._promised, now + second - 1))

        while seconds < MAX_RETRY_AFTER_S and told(seconds) >= room:
            seconds += 1
        bisect.insort(self._promised, now + seconds)
        return seconds

    def refuse(self, reason: str, why: str) -> Overloaded:
        """The ``Overloaded`` for a request refused now (counted by ``reason``), its Retry-After estimated."""
        seconds = self.retry_after_s()
        self.metrics.rejected.labels(reason).inc()
        return Overloaded(f"server busy: {why}; retry after {seconds} s", seconds, reason)


async def watch_slots(queue: SlotQueue, session: aiohttp.ClientSession, model: str) -> None:
    """``queue.refresh`` every ``REFRESH_S`` (forever; cancel the task to stop)."""
    while True:
        await queue.refresh(session, model)
        await asyncio.sleep(REFRESH_S)
