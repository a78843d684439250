"""``python -m scalellm.serving``: run tritonserver in the foreground, watch it, drain it on SIGTERM.

    python -m scalellm.serving --model-repository build/smollm2/model_repository [--host 127.0.0.1]
        [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002] [--log-file F] [--log-verbose N]
        [--drain-grace S]

Exit codes: tritonserver's own (0 after a clean drain); 1 if it never became ready; 2 if it could not start;
3 if it turned unhealthy while serving (a backend stub died, or it stopped reporting ready): the launcher
kills it so a supervisor (compose's ``restart:``) starts a fresh one instead of leaving requests hanging.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from scalellm.serving.process import DEFAULT_HOST, DEFAULT_READY_TIMEOUT_S, ServerNotReady, TritonServer
from scalellm.serving.watchdog import Watchdog

DEFAULT_DRAIN_GRACE_S = 30.0
EXIT_TIMEOUT_S = 10  # Triton's --exit-timeout-secs: it gets SIGTERM only once the drain has emptied the engines


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
    parser.add_argument(
        "--drain-grace",
        type=float,
        default=float(os.environ.get("SCALELLM_DRAIN_GRACE_S") or DEFAULT_DRAIN_GRACE_S),
        help="on SIGTERM/SIGINT: seconds requests in flight get to finish before they end with finish reason "
        "'shutdown' (env SCALELLM_DRAIN_GRACE_S; default %(default)s); a second signal kills at once",
    )
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
        f'  {_display_path(client)} --chat --url {server.grpc_url} "What is the capital of France?"',
    ]
    if (server.model_repository / "ensemble").is_dir():
        body = ('{"text_input": "What is the capital of France?", "max_tokens": 32, "apply_chat_template": true, '
                '"exclude_input_in_output": true}')
        url = f"{server.http_url}/v2/models/ensemble/generate"
        lines.append(f"  curl -s -X POST {url} -d {shlex.quote(body)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    exit_timeout = [] if any(a.startswith("--exit-timeout-secs") for a in passthrough) else [
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]
    server = TritonServer(
        args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        extra_args=[f"--log-verbose={args.log_verbose}", *exit_timeout, *passthrough],
    )
    signals_seen: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            print(f"[scalellm.serving] {signal.Signals(signum).name}: draining (grace {args.drain_grace:g} s), "
                  "then stopping tritonserver...", flush=True)
            server.begin_drain(args.drain_grace)
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
    return Watchdog(server).watch()
