"""``scripts/serve.sh --replicas N``: N tritonservers on free local ports and the router in front of them.

    python -m scalellm.router.launch --model-dir build/smollm2 --replicas 2 [--router-port 9000]
        [--router-grpc-port 9001] [--host 127.0.0.1] [--log-dir build/logs] [router flags...]

The same topology as the ``cpu`` compose profile, as plain processes. The replicas bind 127.0.0.1 only (the
router is the front door); their logs go to ``--log-dir``. Ctrl-C (SIGINT/SIGTERM) stops the router, then the
replicas and their backend stubs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from scalellm.serving import DEFAULT_READY_TIMEOUT_S, ServerNotReady, TritonServer, free_ports

from .__main__ import add_router_arguments, config_from_args, warn_if_open
from .app import run_router
from .config import ReplicaAddress

REPLICA_HOST = "127.0.0.1"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/serve.sh --replicas N", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, required=True, help="tritonserver replicas to start")
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("SCALELLM_MODEL_DIR", "build/smollm2")))
    parser.add_argument("--host", default=os.environ.get("SCALELLM_HOST", "127.0.0.1"), help="the router's address")
    parser.add_argument("--router-port", dest="http_port", type=int, default=9000, help="router HTTP port")
    parser.add_argument("--router-grpc-port", dest="grpc_port", type=int, default=None,
                        help="router gRPC port (default: --router-port + 1)")
    parser.add_argument("--log-dir", type=Path, default=Path("build/logs"), help="replica logs go here")
    parser.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S)
    add_router_arguments(parser)
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1 (got {args.replicas})")
    if args.grpc_port is None:
        args.grpc_port = args.http_port + 1
    return args


def start_replicas(model_repository: Path, count: int, log_dir: Path) -> list[TritonServer]:
    servers = []
    for i in range(count):
        http, grpc, metrics = free_ports(3, REPLICA_HOST)
        server = TritonServer(model_repository, host=REPLICA_HOST, http_port=http, grpc_port=grpc,
                              metrics_port=metrics, log_file=log_dir / f"replica-{i}.log")
        server.start()
        servers.append(server)
    return servers


def ready_message(args: argparse.Namespace, servers: list[TritonServer], model: str) -> str:
    base = f"http://{args.host}:{args.http_port}"
    key = ' -H "Authorization: Bearer $SCALELLM_API_KEY"' if args.api_key else ""
    chat = json.dumps({"model": model, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    lines = [f"READY: router HTTP {base}  gRPC {args.host}:{args.grpc_port}  metrics {base}/metrics"
             f"  ->  {len(servers)} replicas:"]
    lines += [f"  replica {i}: HTTP {s.http_url}  gRPC {s.grpc_url}  metrics {s.metrics_url}  log {s.log_file}"
              for i, s in enumerate(servers)]
    lines += ["Try:",
              f"  curl -s {base}/v1/chat/completions{key} -H 'Content-Type: application/json' -d '{chat}'",
              f'  .venv/bin/scalellm-client --chatml --url {args.host}:{args.grpc_port} '
              '"What is the capital of France?"']
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[scalellm.router] %(message)s")
    warn_if_open(args.host, args.api_key)
    repository = args.model_dir / "model_repository"
    if not (repository / "ensemble").is_dir():
        print(f"[launch] error: no model repository at {repository} (build one with build_engines.py)",
              file=sys.stderr)
        return 2
    servers: list[TritonServer] = []
    try:
        servers = start_replicas(repository, args.replicas, args.log_dir)
        print(f"[launch] starting {args.replicas} tritonserver replica(s); logs in {args.log_dir}", flush=True)
        for server in servers:
            server.wait_ready(args.ready_timeout)
        replicas = [ReplicaAddress(REPLICA_HOST, s.http_port, s.grpc_port) for s in servers]
        config = config_from_args(args, replicas)
        model = config.served_model_name or args.model_dir.resolve().name
        asyncio.run(run_router(config, started=lambda: print(ready_message(args, servers, model), flush=True)))
        return 0
    except ServerNotReady as error:
        print(f"[launch] error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
