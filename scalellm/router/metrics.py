"""The router's Prometheus metrics (most labelled per replica; its queue's not), on its own registry (served at
``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


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
        self.timed_out = Counter("scalellm_router_requests_timed_out",
                                 "requests stopped in the engine at the router's request timeout", labels,
                                 registry=r)
        self.refused = Counter("scalellm_router_requests_refused",
                               "busy or shutting-down answers of the replica before a first response (the request "
                               "was tried again)", labels, registry=r)
        self.slots = Gauge("scalellm_router_replica_slots",
                           "requests the router keeps in flight at the replica at most (0: no limit or unknown)",
                           labels, registry=r)
        self.queue_length = Gauge("scalellm_router_queue_length",
                                  "requests waiting in the router for a replica with room", registry=r)
        self.queue_wait = Histogram("scalellm_router_queue_wait_seconds",
                                    "time requests waited in the router's queue (placed or refused)",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.rejected = Counter("scalellm_router_requests_rejected",
                                "requests refused with 429/503 + Retry-After, by reason: queue_full, queue_timeout "
                                "(no room in time), replicas_busy (the replicas refused every attempt)",
                                ["reason"], registry=r)
        for reason in ("queue_full", "queue_timeout", "replicas_busy"):
            self.rejected.labels(reason)

    def _families(self) -> tuple:
        return (self.in_flight, self.outstanding_tokens, self.healthy, self.routed, self.prefix_routed,
                self.retried, self.failed, self.cancelled, self.timed_out, self.refused, self.slots)

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
