"""The engine's Prometheus metrics on Triton's metrics port move with the work actually done."""

from __future__ import annotations

import re
import time
import urllib.request

from conftest import RunningServer, settled

from scalellm_client import Client


def scrape(url: str, family: str) -> float:
    """Sum of a family's samples over its label sets (0 when absent)."""
    text = urllib.request.urlopen(url).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{family}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def wait_for(url: str, family: str, expected: float, timeout_s: float = 5.0) -> float:
    """Metrics are published at most 0.2 s after the step that finished a request (scalellm/metrics.py)."""
    deadline = time.monotonic() + timeout_s
    value = scrape(url, family)
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        value = scrape(url, family)
    return value


def test_counters_grow_by_the_tokens_generated(server: RunningServer, grpc_client: Client) -> None:
    url = server.metrics_url
    tokens0 = settled(lambda: scrape(url, "scalellm_generation_tokens_total"))  # earlier tests' tokens included
    ttft0 = settled(lambda: scrape(url, "scalellm_time_to_first_token_seconds_count"))
    generated = sum(grpc_client.generate(f"Count to {n}:", max_tokens=n, end_id=-1).num_tokens for n in (5, 6, 7))
    assert generated == 18
    assert wait_for(url, "scalellm_generation_tokens_total", tokens0 + generated) == tokens0 + generated
    assert wait_for(url, "scalellm_time_to_first_token_seconds_count", ttft0 + 3) == ttft0 + 3
    # histograms as Prometheus exposes them: cumulative buckets up to +Inf == _count
    itl_count = scrape(url, "scalellm_inter_token_latency_seconds_count")
    text = urllib.request.urlopen(url).read().decode()
    buckets = {float(le): float(v) for le, v in re.findall(
        r'^scalellm_inter_token_latency_seconds_bucket{[^}]*le="([^"]+)"[^}]*} (\S+)$', text, re.M)}
    assert buckets[float("inf")] == itl_count >= generated - 3
    counts = [buckets[le] for le in sorted(buckets)]
    assert counts == sorted(counts)
    assert scrape(url, "scalellm_kv_cache_blocks_total") > 0
    assert wait_for(url, "scalellm_kv_cache_blocks_used", 0) == 0  # everything given back
    assert scrape(url, "scalellm_requests_running") == 0
