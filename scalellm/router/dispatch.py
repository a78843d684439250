"""Send one request to a replica chosen by the policy: wait for room, retry before the first response, stop it
when abandoned or past its time.

A request's *attempt* is an async generator that forwards it to one replica (``Upstream``) and yields what comes
back. ``Dispatcher.run`` wraps it:

- the request takes a slot on a healthy replica with room, or waits for one in the router's bounded queue
  (``slots.SlotQueue``); a full queue or the queue deadline refuses it with ``Overloaded`` (429/503 +
  Retry-After at the doors), and the replica's load counts it until it ends;
- ``ReplicaUnavailable`` before the attempt yielded anything: the replica is marked down and the request goes
  to another healthy replica (nothing reached the client yet); after: ``MidStreamFailure``, a clear error;
- ``ReplicaRefused`` (the engine's "server busy" or "server shutting down", ``is_retryable``) before the first
  response: tried again, on another replica first, with backoff, at most ``max_attempts`` times in all; then
  ``Overloaded``;
- the attempt abandoned before its natural end (the client left: ``GeneratorExit`` or ``CancelledError``; or
  ``request_timeout_s`` passed: ``RequestTimeout``): the request is stopped in the engine by a control request
  ``{cancel_request_id}`` to the replica's ``llm`` model, because Triton 2.51 does not pass an ensemble's
  cancellation on to its steps.

So every request ends within ``request_timeout_s`` of its arrival, with an answer or an error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from .config import DEFAULT_MAX_TOKENS, DEFAULT_NUM_RETURN_SEQUENCES, RouterConfig
from .metrics import RouterMetrics
from .policy import Policy
from .replicas import Replica
from .slots import SlotQueue

log = logging.getLogger("scalellm.router")
T = TypeVar("T")
CANCEL_TIMEOUT_S = 2.0


class NoReplica(Exception):
    """No healthy replica is left to try (HTTP 503)."""

    retry_after_s = 1  # replicas' health is checked about every second


class ReplicaUnavailable(Exception):
    """The replica could not be reached, or its connection broke."""


class MidStreamFailure(Exception):
    """The replica failed after the client had received part of the answer."""


class ReplicaRefused(Exception):
    """The replica's engine refused the request before any response, for now: "server busy" (full), "server
    shutting down" (draining) or "engine failed" (``scalellm.engine.admission.is_retryable``)."""

    @property
    def busy(self) -> bool:
        return "server busy" in str(self)


class RequestTimeout(Exception):
    """The request ran past the router's ``request_timeout_s``; it was stopped in the engine."""


class UpstreamRejected(Exception):
    """The replica answered with an error status before any response (bad input): passed on as it is."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.body, self.content_type = status, body, content_type


CHARS_PER_TOKEN = 4  # the Triton doors' prompt length estimate (the exact count would cost a tokenisation)


def _positive(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


@dataclass(frozen=True)
class Job:
    """What the policy needs of a request: its prompt (prefix routing) and cost (prompt + n x max tokens)."""

    prompt: str
    cost: int
    client_id: str = ""  # the id the client gave the request, so its own cancel can be forwarded

    @classmethod
    def of(cls, prompt: str, max_tokens: object, n: object = None, client_id: str = "",
           prompt_tokens: int | None = None) -> Job:
        """The job of a request as its door read it: cost = the prompt's tokens (counted, or estimated as
        characters / 4) + n x max_tokens. A field the replica will refuse (not a positive integer) or leave to
        its default counts here as that default; the refusal itself is the replica's."""
        if prompt_tokens is None:
            prompt_tokens = len(prompt) // CHARS_PER_TOKEN + 1
        generated = _positive(n, DEFAULT_NUM_RETURN_SEQUENCES) * _positive(max_tokens, DEFAULT_MAX_TOKENS)
        return cls(prompt, prompt_tokens + generated, client_id)


@dataclass(frozen=True)
class Upstream:
    """One forwarded request: the replica and the Triton request id the router gave it there."""

    replica: Replica
    request_id: str


Attempt = Callable[[Upstream], AsyncIterator[T]]


