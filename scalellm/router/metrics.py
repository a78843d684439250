"""The router's Prometheus metrics, labelled per replica, on its own registry (served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["replica"]
        r = self.registry
        self.in_flight = Gauge("scalellm_router_requests_in_flight", "requests forwarded and not yet finished",
                               labels, registry=r)
        self.outstanding_tokens = Gauge("scalellm_router_outstanding_tokens",
                                        "prompt + max_tokens of the requests in flight", labels, registry=r)
        self.healthy = Gauge("scalellm_router_replica_healthy", "1 if /v2/health/ready answered 200",
                             labels, registry=r)
        self.routed = Counter("scalellm_router_requests_routed", "requests sent to the replica", labels,
                              registry=r)
        self.prefix_routed = Counter("scalellm_router_prefix_routed",
                                     "requests sent to the replica because it holds their prompt prefix",
                                     labels, registry=r)
        self.retried = Counter("scalellm_router_requests_retried",
                               "requests that failed on the replica before their first response and were "
                               "sent to another", labels, registry=r)
        self.failed = Counter("scalellm_router_requests_failed",
                              "requests the replica failed after streaming had started (ended with an error)",
                              labels, registry=r)
        self.cancelled = Counter("scalellm_router_requests_cancelled",
                                 "requests stopped in the engine because their client left", labels, registry=r)

    def _families(self) -> tuple:
        return (self.in_flight, self.outstanding_tokens, self.healthy, self.routed, self.prefix_routed,
                self.retried, self.failed, self.cancelled)

    def add_replica(self, name: str) -> None:
        """Create every series for ``name`` at 0, so dashboards see the replica before its first request."""
        for family in self._families():
            family.labels(name)

    def remove_replica(self, name: str) -> None:
        """Drop ``name``'s series (a replica that left the pool and finished its requests)."""
        for family in self._families():
            try:
                family.remove(name)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
