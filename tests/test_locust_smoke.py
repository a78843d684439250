"""Locust, headless, against the real server for a few seconds: no failures, a stats CSV with our entries,
and each request counted once in the Aggregated row."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, RunningServer

LOCUST = Path(sys.executable).with_name("locust")


@pytest.mark.parametrize("user", ["GrpcStreamUser", "HttpStreamUser"])
def test_locust_headless_run_has_no_failures(server: RunningServer, tmp_path: Path, user: str) -> None:
    host = server.grpc_url if user.startswith("Grpc") else server.http_url
    env = {**os.environ, "SCALELLM_OUTPUT_LEN": "8"}
    # --stop-timeout lets the last requests finish instead of being cut off mid-stream.
    run = subprocess.run([str(LOCUST), "-f", str(ROOT / "scripts" / "locustfile.py"), user, "--host", host,
                          "--headless", "-u", "2", "-r", "2", "-t", "5s", "--stop-timeout", "60",
                          "--csv", str(tmp_path / "run"), "--exit-code-on-error", "1"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {row["Name"]: row for row in csv.DictReader((tmp_path / "run_stats.csv").open())}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    requests = int(rows["E2E"]["Request Count"])
    assert requests > 0
    assert int(rows["Aggregated"]["Request Count"]) == requests  # each request counted once
    assert int(rows["TTFT"]["Request Count"]) == requests
    assert int(rows["per-token latency"]["Request Count"]) == requests
    assert float(rows["E2E"]["Average Content Size"]) == 8  # every request produced its 8 tokens
