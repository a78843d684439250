"""docker-compose.yml under podman-compose: the cpu profile (image built from this checkout, two replicas, the
router, locust) answers through the router with scalellm_client and the openai SDK; with the monitoring profile
beside it, Prometheus scrapes the router and both replicas, its recording rules evaluate, and every query of the
Grafana dashboard (deploy/grafana) returns data after a short load; ``down`` leaves nothing running. The gpu
profile is validated with ``config``.

Needs podman and podman-compose (``bash scripts/setup.sh --containers``); without them these tests are skipped
with that reason. The first image build takes minutes; later ones reuse podman's layer cache.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from scalellm.serving import free_ports
from scalellm_client import Client

ROOT = Path(__file__).resolve().parents[1]
PODMAN = shutil.which("podman")
COMPOSE = str(ROOT / ".venv" / "bin" / "podman-compose") if (ROOT / ".venv/bin/podman-compose").is_file() \
    else shutil.which("podman-compose")
MISSING = [name for name, path in (("podman", PODMAN), ("podman-compose", COMPOSE)) if path is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not installed: `bash scripts/setup.sh --containers` installs "
                          "them (the compose tests need a container runtime)")
UP_TIMEOUT_S = 900.0
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PROFILES = ("--profile", "cpu", "--profile", "monitoring")
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "scalellm.json"
SCRAPED = {"scalellm-replicas": {"replica-1", "replica-2"}, "scalellm-router": {"router"}}
PROMETHEUS_TIMEOUT_S = 120.0
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def compose(project: str, *args: str, env: dict[str, str] | None = None, timeout: float = 900,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    return subprocess.run([COMPOSE, "-p", project, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=check)


def test_gpu_profile_is_valid_compose() -> None:
    config = compose("scalellm-config", "--profile", "gpu", "config").stdout
    for service in ("engine-build", "gpu-replica-1", "gpu-replica-2", "gpu-router", "gpu-locust"):
        assert f"{service}:" in config
    assert "build_engines.py\n    - --backend\n    - tensorrt_llm" in config
    assert "capabilities:" in config and "device_ids:" in config and "nvidia" in config


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with NO_PROXY.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} not ready after {timeout_s:.0f} s")


def _wait_replicas_ready(router_metrics_url: str, replicas: int, timeout_s: float) -> None:
    """Until the router sees every replica ready (its /v2/health/ready probe): the router is ready with one, and
    podman-compose before podman 4.6 does not wait for the replicas' healthchecks, so the other may still be
    loading and get none of the load that follows (its engine then never publishes its KV-cache gauges)."""
    deadline = time.monotonic() + timeout_s
    healthy: list[str] = []
    while time.monotonic() < deadline:
        with NO_PROXY.open(router_metrics_url, timeout=10) as response:
            healthy = re.findall(r"^scalellm_router_replica_healthy\{[^}]*\} 1(?:\.0)?$", response.read().decode(),
                                 re.M)
        if len(healthy) >= replicas:
            return
        time.sleep(1)
    pytest.fail(f"{len(healthy)} of {replicas} replicas ready after {timeout_s:.0f} s")


def prometheus(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with NO_PROXY.open(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def scraped_up(base: str) -> dict[str, set[str]]:
    """Per scrape job, the compose services whose target is up."""
    up: dict[str, set[str]] = {}
    for target in prometheus(base, "targets")["activeTargets"]:
        if target["health"] == "up":
            up.setdefault(target["labels"]["job"], set()).add(target["labels"]["service"])
    return up


def finite_values(base: str, query: str) -> list[float]:
    result = prometheus(base, "query", query=query.replace("$__rate_interval", "1m"))["result"]
    return [float(series["value"][1]) for series in result if math.isfinite(float(series["value"][1]))]


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]


def short_load(grpc_port: int) -> None:
    """16 requests, 8 at a time, through the router (both replicas get some)."""
    def one(_: int) -> str:
        with Client(f"127.0.0.1:{grpc_port}", timeout_s=300) as client:
            return client.generate(PROMPT, max_tokens=32).text
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(16))) == {"The capital of France is Paris."}


def check_monitoring(base: str, grpc_port: int) -> None:
    deadline = time.monotonic() + PROMETHEUS_TIMEOUT_S
    while scraped_up(base) != SCRAPED and time.monotonic() < deadline:
        time.sleep(2)
    assert scraped_up(base) == SCRAPED, prometheus(base, "targets")
    time.sleep(6)  # one more scrape of the idle stack: the counters' rates below start from it
    short_load(grpc_port)
    queries = dashboard_queries()
    missing = queries
    while missing and time.monotonic() < deadline + PROMETHEUS_TIMEOUT_S:
        time.sleep(3)
        missing = [q for q in queries if not finite_values(base, q)]
    assert not missing, f"dashboard queries without data from the live Prometheus: {missing}"
    rules = [rule for group in prometheus(base, "rules")["groups"] for rule in group["rules"]]
    assert {r["name"] for r in rules} == {"scalellm:requests_waiting", "scalellm:kv_cache_usage:ratio",
                                          "triton:queue_compute:ratio"}
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert len(finite_values(base, rule["name"])) == 2, rule["name"]  # one series per replica
    assert min(finite_values(base, queries[0])) > 0  # TTFT p50 over the load


def test_cpu_and_monitoring_profiles_answer_through_the_router_and_fill_the_dashboard() -> None:
    project = f"scalellm-test-{os.getpid()}"
    http_port, grpc_port, locust_port, prometheus_port, grafana_port = free_ports(5)
    env = {**os.environ, "SCALELLM_ROUTER_PORT": str(http_port), "SCALELLM_ROUTER_GRPC_PORT": str(grpc_port),
           "SCALELLM_LOCUST_PORT": str(locust_port), "SCALELLM_PROMETHEUS_PORT": str(prometheus_port),
           "SCALELLM_GRAFANA_PORT": str(grafana_port), "SCALELLM_API_KEY": ""}
    started = time.monotonic()
    containers = ["bash", str(ROOT / "scripts" / "containers.sh")]
    subprocess.run([*containers, "build"], cwd=ROOT, env=env, check=True, timeout=UP_TIMEOUT_S)
    services = subprocess.run([*containers, "services", "monitoring"], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True, timeout=120).stdout.split()
    built = time.monotonic()
    try:
        compose(project, *PROFILES, "up", "-d", *services, env=env)
        _wait_ready(f"http://127.0.0.1:{http_port}/v2/health/ready", UP_TIMEOUT_S)
        _wait_replicas_ready(f"http://127.0.0.1:{http_port}/metrics", 2, UP_TIMEOUT_S)
        ready = time.monotonic()
        with Client(f"127.0.0.1:{grpc_port}", timeout_s=300) as client:
            assert client.generate(PROMPT, max_tokens=32).text == "The capital of France is Paris."
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0,
                            timeout=300)
        answer = oai.chat.completions.create(model="smollm2", temperature=0.0, max_tokens=32, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert answer.choices[0].message.content == "The capital of France is Paris."
        _wait_ready(f"http://127.0.0.1:{locust_port}/", 120)  # locust's web UI
        check_monitoring(f"http://127.0.0.1:{prometheus_port}", grpc_port)
        if "grafana" in services:  # where its image could be pulled: the dashboard is provisioned
            _wait_ready(f"http://127.0.0.1:{grafana_port}/api/dashboards/uid/scalellm", 120)
        print(json.dumps({"image_build_s": round(built - started, 1), "up_to_ready_s": round(ready - built, 1),
                          "monitoring_s": round(time.monotonic() - ready, 1), "grafana": "grafana" in services}))
    finally:
        down = compose(project, *PROFILES, "down", "-t", "10", env=env, check=False)
    assert down.returncode == 0, down.stderr
    assert PODMAN is not None
    left = subprocess.run([PODMAN, "ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={project}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert left == [], f"containers left after down: {left}"
    networks = subprocess.run([PODMAN, "network", "ls", "--format", "{{.Name}}"], capture_output=True, text=True,
                              check=True).stdout.split()
    assert not [n for n in networks if n.startswith(project)], networks
