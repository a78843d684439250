"""One real tritonserver for the whole session, on free ports of 127.0.0.1, serving the built model.

The model directory is ``build/smollm2`` (what ``scripts/setup.sh`` builds; ``scripts/test.sh`` runs it
first), or ``$SCALELLM_TEST_MODEL_DIR``: a directory written by ``build_engines.py`` (``engine/`` +
``model_repository/``). The server is started only when a test asks for it, so the unit tests stay fast.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from build_engines import DEFAULT_TEMPLATES, render_repository
from scalellm.serving import ServerNotReady, TritonServer, free_ports
from scalellm.triton.params import default_parameters
from scalellm_client import Client

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("SCALELLM_TEST_MODEL_DIR", ROOT / "build" / "smollm2"))
ENGINE_DIR = MODEL_DIR / "engine"  # build_engines.py's engine directory (the torch engine's weights + tokenizer)
READY_TIMEOUT_S = 300.0
START_ATTEMPTS = 3  # another process may grab a port between free_ports() and tritonserver binding it
CLIENT_TIMEOUT_S = 180.0  # a hung server fails the test instead of hanging the suite
# All answers are in by teardown, so anything still in flight then has leaked: no need to wait 30 s for it.
EXIT_TIMEOUT_S = 5
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
IN_FLIGHT = re.compile(r"has [1-9]\d* in-flight inferences")
T = TypeVar("T")


@dataclass(frozen=True)
class RunningServer:
    """What tests need of the session's server: where to reach it and where it logs."""

    grpc_url: str  # host:port
    http_url: str  # http://host:port
    log_file: Path
    metrics_url: str  # http://host:port/metrics

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")

    @property
    def http_port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    @property
    def grpc_port(self) -> int:
        return int(self.grpc_url.rsplit(":", 1)[1])


def settled(read: Callable[[], T], every_s: float = 0.5) -> T:
    """``read()`` once two reads ``every_s`` apart agree: the engines publish their metrics every 0.2 s
    (scalellm/metrics.py), so a value read right after a request may still move."""
    value, previous = read(), None
    while value != previous:
        time.sleep(every_s)
        value, previous = read(), value
    return value


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 5.0) -> T:
    """``read()`` until ``done`` holds of it or ``timeout_s`` passes; the last value either way."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


def http_json(url: str, body: dict | None = None, timeout_s: float = CLIENT_TIMEOUT_S) -> tuple[int, dict]:
    """GET (no body) or POST JSON over plain HTTP, bypassing proxies: (status, decoded JSON body), errors too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with NO_PROXY.open(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def require_engine() -> Path:
    """``ENGINE_DIR``; the calling test fails (it does not skip) when the default engine was not built."""
    if not (ENGINE_DIR / "model.safetensors").is_file():
        pytest.fail(f"no engine at {ENGINE_DIR}: run scripts/test.sh (it builds the default engine)", pytrace=False)
    return ENGINE_DIR


def model_repository() -> Path:
    repo = MODEL_DIR / "model_repository"
    if not (repo / "ensemble" / "config.pbtxt").is_file():
        pytest.fail(
            f"no model repository at {repo}: run scripts/test.sh (it builds the default model with "
            "scripts/setup.sh), or set SCALELLM_TEST_MODEL_DIR to a directory built by build_engines.py",
            pytrace=False,
        )
    return repo


def _start(repo: Path, log_dir: Path) -> TritonServer:
    """Start and wait for a server, retrying on fresh ports if a port was taken under us."""
    for attempt in range(1, START_ATTEMPTS + 1):
        http_port, grpc_port, metrics_port = free_ports(3)
        server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                              log_file=log_dir / f"tritonserver-{attempt}.log",
                              extra_args=[f"--exit-timeout-secs={EXIT_TIMEOUT_S}"])
        try:
            server.start()
            server.wait_ready(READY_TIMEOUT_S)
            return server
        except BaseException as exc:
            server.stop()
            port_taken = isinstance(exc, ServerNotReady | OSError) and "in use" in str(exc)
            if attempt == START_ATTEMPTS or not port_taken:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The session's tritonserver; stopped (with its backend stubs) when the session ends.

    At the end it must shut down cleanly: a request still in flight once every test has its answer
    (e.g. an abandoned stream the server never finished) fails the session's teardown.
    """
    repo = model_repository()
    triton = _start(repo, tmp_path_factory.mktemp("tritonserver"))
    log_file = triton.log_file
    assert log_file is not None
    try:
        yield RunningServer(grpc_url=triton.grpc_url, http_url=triton.http_url, log_file=log_file,
                            metrics_url=triton.metrics_url)
    finally:
        code = triton.stop()
    leaked = [line for line in log_file.read_text(errors="replace").splitlines() if IN_FLIGHT.search(line)]
    if leaked:
        pytest.fail(
            f"tritonserver did not shut down cleanly (exit code {code}): requests were still in flight after "
            f"every test had finished: {leaked[0].strip()} (log: {log_file})",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A second server over the same engine, rendered in the non-decoupled mode (``--decoupled-mode false``) with
    the llm model served as ``tensorrt_llm`` (``--llm-model-name``), the name tensorrtllm_backend's tools call."""
    root = tmp_path_factory.mktemp("nondecoupled")
    values = {"engine_dir": str(ENGINE_DIR.resolve()), "max_batch_size": "64",
              "llm_instance_count": "1", "decoupled_mode": "false", "llm_model_name": "tensorrt_llm",
              **default_parameters()}
    render_repository(DEFAULT_TEMPLATES, root / "model_repository", values, "ensemble")
    triton = _start(root / "model_repository", root)
    try:
        yield RunningServer(grpc_url=triton.grpc_url, http_url=triton.http_url, log_file=Path(triton.log_file),
                            metrics_url=triton.metrics_url)
    finally:
        triton.stop()


@pytest.fixture(scope="session")
def grpc_client(server: RunningServer) -> Iterator[Client]:
    with Client(server.grpc_url, protocol="grpc", timeout_s=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="session")
def http_client(server: RunningServer) -> Iterator[Client]:
    with Client(server.http_url, protocol="http", timeout_s=CLIENT_TIMEOUT_S) as client:
        yield client


@pytest.fixture(params=["grpc", "http"])
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(protocol: str, request: pytest.FixtureRequest) -> Client:
    """The session's client for each protocol in turn (tests using it run once per protocol)."""
    return request.getfixturevalue(f"{protocol}_client")


@pytest.fixture
def server_url(protocol: str, server: RunningServer) -> str:
    """The session server's URL for ``protocol`` (what ``Client``/``AsyncClient`` take)."""
    return server.grpc_url if protocol == "grpc" else server.http_url
