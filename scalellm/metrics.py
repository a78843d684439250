"""Engine metrics on Triton's own Prometheus endpoint (port 8002), through the Python backend's metrics API.

Every family is prefixed ``scalellm_`` and labelled with the Triton model and instance, next to Triton's own
``nv_inference_*`` families.  Updated once per engine step from the step's summary, not per token, and off the
engine's loop thread: each metric call of the Python backend is a round trip to the server (one step's calls
took 7.7 ms at 64 sequences), so ``record`` only queues the step and a publisher thread makes the calls.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from scalellm.engine.engine import StepStats

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
log = logging.getLogger(__name__)

# name -> (kind, help); kinds map to pb_utils.MetricFamily.{COUNTER, GAUGE, HISTOGRAM}
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


class EngineMetrics:
    def __init__(self, pb_utils: Any, labels: dict[str, str]) -> None:
        self.m: dict[str, Any] = {}
        self._families = []  # keep the families alive as long as their metrics
        self._rejected: dict[str, Any] = {}
        self._labels = labels
        for name, (kind, description) in FAMILIES.items():
            family = pb_utils.MetricFamily(name=name, description=description,
                                           kind=getattr(pb_utils.MetricFamily, kind))
            self._families.append(family)
            if name == "scalellm_requests_rejected_total":
                self._rejected_family = family  # one metric per reason, made on first use
            elif kind == "HISTOGRAM":
                self.m[name] = family.Metric(labels=labels, buckets=BUCKETS[name])
            else:
                self.m[name] = family.Metric(labels=labels)
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
            stats = self._steps.get()
            try:
                self._publish(stats)
            except Exception:  # metrics must never take anything down
                log.exception("publishing engine metrics failed")

    def _publish(self, s: StepStats) -> None:
        m = self.m
        m["scalellm_requests_running"].set(s.running)
        m["scalellm_requests_waiting"].set(s.waiting)
        m["scalellm_kv_cache_blocks_used"].set(s.kv_blocks_used)
        m["scalellm_kv_cache_blocks_total"].set(s.kv_blocks_total)
        if s.batch_size == 0:  # the engine went idle outside a step (cancel, timeout): gauges only
            return
        m["scalellm_engine_steps_total"].increment(1)
        m["scalellm_batch_size"].observe(s.batch_size)
        if s.prefill_tokens:
            m["scalellm_prompt_tokens_total"].increment(s.prefill_tokens)
        if s.generated_tokens:
            m["scalellm_generation_tokens_total"].increment(s.generated_tokens)
        if s.preemptions_total > self._last_preemptions:
            m["scalellm_preemptions_total"].increment(s.preemptions_total - self._last_preemptions)
            self._last_preemptions = s.preemptions_total
        if s.prefix_hit_tokens_total > self._last_prefix_hits:
            m["scalellm_prefix_cache_hit_tokens_total"].increment(s.prefix_hit_tokens_total - self._last_prefix_hits)
            self._last_prefix_hits = s.prefix_hit_tokens_total
        for value in s.ttft_s:
            m["scalellm_time_to_first_token_seconds"].observe(value)
        for value in s.itl_s:
            m["scalellm_inter_token_latency_seconds"].observe(value)
