"""Start, health-check and stop a real ``tritonserver`` on a model repository.

    python -m scalellm.serving --model-repository build/smollm2/model_repository [--host 127.0.0.1]
        [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002] [--log-file F] [--log-verbose N]

Where the server comes from: ``$TRITONSERVER``, then ``tritonserver`` on PATH (e.g. an NGC container), then
the one bundled in the ``nvidia-pytriton`` wheel. The wheel's server gets a backend directory
(``build/triton_backends/python/``) holding its Python backend and the stub built for the *running* Python,
and an environment where the stub finds this virtualenv's packages (its ``bin/`` first on PATH) and the
wheel's bundled libraries (libcudart is needed even on CPU).

The server runs in its own session, so stopping it can also reap the ``triton_python_backend_stub`` processes
it spawned: SIGTERM to the server (a graceful unload), then SIGKILL to its whole process group.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

DEFAULT_HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 600.0
STOP_GRACE_S = 45.0  # Triton itself waits up to --exit-timeout-secs (30) for in-flight requests
STUB_NAME = "triton_python_backend_stub"
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1


class ServerNotReady(RuntimeError):
    """tritonserver exited, or did not report ready in time; the message carries the tail of its log."""


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary and, for the pytriton wheel, what its Python backend needs next to it."""

    binary: Path
    python_backend: Path | None = None  # dir with libtriton_python.so + triton_python_backend_utils.py
    stub: Path | None = None  # triton_python_backend_stub built for this Python version
    libs_dir: Path | None = None  # site-packages/nvidia_pytriton.libs


def _pytriton_install() -> TritonInstall | None:
    spec = importlib.util.find_spec("pytriton")  # locate without importing (the import is slow and noisy)
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        binary=binary,
        python_backend=dist / "backends" / "python",
        stub=dist / "python_backend_stubs" / version / STUB_NAME,
        libs_dir=libs if libs.is_dir() else None,
    )


def locate_tritonserver() -> TritonInstall:
    """``$TRITONSERVER``, then PATH, then the nvidia-pytriton wheel."""
    wheel = _pytriton_install()
    explicit = os.environ.get("TRITONSERVER") or shutil.which("tritonserver")
    if explicit:
        binary = Path(explicit).resolve()
        if wheel is not None and binary == wheel.binary.resolve():
            return wheel
        return TritonInstall(binary=binary)  # a full install (e.g. /opt/tritonserver) has its own backends
    if wheel is None:
        raise FileNotFoundError(
            "tritonserver not found: set $TRITONSERVER, put it on PATH, or `pip install nvidia-pytriton`"
        )
    return wheel


def default_backend_root() -> Path:
    """``$SCALELLM_BACKEND_DIR``, else ``build/triton_backends`` in a source checkout, else a cache dir."""
    if env := os.environ.get("SCALELLM_BACKEND_DIR"):
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "build" / "triton_backends"
    return Path.home() / ".cache" / "scalellm" / "triton_backends"


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.is_file():
        s, d = src.stat(), dst.stat()
        if s.st_size == d.st_size and int(s.st_mtime) == int(d.st_mtime):
            return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)  # atomic: a server already running keeps the old inode


