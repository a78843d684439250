"""docker-compose.yml under podman-compose: the cpu profile (image built from this checkout, two replicas, the
router, locust) answers through the router with scalellm_client and the openai SDK, and ``down`` leaves nothing
running; the gpu profile is validated with ``config``.

Needs podman and podman-compose (``bash scripts/setup.sh --containers``); without them these tests are skipped
with that reason. The first image build takes minutes; later ones reuse podman's layer cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
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
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} not ready after {timeout_s:.0f} s")


def test_cpu_profile_answers_through_the_router() -> None:
    project = f"scalellm-test-{os.getpid()}"
    http_port, grpc_port, locust_port = free_ports(3)
    env = {**os.environ, "SCALELLM_ROUTER_PORT": str(http_port), "SCALELLM_ROUTER_GRPC_PORT": str(grpc_port),
           "SCALELLM_LOCUST_PORT": str(locust_port), "SCALELLM_API_KEY": ""}
    started = time.monotonic()
    subprocess.run(["bash", str(ROOT / "scripts" / "containers.sh"), "build"], cwd=ROOT, env=env, check=True,
                   timeout=UP_TIMEOUT_S)
    built = time.monotonic()
    try:
        compose(project, "--profile", "cpu", "up", "-d", env=env)
        _wait_ready(f"http://127.0.0.1:{http_port}/v2/health/ready", UP_TIMEOUT_S)
        ready = time.monotonic()
        with Client(f"127.0.0.1:{grpc_port}", timeout_s=300) as client:
            assert client.generate(PROMPT, max_tokens=32).text == "The capital of France is Paris."
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0,
                            timeout=300)
        answer = oai.chat.completions.create(model="smollm2", temperature=0.0, max_tokens=32, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert answer.choices[0].message.content == "The capital of France is Paris."
        _wait_ready(f"http://127.0.0.1:{locust_port}/", 120)  # locust's web UI
        print(json.dumps({"image_build_s": round(built - started, 1), "up_to_ready_s": round(ready - built, 1)}))
    finally:
        down = compose(project, "--profile", "cpu", "down", "-t", "10", env=env, check=False)
    assert down.returncode == 0, down.stderr
    assert PODMAN is not None
    left = subprocess.run([PODMAN, "ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={project}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert left == [], f"containers left after down: {left}"
    networks = subprocess.run([PODMAN, "network", "ls", "--format", "{{.Name}}"], capture_output=True, text=True,
                              check=True).stdout.split()
    assert not [n for n in networks if n.startswith(project)], networks
