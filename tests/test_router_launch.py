"""``scripts/serve.sh --replicas N`` (scalellm.router.launch): the README's first examples answer through it,
and Ctrl-C stops the router, the replicas and their stubs."""

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

from scalellm.serving import free_ports

pytestmark = pytest.mark.server


def test_launcher_serves_the_readme_examples_and_stops_cleanly(tmp_path: Path) -> None:
    model_repository()
    model_dir = small_model_dir(MODEL_DIR, tmp_path)
    http_port = free_ports(1)[0]
    grpc_port = free_ports(1)[0]
    cmd = [sys.executable, "-m", "scalellm.router.launch", "--replicas", "1", "--model-dir", str(model_dir),
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
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
        lines.append(process.stdout.read() if process.stdout else "")
    assert code == 0
    replica_ports = re.findall(r"replica 0: HTTP http://127.0.0.1:(\d+)", "".join(lines))
    assert replica_ports
    with pytest.raises(OSError):  # the replica is gone with the launcher
        opener.open(f"http://127.0.0.1:{replica_ports[0]}/v2/health/live", timeout=2)
