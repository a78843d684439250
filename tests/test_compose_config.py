"""docker-compose.yml as a user with Docker gets it, with no environment set: every image it runs comes from a
public registry or is built from a Dockerfile whose base image and copied files need nothing made locally (no
``localhost/`` base image, nothing copied from ``build/``); replicas and routers report their health and what
depends on them waits for it; the gpu router reads the tokenizer where the TensorRT-LLM build writes it. No
container runtime needed: tests/test_compose.py builds and runs the stack, the offline way.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scalellm.serving import free_ports
from scalellm.trtllm.repository import TOKENIZER_SUBDIR

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def render(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of ``${NAME}``, ``${NAME:-default}`` and ``${NAME-default}``."""
    return VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return yaml.safe_load(render((ROOT / "docker-compose.yml").read_text(), env or {}))["services"]


def dockerfile(service: dict) -> tuple[list[str], list[str], set[str]]:
    """(FROM images, COPY/ADD sources, ARG names) of a service's Dockerfile, with its build arguments applied."""
    build = service["build"]
    text = (ROOT / build.get("context", ".") / build["dockerfile"]).read_text()
    args = {name: str(value) for name, value in (build.get("args") or {}).items()}
    values: dict[str, str] = {}
    images, sources, declared = [], [], set()
    for line in re.sub(r"\\\n", " ", text).splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        instruction, rest = words[0].upper(), [re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ""), w)
                                              for w in words[1:]]
        if instruction == "ARG":
            name, _, default = words[1].partition("=")
            declared.add(name)
            values[name] = args.get(name, default)
        elif instruction == "FROM":
            images.append(rest[0])
        elif instruction in ("COPY", "ADD") and not any(w.startswith("--from") for w in rest):
            sources += [w for w in rest[:-1] if not w.startswith("--")]
    return images, sources, declared


def test_the_default_build_needs_nothing_made_locally() -> None:
    built = 0
    for name, service in services().items():
        if "build" not in service:
            assert not service["image"].startswith("localhost/"), f"{name} runs a local-only image {service['image']}"
            continue
        built += 1
        images, sources, declared = dockerfile(service)
        assert set(service["build"].get("args") or {}) <= declared, f"{name}: build args its Dockerfile lacks"
        for image in images:
            assert image and not image.startswith("localhost/"), f"{name}: FROM {image!r} is made locally"
        for source in sources:
            assert not source.startswith("build/"), f"{name}: copies {source} (made on the host) by default"
            assert (ROOT / source).exists(), f"{name}: copies {source}, which the repository does not have"
    assert built >= 2  # the cpu and Prometheus images


def test_the_offline_build_takes_the_local_base_and_the_downloaded_wheels() -> None:
    """What scripts/containers.sh sets selects the debootstrapped base and build/container-wheels."""
    printed = subprocess.run(["bash", str(ROOT / "scripts" / "containers.sh"), "env"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    env = dict(line.split("=", 1) for line in printed.split())
    offline = services(env)
    assert dockerfile(offline["replica-1"])[0] == ["localhost/debian-base:bookworm"]
    assert dockerfile(offline["prometheus"])[0] == ["localhost/debian-base:bookworm"]
    assert "build/container-wheels" in dockerfile(offline["replica-1"])[1]


def health_url(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return re.search(r"'(http://127\.0\.0\.1:\d+/[\w/]*)'", " ".join(test)).group(1)


def test_replicas_and_routers_report_health_and_their_dependants_wait_for_it() -> None:
    every = services()
    checked = {}
    for name, service in every.items():
        command = " ".join(map(str, service.get("command") or []))
        if "scalellm.serving" in command or command.startswith("tritonserver"):
            checked[name] = "http://127.0.0.1:8000/v2/health/ready"
        elif "scalellm.router" in command:
            port = re.search(r"--http-port (\d+)", command).group(1)
            checked[name] = f"http://127.0.0.1:{port}/health"
    assert {"replica-1", "replica-2", "router", "gpu-replica-1", "gpu-replica-2", "gpu-router"} <= set(checked)
    for name, url in checked.items():
        assert health_url(every[name]) == url, name
    for name, service in every.items():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):  # the short form: started, not healthy
            depends_on = {dependency: {"condition": "service_started"} for dependency in depends_on}
        for dependency, condition in depends_on.items():
            if dependency in checked:
                assert condition == {"condition": "service_healthy"}, f"{name} waits for {dependency} to be healthy"


def test_the_gpu_router_reads_the_tokenizer_the_trtllm_build_writes() -> None:
    gpu = services()
    build = gpu["engine-build"]["command"]
    output_dir = build[build.index("--output-dir") + 1]
    router = gpu["gpu-router"]["command"]
    assert router[router.index("--model-dir") + 1] == f"{output_dir}/{TOKENIZER_SUBDIR}"


@pytest.mark.server
def test_the_replicas_health_probe_passes_on_a_ready_triton_and_fails_without_one(server) -> None:
    """The replicas' healthcheck command itself, run against the suite's real tritonserver and a closed port."""
    test = services()["replica-1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]

    def probe(port: int) -> int:
        code = test[3].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode

    assert probe(server.http_port) == 0, test[3]
    assert probe(free_ports(1)[0]) != 0
