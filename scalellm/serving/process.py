"""One tritonserver process: start it, wait until ready, drain it, stop it with everything it spawned.

The server runs in its own session, so stopping it can also reap the ``triton_python_backend_stub`` processes
it spawned: SIGTERM to the server (a graceful unload), then SIGKILL to its whole process group.

Drain: ``begin_drain`` writes the drain file named by ``$SCALELLM_DRAIN_FILE`` in the server's environment
(see ``scalellm.drain``; every ``llm`` instance polls it: refuse new requests, finish what runs by the deadline,
then end the rest with finish reason "shutdown"). Only once the engines are empty (``drained``) may Triton get
its SIGTERM: Triton 2.51 unloads an ensemble's idle composing models (postprocessing) at once on SIGTERM, and
the ensemble requests still streaming then never complete. So the launcher, not Triton, waits out the grace.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from scalellm.drain import DRAIN_FILE_ENV, write_drain_file
from scalellm.serving.install import STUB_NAME, TritonInstall, locate_tritonserver, prepare_backend_dir, server_env

DEFAULT_HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 600.0
STOP_GRACE_S = 45.0  # Triton itself waits up to --exit-timeout-secs (30) for in-flight requests
LOG_TAIL_LINES = 40
DRAIN_SETTLE_S = 1.0  # engines empty this long: the last responses have left the ensemble
PR_SET_PDEATHSIG = 1


class ServerNotReady(RuntimeError):
    """tritonserver exited, or did not report ready in time; the message carries the tail of its log."""


def port_open(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _metrics_allowed(args: Sequence[str]) -> bool:
    """False when the extra arguments turn Triton's metrics off (``--allow-metrics=false`` or ``... false``)."""
    words = " ".join(args).replace("=", " ").lower().split()
    return not any(a == "--allow-metrics" and v in ("false", "0") for a, v in itertools.pairwise(words))