class Dispatcher:
    def __init__(self, config: RouterConfig, session: aiohttp.ClientSession, metrics: RouterMetrics) -> None:
        self.config = config
        self.session = session
        self.metrics = metrics
        self.replicas = [Replica(address, metrics) for address in config.replicas]
        self.policy = Policy(prefix_aware=config.policy == "prefix", match_ratio=config.prefix_match_ratio,
                             balance_tokens=config.prefix_balance_tokens, chunk_chars=config.prefix_chunk_chars,
                             table_entries=config.prefix_table_entries)
        self.slots = SlotQueue(self.replicas, self.policy, metrics, config.replica_slots, config.queue_size)
        self.by_client_id: dict[str, Upstream] = {}
        self._background: set[asyncio.Task] = set()

    @property
    def any_healthy(self) -> bool:
        """A replica can take requests: healthy, and its slots known (readiness means the router can place)."""
        return any(r.healthy and self.slots.slots(r) is not None for r in self.replicas)

    def healthy_replica(self) -> Replica:
        for replica in self.replicas:
            if replica.healthy:
                return replica
        raise NoReplica(self._none_healthy())

    def _none_healthy(self) -> str:
        return f"no healthy replica (of {len(self.replicas)}: {', '.join(r.name for r in self.replicas)})"

    def backoff_s(self, attempt: int) -> float:
        """The pause after the ``attempt``-th refusal (1-based): exponential, capped, with jitter."""
        c = self.config
        delay = min(c.backoff_max_s, c.backoff_s * c.backoff_multiplier ** (attempt - 1))
        return delay * (1.0 + random.uniform(-c.backoff_jitter, c.backoff_jitter))

    async def run(self, job: Job, attempt: Attempt[T]) -> AsyncGenerator[T, None]:
        loop = asyncio.get_running_loop()
        end_by = loop.time() + self.config.request_timeout_s
        wait_until = min(loop.time() + self.config.queue_timeout_s, end_by)
        failed: set[str] = set()  # replicas that failed this request: not tried again
        refused: set[str] = set()  # replicas that said busy: tried again only when no other has room
        failures: list[str] = []
        for attempts in range(1, self.config.max_attempts + 1):
            if not any(r.healthy and r.name not in failed for r in self.replicas):
                raise NoReplica("; ".join(failures) if failures else self._none_healthy())
            slot = await self.slots.acquire(job.prompt, job.cost, wait_until, exclude=failed, avoid=refused)
            replica = slot.replica
            upstream = Upstream(replica, f"router-{uuid.uuid4().hex}")
            self.metrics.routed.labels(replica.name).inc()
            if slot.choice.by_prefix:
                self.metrics.prefix_routed.labels(replica.name).inc()
            if job.client_id:
                self.by_client_id[job.client_id] = upstream
            started = finished = completed = timed_out = busy = False
            try:
                async with aclosing(attempt(upstream)) as items:
                    while True:
                        try:
                            async with asyncio.timeout_at(end_by):
                                item = await anext(items)
                        except StopAsyncIteration:
                            break
                        except TimeoutError:
                            if loop.time() < end_by:
                                raise
                            timed_out = True
                            raise RequestTimeout(f"the request ran past the router's request timeout "
                                                 f"({self.config.request_timeout_s:g} s) and was stopped") from None
                        started = True
                        yield item
                finished = completed = True
                return
            except ReplicaUnavailable as exc:
                finished = True  # the replica is gone or unreachable: nothing left to cancel there
                replica.set_healthy(False, str(exc))
                if started:
                    self.metrics.failed.labels(replica.name).inc()
                    raise MidStreamFailure(f"replica {replica.name} failed mid-stream: {exc}") from None
                self.metrics.retried.labels(replica.name).inc()
                failed.add(replica.name)
                failures.append(f"replica {replica.name} failed before answering: {exc}")
                log.warning("%s; retrying on another replica", failures[-1])
            except ReplicaRefused as exc:
                finished = True  # refused: it never ran there
                self.metrics.refused.labels(replica.name).inc()
                failures.append(f"replica {replica.name}: {exc}")
                if exc.busy:
                    busy = True
                    refused.add(replica.name)
                    self.slots.full(slot)
                else:  # draining or failed: it takes nothing new until its health check says otherwise
                    replica.set_healthy(False, str(exc))
                    failed.add(replica.name)
            except UpstreamRejected:
                finished = True
                raise
            finally:
                self.slots.release(slot, completed)
                if job.client_id and self.by_client_id.get(job.client_id) is upstream:
                    del self.by_client_id[job.client_id]
                if not finished:  # the client left, the time is up (or the router failed): stop it in the engine
                    (self.metrics.timed_out if timed_out else self.metrics.cancelled).labels(replica.name).inc()
                    self.spawn(self.cancel(upstream))
            if busy and attempts < self.config.max_attempts:
                pause = self.backoff_s(attempts)
                if loop.time() + pause >= wait_until:
                    break
                await asyncio.sleep(pause)
        if not refused:
            raise NoReplica("; ".join(failures))
        raise self.slots.refuse("replicas_busy", f"the replicas refused the request {len(failures)} times "
                                f"(last: {failures[-1] if failures else 'none'})")

    async def cancel(self, upstream: Upstream) -> None:
        """Stop ``upstream`` in the replica's ``llm`` model (best effort, never raises)."""
        url = f"{upstream.replica.address.http_url}/v2/models/{self.config.cancel_model}/generate"
        try:
            async with self.session.post(url, json={"cancel_request_id": upstream.request_id},
                                         timeout=aiohttp.ClientTimeout(total=CANCEL_TIMEOUT_S)) as response:
                await response.read()
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("cancel of %s on %s failed: %r", upstream.request_id, upstream.replica.name, exc)

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        """Run ``coro`` to its end even if the task that started it is cancelled."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
