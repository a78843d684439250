"""Engine metrics on Triton's own Prometheus endpoint (port 8002), through the Python backend's metrics API.

Every family is prefixed ``scalellm_`` and labelled with the Triton model and instance, next to Triton's own
``nv_inference_*`` families.  Each metric call of the Python backend is a round trip to the server, and at 64
sequences a step's per-token histogram observations alone were 64 of them: with no metric calls at all, the
Triton path spent 17% less CPU per streamed token (docs/benchmarks.md).  So the engine's loop thread only
queues each step's summary, and a publisher thread folds everything queued into one update every
``PUBLISH_INTERVAL_S``: gauges set to the latest value, counters incremented by the sums, and histograms kept
as Prometheus' own series (``_bucket{le}``, ``_sum``, ``_count``) on counter families, so that a publish
costs one call per bucket touched whatever the number of tokens (the API's histogram takes one value a call).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from scalellm.engine.admission import Unavailable
from scalellm.engine.engine import StepStats

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.2

# name -> (kind, help); kinds: pb_utils.MetricFamily.COUNTER or GAUGE, or HISTOGRAM (see CounterHistogram)
FAMILIES: dict[str, tuple[str, str]] = {
    "scalellm_requests_running": ("GAUGE", "Requests being generated (holding KV-cache blocks)"),
    "scalellm_requests_waiting": ("GAUGE", "Requests queued or preempted, waiting for a step"),
    "scalellm_kv_cache_blocks_used": ("GAUGE", "KV-cache blocks in use"),
    "scalellm_kv_cache_blocks_total": ("GAUGE", "KV-cache blocks in the pool"),
    "scalellm_prompt_tokens_total": ("COUNTER", "Prompt tokens computed (prefix-cache hits excluded)"),
    "scalellm_generation_tokens_total": ("COUNTER", "Tokens sampled (end-of-sequence included)"),
    "scalellm_prefix_cache_hit_tokens_total": ("COUNTER", "Prompt tokens served from the prefix cache"),
    "scalellm_preemptions_total": ("COUNTER", "Requests preempted when KV-cache blocks ran out"),
    "scalellm_engine_steps_total": ("COUNTER", "Engine steps run"),
    "scalellm_requests_rejected_total": ("COUNTER", "Requests refused before admission, by reason "
                                         "(busy: queue full; draining: shutting down; engine_failed)"),
    "scalellm_batch_size": ("HISTOGRAM", "Sequences per engine step"),
    "scalellm_time_to_first_token_seconds": ("HISTOGRAM", "Arrival at the llm model to first token"),
    "scalellm_inter_token_latency_seconds": ("HISTOGRAM", "Time between consecutive tokens of a request"),
}
BUCKETS = {
    "scalellm_batch_size": BATCH_BUCKETS,
    "scalellm_time_to_first_token_seconds": TTFT_BUCKETS,
    "scalellm_inter_token_latency_seconds": ITL_BUCKETS,
}


class CounterHistogram:
    """A Prometheus histogram as its exposition series, ``name_bucket{le}`` (cumulative), ``name_sum`` and
    ``name_count``, each a counter family: ``add`` takes any number of values for one call per bucket touched."""

    def __init__(self, pb_utils: Any, name: str, description: str, buckets: list[float],
                 labels: dict[str, str]) -> None:
        counter = pb_utils.MetricFamily.COUNTER
        self.families = [pb_utils.MetricFamily(name=f"{name}{suffix}", description=description, kind=counter)
                         for suffix in ("_bucket", "_sum", "_count")]
        self.bounds = [*map(float, buckets), float("inf")]
        self.buckets = [self.families[0].Metric(labels={**labels, "le": _le(bound)}) for bound in self.bounds]
        self.sum = self.families[1].Metric(labels=labels)
        self.count = self.families[2].Metric(labels=labels)

    def add(self, values: list[float]) -> None:
        if not values:
            return
        for bound, bucket in zip(self.bounds, self.buckets, strict=True):
            below = sum(1 for value in values if value <= bound)
            if below:
                bucket.increment(below)
        self.sum.increment(sum(values))
        self.count.increment(len(values))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class EngineMetrics:
    def __init__(self, pb_utils: Any, labels: dict[str, str], kv_blocks_total: int) -> None:
        self.m: dict[str, Any] = {}
        self.histograms: dict[str, CounterHistogram] = {}
        self._families = []  # keep the families alive as long as their metrics
        self._rejected: dict[str, Any] = {}
        self._labels = labels
        for name, (kind, description) in FAMILIES.items():
            if kind == "HISTOGRAM":
                self.histograms[name] = CounterHistogram(pb_utils, name, description, BUCKETS[name], labels)
                continue
            family = pb_utils.MetricFamily(name=name, description=description,
                                           kind=getattr(pb_utils.MetricFamily, kind))
            self._families.append(family)
            if name == "scalellm_requests_rejected_total":
                # one series per reason, at 0 from the start: a dashboard's rate() then reads 0, not "no data"
                self._rejected.update({cls.reason: family.Metric(labels={**labels, "reason": cls.reason})
                                       for cls in Unavailable.__subclasses__()})
                self._rejected_family = family
            else:
                self.m[name] = family.Metric(labels=labels)
        # the pool's size from the start: an idle replica's KV-cache usage then reads 0, not 0/0
        self.m["scalellm_kv_cache_blocks_total"].set(kv_blocks_total)
        self._last_preemptions = 0
        self._last_prefix_hits = 0
        self._steps: queue.SimpleQueue[StepStats] = queue.SimpleQueue()
        threading.Thread(target=self._publish_loop, name="scalellm-metrics", daemon=True).start()

    def record_rejection(self, reason: str) -> None:
        if reason not in self._rejected:
            self._rejected[reason] = self._rejected_family.Metric(labels={**self._labels, "reason": reason})
        self._rejected[reason].increment(1)

    def record(self, s: StepStats) -> None:
        """Called by the engine's loop thread after each step: queue it, never wait for the server."""
        self._steps.put(s)

    def _publish_loop(self) -> None:
        while True:
            started = time.monotonic()
            steps = [self._steps.get()]
            time.sleep(max(0.0, started + PUBLISH_INTERVAL_S - time.monotonic()))
            while not self._steps.empty():
                steps.append(self._steps.get())
            try:
                self._publish(steps)
            except Exception:  # metrics must never take anything down
                log.exception("publishing engine metrics failed")

    def _publish(self, steps: list[StepStats]) -> None:
        m, last = self.m, steps[-1]
        m["scalellm_requests_running"].set(last.running)
        m["scalellm_requests_waiting"].set(last.waiting)
        m["scalellm_kv_cache_blocks_used"].set(last.kv_blocks_used)
        m["scalellm_kv_cache_blocks_total"].set(last.kv_blocks_total)
        ran = [s for s in steps if s.batch_size]  # batch 0: the engine went idle outside a step (cancel, timeout)
        if ran:
            m["scalellm_engine_steps_total"].increment(len(ran))
        for name, total in (("scalellm_prompt_tokens_total", sum(s.prefill_tokens for s in ran)),
                            ("scalellm_generation_tokens_total", sum(s.generated_tokens for s in ran))):
            if total:
                m[name].increment(total)
        if last.preemptions_total > self._last_preemptions:
            m["scalellm_preemptions_total"].increment(last.preemptions_total - self._last_preemptions)
            self._last_preemptions = last.preemptions_total
        if last.prefix_hit_tokens_total > self._last_prefix_hits:
            m["scalellm_prefix_cache_hit_tokens_total"].increment(last.prefix_hit_tokens_total - self._last_prefix_hits)
            self._last_prefix_hits = last.prefix_hit_tokens_total
        self.histograms["scalellm_batch_size"].add([s.batch_size for s in ran])
        self.histograms["scalellm_time_to_first_token_seconds"].add([v for s in ran for v in s.ttft_s])
        self.histograms["scalellm_inter_token_latency_seconds"].add([v for s in ran for v in s.itl_s])
