"""What the reliability, fuzz and soak runs share: a model repository with other llm limits, the launcher
as a child process, raw Triton requests (tritonclient, so hostile inputs reach the server unfiltered),
and readings of the server's metrics and processes."""

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
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpc_aio
from conftest import ENGINE_DIR, MODEL_DIR, NO_PROXY
from routerstack import LocalEndpoints

from scalellm.serving import free_ports, port_open

STREAM_TIMEOUT_S = 300.0  # a hung server fails the test instead of hanging the suite


def render_repository(dest: Path, **llm_params: str | int) -> Path:
    """The built model repository under ``dest`` with the llm model's parameters replaced or added."""
    src = MODEL_DIR / "model_repository"
    if not (src / "llm" / "config.pbtxt").is_file():
        raise FileNotFoundError(f"no model repository at {src}: run scripts/test.sh (it builds the default model)")
    repo = dest / "model_repository"
    shutil.copytree(src, repo, symlinks=True)
    (dest / "engine").symlink_to(ENGINE_DIR.resolve())  # engine_dir is "../engine"
    config = repo / "llm" / "config.pbtxt"
    text = config.read_text()
    for key, value in llm_params.items():
        line = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        pattern = re.compile(rf'^parameters \{{ key: "{re.escape(key)}" .*$', re.MULTILINE)
        text, found = pattern.subn(line, text)
        if not found:
            text += line + "\n"
    config.write_text(text)
    return repo


class Launcher(LocalEndpoints):
    """``python -m scalellm.serving`` as a child process on free ports of 127.0.0.1."""

    def __init__(self, repo: Path, log_dir: Path, *args: str) -> None:
        self.repo = repo
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.log_file = log_dir / "tritonserver.log"
        self.output = log_dir / "launcher.out"
        cmd = [sys.executable, "-m", "scalellm.serving", "--model-repository", str(repo),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--log-file", str(self.log_file), *args]
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def is_ready(self) -> bool:
        try:
            with NO_PROXY.open(f"{self.http_url}/v2/health/ready", timeout=2.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        # Triton opens the metrics port a moment after HTTP reports ready
        while not (self.is_ready() and port_open("127.0.0.1", self.metrics_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"launcher not ready (exit {self.process.poll()}):\n{self.transcript()}")
            time.sleep(0.5)

    def transcript(self) -> str:
        tail = self.log_file.read_text(errors="replace")[-4000:] if self.log_file.exists() else ""
        return self.output.read_text(errors="replace")[-3000:] + "\n--- server log tail ---\n" + tail

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)

    def close(self) -> None:
        """Whatever happened: nothing of this launcher or its server is left running."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in processes_using(self.repo):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def processes_using(repo: Path) -> list[int]:
    """Live processes whose command line names ``repo`` (its tritonserver and backend stubs)."""
    needle = str(repo).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if needle in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


def stub_pid(repo: Path, model: str) -> int:
    """The pid of ``model``'s Python-backend stub serving ``repo``."""
    model_py = str(repo / model / "1" / "model.py").encode()
    for pid in processes_using(repo):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if Path(argv[0].decode()).name == "triton_python_backend_stub" and model_py in argv:
            return pid
    raise AssertionError(f"no stub for {model} among {processes_using(repo)}")


def metric(metrics_url: str, name: str) -> float:
    """Sum of a metric family over its labels on Triton's Prometheus endpoint."""
    with NO_PROXY.open(metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values)


def wait_for_metric(metrics_url: str, name: str, want: float, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (value := metric(metrics_url, name)) != want and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


# The ensemble's input dtypes, for fields given as plain Python values (arrays keep their own dtype).
ENSEMBLE_DTYPES = {"max_tokens": np.int32, "end_id": np.int32, "pad_id": np.int32, "top_k": np.int32,
                   "min_tokens": np.int32, "min_length": np.int32, "beam_width": np.int32,
                   "random_seed": np.uint64, "seed": np.uint64, "timeout_ms": np.uint64,
                   "top_p": np.float32, "temperature": np.float32, "length_penalty": np.float32,
                   "repetition_penalty": np.float32, "presence_penalty": np.float32,
                   "frequency_penalty": np.float32, "min_p": np.float32, "return_log_probs": np.bool_,
                   "exclude_input_in_output": np.bool_, "stream": np.bool_, "return_perf_metrics": np.bool_}


def grpc_inputs(fields: dict[str, Any]) -> list[grpc_aio.InferInput]:
    """Every field as a [1, ...] tensor; numpy arrays are sent as they are (no client-side checks)."""
    inputs = []
    for name, value in fields.items():
        array = value if isinstance(value, np.ndarray) else np.asarray([[value]], dtype=ENSEMBLE_DTYPES.get(name))
        if array.dtype.kind in "US":
            array = np.char.encode(array.astype(str), "utf-8").astype(object)
        dtype = "BYTES" if array.dtype == object else {
            "b": "BOOL", "i": {4: "INT32", 8: "INT64"}, "u": {8: "UINT64", 4: "UINT32"}, "f": {4: "FP32", 8: "FP64"},
        }[array.dtype.kind]
        if isinstance(dtype, dict):
            dtype = dtype[array.dtype.itemsize]
        tensor = grpc_aio.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


async def stream(client: grpc_aio.InferenceServerClient, fields: dict[str, Any], model: str = "ensemble",
                 request_id: str = "") -> dict[str, Any]:
    """One streamed request to its end: ``{"text", "finish_reason", "error", "responses"}``."""

    async def once():
        yield {"model_name": model, "inputs": grpc_inputs(fields), "request_id": request_id}

    result: dict[str, Any] = {"text": "", "finish_reason": "", "error": None, "responses": 0}
    call = client.stream_infer(once(), stream_timeout=STREAM_TIMEOUT_S)
    async for response, error in call:  # to the end of the call: the server ends it after the final response
        if error is not None:
            result["error"] = error.message() if hasattr(error, "message") else str(error)
            continue
        result["responses"] += 1
        outputs = {o.name for o in response.get_response().outputs}
        if "text_output" in outputs:
            result["text"] += response.as_numpy("text_output").reshape(-1)[0].decode("utf-8")
        if "finish_reason" in outputs:
            reason = response.as_numpy("finish_reason").reshape(-1)[0]
            result["finish_reason"] = reason.decode() if isinstance(reason, bytes) else str(reason)
    return result