def prepare_backend_dir(install: TritonInstall, root: Path | None = None) -> Path | None:
    """Assemble ``root/python/`` for the wheel's server; None for a full install (use its own backends)."""
    if install.python_backend is None or install.stub is None:
        return None
    if not install.stub.is_file():
        raise FileNotFoundError(f"no Python backend stub for Python {sys.version.split()[0]}: {install.stub}")
    root = root or default_backend_root()
    python_dir = root / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy_if_changed(install.python_backend / name, python_dir / name)
    _copy_if_changed(install.stub, python_dir / STUB_NAME)
    return root


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """This virtualenv's bin/ first on PATH (the stub's Python finds our packages) + the wheel's libs."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.prefix) / "bin"), env.get("PATH", "")) if p)
    if install.libs_dir is not None:
        libs = [env.get("LD_LIBRARY_PATH", ""), str(install.libs_dir)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


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


class TritonServer:
    """One tritonserver process. ``with TritonServer(repo) as server:`` starts it and waits until ready.

    ``http_url`` is a URL (``http://127.0.0.1:8000``); ``http_address`` and ``grpc_url`` are ``host:port``,
    what ``tritonclient.http`` / ``tritonclient.grpc`` take. ``log_file=None`` leaves the server's output on
    this process's stdout/stderr.
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
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_file = Path(log_file) if log_file is not None else None
        self.extra_args = tuple(extra_args)
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

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
        try:
            self._process = subprocess.Popen(
                cmd,
                env=server_env(install),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                start_new_session=True,  # own process group: stop() can reap the stubs too
                # PDEATHSIG fires when the *thread* that forked exits, so only arm it from the main thread.
                preexec_fn=_die_with_parent_hook() if in_main_thread else None,
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

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll ``/v2/health/ready``; raise ServerNotReady if the server exits first or time runs out."""
        if self._process is None:
            raise RuntimeError("tritonserver not started")
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise ServerNotReady(f"tritonserver exited ({code}) before it was ready{self.log_tail()}")
            if self.is_ready():
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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m scalellm.serving",
        description="Run tritonserver in the foreground on a model repository built by build_engines.py.",
        epilog="Unrecognised --options are passed to tritonserver as they are (e.g. --log-info=false).",
    )
    parser.add_argument("--model-repository", required=True, type=Path)
    parser.add_argument(
        "--host",
        default=os.environ.get("SCALELLM_HOST", DEFAULT_HOST),
        help="bind HTTP, gRPC and metrics here (env SCALELLM_HOST; default %(default)s)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=_env_int("SCALELLM_HTTP_PORT", 8000),
        help="env SCALELLM_HTTP_PORT; default %(default)s",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=_env_int("SCALELLM_GRPC_PORT", 8001),
        help="env SCALELLM_GRPC_PORT; default %(default)s",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int("SCALELLM_METRICS_PORT", 8002),
        help="env SCALELLM_METRICS_PORT; default %(default)s",
    )
    parser.add_argument("--log-file", type=Path, default=None, help="server log here instead of stdout")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S, help="seconds")
    args, passthrough = parser.parse_known_args(argv)
    stray = [a for a in passthrough if not a.startswith("--")]
    if stray:
        parser.error(f"unexpected arguments: {' '.join(stray)} (tritonserver options must be --name=value)")
    return args, passthrough


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def ready_message(server: TritonServer) -> str:
    client = Path(sys.prefix) / "bin" / "scalellm-client"
    lines = [
        f"READY: Triton serving {_display_path(server.model_repository)} — HTTP {server.http_url}  "
        f"gRPC {server.grpc_url}  metrics {server.metrics_url}",
        "Try:",
        f'  {_display_path(client)} --chatml --url {server.grpc_url} "What is the capital of France?"',
    ]
    if (server.model_repository / "ensemble").is_dir():
        body = '{"text_input": "What is the capital of France?", "max_tokens": 32}'
        url = f"{server.http_url}/v2/models/ensemble/generate"
        lines.append(f"  curl -s -X POST {url} -d {shlex.quote(body)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    server = TritonServer(
        args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        extra_args=[f"--log-verbose={args.log_verbose}", *passthrough],
    )
    signals_seen: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            print(f"[scalellm.serving] {signal.Signals(signum).name}: stopping tritonserver...", flush=True)
            server.send_signal(signum)
        else:  # asked twice: don't wait for the graceful unload
            server.kill_group()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    try:
        server.start()
    except OSError as error:
        print(f"[scalellm.serving] error: {error}", file=sys.stderr)
        return 2
    try:
        server.wait_ready(args.ready_timeout)
        print(ready_message(server), flush=True)
    except ServerNotReady as error:
        if not signals_seen:
            print(f"[scalellm.serving] error: {error}", file=sys.stderr, flush=True)
            server.stop()
            return 1
    code = server.wait()
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
