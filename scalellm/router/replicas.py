"""The replicas behind the router: their address, load, and health (polled on ``/v2/health/ready``)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from .config import ReplicaAddress
from .metrics import RouterMetrics
from .policy import Load

log = logging.getLogger("scalellm.router")
HEALTH_TIMEOUT_S = 2.0


class Replica:
    def __init__(self, address: ReplicaAddress, metrics: RouterMetrics) -> None:
        self.address = address
        self.name = address.name
        self.load = Load(address.name)
        self.healthy = False  # until the first health check answers
        self._metrics = metrics
        metrics.add_replica(self.name)

    def begin(self, cost: int) -> None:
        self.load.outstanding_tokens += cost
        self.load.in_flight += 1
        self._metrics.in_flight.labels(self.name).set(self.load.in_flight)
        self._metrics.outstanding_tokens.labels(self.name).set(self.load.outstanding_tokens)

    def end(self, cost: int) -> None:
        self.load.outstanding_tokens -= cost
        self.load.in_flight -= 1
        self._metrics.in_flight.labels(self.name).set(self.load.in_flight)
        self._metrics.outstanding_tokens.labels(self.name).set(self.load.outstanding_tokens)

    def set_healthy(self, healthy: bool, why: str = "") -> None:
        if healthy != self.healthy:
            log.warning("replica %s is %s%s", self.name, "ready" if healthy else "DOWN", f": {why}" if why else "")
        self.healthy = healthy
        self._metrics.healthy.labels(self.name).set(1 if healthy else 0)


async def check_health(replica: Replica, session: aiohttp.ClientSession) -> None:
    url = f"{replica.address.http_url}/v2/health/ready"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as response:
            await response.read()
            replica.set_healthy(response.status == 200, f"{url} answered {response.status}")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        replica.set_healthy(False, f"{url}: {exc!r}")


async def watch_health(replicas: list[Replica], session: aiohttp.ClientSession, interval_s: float) -> None:
    """Check every replica every ``interval_s`` (forever; cancel the task to stop)."""
    while True:
        await asyncio.gather(*(check_health(r, session) for r in replicas))
        await asyncio.sleep(interval_s)