def _connect_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (wildcards mean loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """Ports free right now (tests start several servers side by side; Triton cannot bind port 0)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers don't count
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _child_setup(cpus: frozenset[int] | None, in_main_thread: bool) -> Callable[[], None] | None:
    """The pre-exec hook: die with the launcher (only from the main thread, see below), and run on ``cpus``
    (the server, its threads and its backend stubs inherit the affinity)."""
    die = _die_with_parent_hook() if in_main_thread else None
    if cpus is None:
        return die

    def setup() -> None:
        if die is not None:
            die()
        os.sched_setaffinity(0, cpus)

    return setup


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook that makes the kernel SIGTERM the server if the launcher dies (no orphaned servers).

    prctl is resolved here, in the parent: the child of a threaded process must not take the loader's locks.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _is_error_line(line: str) -> bool:
    """Triton's glog errors (``E1124 19:20:12.45 ...``), less the one every CPU-only start prints."""
    return line[:1] == "E" and line[1:5].isdigit() and "CudaDriverHelper" not in line


def stub_model(pid: int) -> str | None:
    """The model a Triton Python-backend stub serves (from its command line), None for any other process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None  # exited meanwhile
    if len(argv) > 1 and Path(argv[0].decode(errors="replace")).name == STUB_NAME:
        return Path(argv[1].decode(errors="replace")).parent.parent.name  # <repository>/<model>/<version>/model.py
    return None


class TritonServer:
    """One tritonserver process. ``with TritonServer(repo) as server:`` starts it and waits until ready.

    ``http_url`` is a URL (``http://127.0.0.1:8000``); ``http_address`` and ``grpc_url`` are ``host:port``,
    what ``tritonclient.http`` / ``tritonclient.grpc`` take. ``log_file=None`` leaves the server's output on
    this process's stdout/stderr. ``cpus``: run the server and its stubs on these CPUs only, with as many
    OpenMP/torch threads (``OMP_NUM_THREADS``); None: every CPU this process may use.
    """

    def __init__(
        self,
        model_repository: str | Path,
        host: str = DEFAULT_HOST,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_file: str | Path | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        cpus: Sequence[int] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.cpus = frozenset(cpus) if cpus is not None else None
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_file = Path(log_file) if log_file is not None else None
        self.extra_args = tuple(extra_args)
        self.metrics_allowed = _metrics_allowed(self.extra_args)
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._drain_dir = tempfile.TemporaryDirectory(prefix="scalellm-drain-")
        self.drain_file = Path(self._drain_dir.name) / "drain.json"
        self.draining = False
        self._drain_deadline = 0.0
        self._idle_since: float | None = None

    @property
    def http_address(self) -> str:
        return f"{_connect_host(self.host)}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        return f"{_connect_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def command(self, install: TritonInstall, backend_dir: Path | None) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--exit-on-error=true",
        ]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        return cmd + list(self.extra_args)

    def start(self) -> None:
        """Launch the server (returns at once; call wait_ready)."""
        if self.running:
            raise RuntimeError(f"tritonserver already running (pid {self.pid})")
        if not self.model_repository.is_dir():
            raise FileNotFoundError(
                f"model repository {self.model_repository} not found (build one with build_engines.py)"
            )
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if _port_in_use(self.host, port):
                raise OSError(f"port {port} on {self.host} is already in use (another server running?)")
        install = locate_tritonserver()
        cmd = self.command(install, prepare_backend_dir(install))
        output: IO[bytes] | None = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log_file, "wb")  # noqa: SIM115 - the child keeps its own copy of the fd
        in_main_thread = threading.current_thread() is threading.main_thread()
        env = {**server_env(install), DRAIN_FILE_ENV: str(self.drain_file)}
        if self.cpus is not None:
            env["OMP_NUM_THREADS"] = str(len(self.cpus))
        try:
            self._process = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                start_new_session=True,  # own process group: stop() can reap the stubs too
                # PDEATHSIG fires when the *thread* that forked exits, so only arm it from the main thread.
                preexec_fn=_child_setup(self.cpus, in_main_thread),
            )
        finally:
            if output is not None:
                output.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def is_ready(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
        try:
            with opener.open(f"{self.http_url}/v2/health/ready", timeout=2.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics_listening(self) -> bool:
        """Whether the metrics port takes connections (or metrics are off). Triton opens it a moment after HTTP
        reports ready: a router or a scrape that came at once would find it closed."""
        return not self.metrics_allowed or port_open(_connect_host(self.host).strip("[]"), self.metrics_port)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll ``/v2/health/ready`` (and the metrics port); raise ServerNotReady if the server exits first or time
        runs out."""
        if self._process is None:
            raise RuntimeError("tritonserver not started")
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise ServerNotReady(f"tritonserver exited ({code}) before it was ready{self.log_tail()}")
            if self.is_ready() and self.metrics_listening():
                return
            if time.monotonic() > deadline:
                raise ServerNotReady(f"tritonserver not ready after {timeout_s:.0f} s{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The server's error lines (a failed model load scrolls far up) and the last ``lines`` of its log."""
        if self.log_file is None:
            return " (its log is on this process's output above)"
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line[:500] for line in text if _is_error_line(line)][-5:]
        parts = [f"; log {self.log_file}"]
        if errors:
            parts += ["errors:", *errors]
        parts += [f"last {lines} lines:", *text[-lines:]]
        return "\n".join(parts)

    def begin_drain(self, grace_s: float) -> None:
        """Stop admitting; requests in flight get ``grace_s`` to finish, then end with reason "shutdown".

        The server exits once none is left (give it ``--exit-timeout-secs`` beyond ``grace_s``); ``wait``.
        """
        if not self.running:
            return
        self.draining = True
        self._drain_deadline = time.monotonic() + grace_s
        write_drain_file(self.drain_file, grace_s)

    def drained(self, settle_s: float = DRAIN_SETTLE_S) -> bool:
        """After ``begin_drain``: no request left in any engine for ``settle_s`` (their last responses have
        passed postprocessing), or ``settle_s`` past the grace period (everything ended with "shutdown")."""
        now = time.monotonic()
        if now > self._drain_deadline + settle_s:
            return True
        busy = self.engine_requests()
        if busy is None or busy > 0:
            self._idle_since = None
            return False
        self._idle_since = self._idle_since or now
        return now - self._idle_since >= settle_s

    def engine_requests(self) -> float | None:
        """Requests running or waiting in every engine (the llm model's metrics); None if unreadable."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.metrics_url, timeout=2.0) as response:
                lines = response.read().decode().splitlines()
        except (urllib.error.URLError, OSError):
            return None
        names = ("scalellm_requests_running{", "scalellm_requests_waiting{")
        values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(names)]
        return sum(values) if values else None

    def stub_pids(self) -> dict[int, str]:
        """The server's Python-backend stubs: pid -> model instance name (from the stub's command line)."""
        if not self.running:
            return {}
        assert self._process is not None
        stubs = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != self._process.pid:
                    continue
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            model = stub_model(int(entry.name))
            if model is not None:
                stubs[int(entry.name)] = model
        return stubs

    def send_signal(self, signum: int) -> None:
        if self.running:
            assert self._process is not None
            self._process.send_signal(signum)

    def _exited(self, block: bool = False) -> bool:
        """Has the server exited? Leaves it unreaped: its pid (the group id) cannot be reused meanwhile."""
        assert self._process is not None
        flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
        try:
            return os.waitid(os.P_PID, self._process.pid, flags) is not None
        except ChildProcessError:  # already reaped by Popen.poll()
            return True

    def kill_group(self) -> None:
        """SIGKILL whatever is left in the server's process group (e.g. stubs of a server that died hard)."""
        if self._process is not None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _reap(self, settle_s: float = 5.0) -> int:
        """Reap the server, then wait (briefly) until the kernel has reaped the rest of its group too."""
        assert self._process is not None
        code = self._process.wait()
        deadline = time.monotonic() + settle_s
        try:
            while time.monotonic() < deadline:
                os.killpg(self._process.pid, 0)
                time.sleep(0.05)
        except (ProcessLookupError, PermissionError):
            pass
        return code

    def wait(self) -> int:
        """Block until the server exits; kill what is left of its process group; return its exit code."""
        if self._process is None:
            raise RuntimeError("tritonserver not started")
        self._exited(block=True)
        self.kill_group()
        return self._reap()

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (graceful unload), wait ``grace_s``, SIGKILL the process group; return the exit code."""
        if self._process is None:
            return None
        if not self._exited():
            self._process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while not self._exited() and time.monotonic() < deadline:
                time.sleep(0.1)
        self.kill_group()
        code = self._reap()
        self._process = None
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
