"""``scripts/serve.sh --replicas N`` (scalellm.router.launch): the README's first examples answer through it,
each replica runs on cores of its own, and Ctrl-C stops the router, the replicas and their stubs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import MODEL_DIR, ROOT, model_repository
from routerstack import small_model_dir

from scalellm.router.launch import parse_cpu_list
from scalellm.serving import free_ports

pytestmark = pytest.mark.server


def process_tree(port: int) -> list[int]:
    """The tritonserver listening on HTTP ``port`` and its children (the backend stubs)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]

    def read(pid: int, name: str) -> bytes:
        try:
            return (Path("/proc") / str(pid) / name).read_bytes()
        except OSError:
            return b""

    servers = [pid for pid in pids if f"--http-port={port}".encode() in read(pid, "cmdline").split(b"\0")]
    children = [pid for pid in pids if read(pid, "stat") and int(read(pid, "stat").rsplit(b")", 1)[1].split()[1])
                in servers]
    return servers + children


def status_field(pid: int, field: str) -> str:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_launcher_serves_the_readme_examples_and_stops_cleanly(tmp_path: Path) -> None:
    """Two replicas (one on a 1-CPU machine) behind the router, as ``scripts/serve.sh --replicas 2`` starts them:
    each replica, stubs included, runs on its own share of the CPUs with that many threads."""
    model_repository()
    model_dir = small_model_dir(MODEL_DIR, tmp_path)
    http_port = free_ports(1)[0]
    grpc_port = free_ports(1)[0]
    cpus = sorted(os.sched_getaffinity(0))
    replicas = min(2, len(cpus))
    cmd = [sys.executable, "-m", "scalellm.router.launch", "--replicas", str(replicas), "--model-dir", str(model_dir),
           "--router-port", str(http_port), "--router-grpc-port", str(grpc_port), "--log-dir", str(tmp_path)]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "SCALELLM_API_KEY": ""})
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 300
        while not any(line.startswith("READY") for line in lines):
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        lines += [process.stdout.readline() for _ in range(replicas)]  # the replicas' lines follow READY
        banner = "".join(lines)
        assert f"router HTTP http://127.0.0.1:{http_port}" in banner
        body = json.dumps({"model": "model", "temperature": 0, "max_tokens": 32,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=180) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."
        cli = subprocess.run([str(Path(sys.executable).parent / "scalellm-client"), "--chatml", "--url",
                              f"127.0.0.1:{grpc_port}", "What is the capital of France?"],
                             capture_output=True, text=True, timeout=180)
        assert cli.stdout.strip() == "The capital of France is Paris.", cli.stderr
        if replicas > 1:
            ports = [int(port) for port in re.findall(r"replica \d+: HTTP http://127.0.0.1:(\d+)", banner)]
            assert len(ports) == replicas, banner
            trees = [process_tree(port) for port in ports]
            assert all(len(tree) >= 4 for tree in trees), trees  # tritonserver + 3 stubs each
            allowed = [{status_field(pid, "Cpus_allowed_list") for pid in tree} for tree in trees]
            assert all(len(one) == 1 for one in allowed), allowed  # server and stubs alike
            sets = [parse_cpu_list(one.pop()) for one in allowed]
            assert sorted(cpu for cpus_ in sets for cpu in cpus_) == cpus, sets  # disjoint, every CPU used
            for tree, cpus_ in zip(trees, sets, strict=True):
                environ = (Path("/proc") / str(tree[-1]) / "environ").read_bytes().split(b"\0")
                assert f"OMP_NUM_THREADS={len(cpus_)}".encode() in environ
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
        lines.append(process.stdout.read() if process.stdout else "")
    assert code == 0
    replica_ports = re.findall(r"replica 0: HTTP http://127.0.0.1:(\d+)", "".join(lines))
    assert replica_ports
    with pytest.raises(OSError):  # the replica is gone with the launcher
        opener.open(f"http://127.0.0.1:{replica_ports[0]}/v2/health/live", timeout=2)
