"""Send one request to a replica chosen by the policy: retry before the first response, cancel when abandoned.

A request's *attempt* is an async generator that forwards it to one replica (``Upstream``) and yields what comes
back. ``Dispatcher.run`` wraps it:

- the replica's load counts the request until it ends;
- ``ReplicaUnavailable`` before the attempt yielded anything: the replica is marked down and the request goes
  to another healthy replica (nothing reached the client yet); after: ``MidStreamFailure``, a clear error;
- the attempt abandoned before its natural end (the client left: ``GeneratorExit`` or ``CancelledError``):
  the request is stopped in the engine by a control request ``{cancel_request_id}`` to the replica's ``llm``
  model, because Triton 2.51 does not pass an ensemble's cancellation on to its steps.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from .config import RouterConfig
from .metrics import RouterMetrics
from .policy import Policy
from .replicas import Replica

log = logging.getLogger("scalellm.router")
T = TypeVar("T")
CANCEL_TIMEOUT_S = 2.0


class NoReplica(Exception):
    """No healthy replica is left to try (HTTP 503)."""


class ReplicaUnavailable(Exception):
    """The replica could not be reached, or its connection broke."""


class MidStreamFailure(Exception):
    """The replica failed after the client had received part of the answer."""


class UpstreamRejected(Exception):
    """The replica answered with an error status before any response (bad input): passed on as it is."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.body, self.content_type = status, body, content_type


@dataclass(frozen=True)
class Job:
    """What the policy needs of a request: its prompt (prefix routing) and cost (prompt + max tokens)."""

    prompt: str
    cost: int
    client_id: str = ""  # the id the client gave the request, so its own cancel can be forwarded


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
        self.by_client_id: dict[str, Upstream] = {}
        self._background: set[asyncio.Task] = set()

    @property
    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def healthy_replica(self) -> Replica:
        for replica in self.replicas:
            if replica.healthy:
                return replica
        raise NoReplica(self._none_healthy())

    def _none_healthy(self) -> str:
        return f"no healthy replica (of {len(self.replicas)}: {', '.join(r.name for r in self.replicas)})"

    async def run(self, job: Job, attempt: Attempt[T]) -> AsyncGenerator[T, None]:
        tried: set[Replica] = set()  # objects, not indices: replicas found by DNS come and go meanwhile
        failures: list[str] = []
        while True:
            candidates = [i for i, r in enumerate(self.replicas) if r.healthy and r not in tried]
            if not candidates:
                raise NoReplica("; ".join(failures) if failures else self._none_healthy())
            choice = self.policy.choose([r.load for r in self.replicas], candidates, job.prompt)
            replica = self.replicas[choice.index]
            tried.add(replica)
            upstream = Upstream(replica, f"router-{uuid.uuid4().hex}")
            self.metrics.routed.labels(replica.name).inc()
            if choice.by_prefix:
                self.metrics.prefix_routed.labels(replica.name).inc()
            replica.begin(job.cost)
            if job.client_id:
                self.by_client_id[job.client_id] = upstream
            started = finished = False
            try:
                async with aclosing(attempt(upstream)) as items:
                    async for item in items:
                        started = True
                        yield item
                finished = True
                return
            except ReplicaUnavailable as exc:
                finished = True  # the replica is gone or unreachable: nothing left to cancel there
                replica.set_healthy(False, str(exc))
                if started:
                    self.metrics.failed.labels(replica.name).inc()
                    raise MidStreamFailure(f"replica {replica.name} failed mid-stream: {exc}") from None
                self.metrics.retried.labels(replica.name).inc()
                failures.append(f"replica {replica.name} failed before answering: {exc}")
                log.warning("%s; retrying on another replica", failures[-1])
            except UpstreamRejected:
                finished = True
                raise
            finally:
                replica.end(job.cost)
                if job.client_id and self.by_client_id.get(job.client_id) is upstream:
                    del self.by_client_id[job.client_id]
                if not finished:  # the client left (or the router failed): stop the request in the engine
                    self.metrics.cancelled.labels(replica.name).inc()
                    self.spawn(self.cancel(upstream))

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
