"""Real replicas behind a real router for the router tests: N tritonservers (each with a smaller KV pool, from a
copy of the built model repository) and ``python -m scalellm.router`` as a subprocess, all on free ports of
127.0.0.1. Helpers read the replicas' Prometheus metrics."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scalellm.serving import TritonServer, free_ports

READY_TIMEOUT_S = 300.0
KV_CACHE_BYTES = 256 << 20  # 1 GiB per replica by default; tests need little
EXIT_TIMEOUT_S = 5


def small_model_dir(model_dir: Path, tmp: Path) -> Path:
    """``tmp/model``: the built engine (linked) and a copy of its repository with a smaller KV pool."""
    out = tmp / "model"
    out.mkdir()
    (out / "engine").symlink_to((model_dir / "engine").resolve())
    shutil.copytree(model_dir / "model_repository", out / "model_repository")
    config = out / "model_repository" / "llm" / "config.pbtxt"
    text = config.read_text()
    text, n = re.subn(r'(key: "kv_cache_memory_bytes" value: \{ string_value: ")\d+(")',
                      rf"\g<1>{KV_CACHE_BYTES}\g<2>", text)
    assert n == 1, "kv_cache_memory_bytes not found in the llm config"
    config.write_text(text)
    return out


def start_replicas(model_dir: Path, count: int, log_dir: Path) -> list[TritonServer]:
    servers = []
    try:
        for i in range(count):
            http, grpc, metrics = free_ports(3)
            server = TritonServer(model_dir / "model_repository", http_port=http, grpc_port=grpc,
                                  metrics_port=metrics, log_file=log_dir / f"replica-{i}.log",
                                  extra_args=[f"--exit-timeout-secs={EXIT_TIMEOUT_S}"])
            server.start()
            servers.append(server)
        for server in servers:
            server.wait_ready(READY_TIMEOUT_S)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


class LocalEndpoints:
    """The URLs of a child process serving HTTP and gRPC on ``http_port`` / ``grpc_port`` of 127.0.0.1."""

    http_port: int
    grpc_port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@dataclass
class RouterProcess(LocalEndpoints):
    """``python -m scalellm.router`` in front of ``replicas`` (and whatever ``args`` adds), run under
    ``wrapper`` (a command that execs its arguments) when given."""

    replicas: Sequence[TritonServer]
    model_dir: Path
    log_file: Path
    args: Sequence[str] = ()
    wrapper: Sequence[str] = ()
    http_port: int = 0
    grpc_port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> RouterProcess:
        self.http_port, self.grpc_port = free_ports(2)
        cmd = [*self.wrapper, sys.executable, "-m", "scalellm.router", "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), "--model-dir", str(self.model_dir),
               "--health-interval", "0.5", *self.args]
        for server in self.replicas:
            cmd += ["--replica", f"127.0.0.1:{server.http_port}:{server.grpc_port}"]
        env = {**os.environ, "SCALELLM_API_KEY": ""}
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited ({self.process.returncode}): {self.log_file.read_text()}")
            if http_status(f"{self.http_url}/v2/health/ready") == 200:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"router not ready: {self.log_file.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_status(url: str, timeout_s: float = 2.0) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def scrape(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return response.read().decode()


def metric(text: str, family: str, **labels: str) -> float:
    """Sum of a family's samples (whose labels include ``labels``) in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(family):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else (line.split(" ")[0], "", "")
        if name != family:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
