"""The replicas behind the router: their address, load, and health (polled on ``/v2/health/ready``), and the
replicas found by DNS (``--replica-dns``): every address a name resolves to is a replica, looked up again every
few seconds (a Kubernetes headless Service lists its ready pods this way)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

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
        self.retired = False  # left the pool: finishes its requests, gets no new ones
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
        if self.retired and self.load.in_flight == 0:
            self._metrics.remove_replica(self.name)
            return
        self._metrics.in_flight.labels(self.name).set(self.load.in_flight)
        self._metrics.outstanding_tokens.labels(self.name).set(self.load.outstanding_tokens)

    def retire(self) -> None:
        """Out of the pool: requests already sent here run to their end, then its metric series go."""
        self.retired = True
        if self.load.in_flight == 0:
            self._metrics.remove_replica(self.name)

    def rejoin(self) -> None:
        """Back in the pool (its address resolved again before its last request ended)."""
        self.retired = False
        self._metrics.add_replica(self.name)  # its series may be gone if that request ended meanwhile

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


# getaddrinfo's answers for a name that does not exist (now): the pool behind it is empty. Any other failure
# (a resolver that timed out, EAI_AGAIN) keeps the addresses found last time.
NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


async def resolve(name: ReplicaAddress) -> set[ReplicaAddress] | None:
    """The replicas behind ``name`` now: one per address ``name.host`` resolves to, with ``name``'s ports;
    None when the resolver could not answer."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name.host, name.http_port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in NO_SUCH_NAME:
            return set()
        log.warning("resolving %s failed (%s): keeping the replicas found before", name.host, exc)
        return None
    return {ReplicaAddress(str(info[4][0]), name.http_port, name.grpc_port) for info in infos}


class DnsDiscovery:
    """Keeps ``replicas`` (the dispatcher's list, changed in place) holding every address the DNS names resolve
    to, besides the static replicas. A new address is health-checked once, then added; a vanished one leaves the
    list at once, so no new request goes there, while the requests it holds run to their end (a terminating
    pod drains them: see the replica Deployment's preStop)."""

    def __init__(self, names: Sequence[ReplicaAddress], replicas: list[Replica], metrics: RouterMetrics,
                 session: aiohttp.ClientSession) -> None:
        self.names = tuple(names)
        self.replicas = replicas
        self.metrics = metrics
        self.session = session
        self.found: dict[ReplicaAddress, set[ReplicaAddress]] = {name: set() for name in self.names}
        self.discovered: dict[ReplicaAddress, Replica] = {}  # in the pool because a name resolves to it
        self.leaving: dict[ReplicaAddress, Replica] = {}  # left the pool, requests still running there

    async def refresh(self) -> None:
        for name, addresses in zip(self.names, await asyncio.gather(*map(resolve, self.names)), strict=True):
            if addresses is not None:
                self.found[name] = addresses
        wanted = set().union(*self.found.values())
        static = {r.address for r in self.replicas if r.address not in self.discovered}
        for address in sorted(wanted - static - self.discovered.keys(), key=str):
            replica = self.leaving.pop(address, None)
            if replica is not None:
                replica.rejoin()
            else:
                replica = Replica(address, self.metrics)
            await check_health(replica, self.session)
            self.discovered[address] = replica
            self.replicas.append(replica)
            log.warning("replica %s found by DNS (%s): added", replica.name, "ready" if replica.healthy else
                        "not ready yet")
        for address in [a for a in self.discovered if a not in wanted]:
            replica = self.discovered.pop(address)
            self.replicas.remove(replica)
            replica.retire()
            self.leaving[address] = replica
            log.warning("replica %s no longer in DNS: removed (%d request(s) still running there finish)",
                        replica.name, replica.load.in_flight)
        self.leaving = {a: r for a, r in self.leaving.items() if r.load.in_flight > 0}

    async def watch(self, interval_s: float) -> None:
        """Refresh every ``interval_s`` (forever; cancel the task to stop)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()
