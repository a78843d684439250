"""``scripts/serve.sh --replicas N``: N tritonservers on free local ports and the router in front of them.

    python -m scalellm.router.launch --model-dir build/smollm2 --replicas 2 [--router-port 9000]
        [--router-grpc-port 9001] [--host 127.0.0.1] [--log-dir build/logs] [router flags...]

The same topology as the ``cpu`` compose profile, as plain processes. The replicas bind 127.0.0.1 only (the
router is the front door); their logs go to ``--log-dir``. Ctrl-C (SIGINT/SIGTERM) stops the router, then the
replicas and their backend stubs.

CPUs: replicas on one host share its cores, and each engine runs as many threads as it sees cores, so N
replicas on all cores would each spin N times too many workers. So each replica gets its own share of the
launcher's CPUs (``--cpu-sets auto``: split evenly, in order) and that many threads, as vLLM's
``VLLM_CPU_OMP_THREADS_BIND`` does for its CPU workers; ``--cpu-sets "0-3|4-7"`` names them, ``off`` leaves every
replica on every core. One replica is not pinned: it has every core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scalellm.serving import DEFAULT_READY_TIMEOUT_S, ServerNotReady, TritonServer, free_ports

from .__main__ import add_router_arguments, config_from_args, warn_if_open
from .app import run_router
from .config import ReplicaAddress

REPLICA_HOST = "127.0.0.1"


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,6"`` -> [0, 1, 2, 3, 6] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise ValueError(f"not a CPU list: {text!r} (e.g. 0-3,6)")
        cpus += range(int(low), int(high or low) + 1)
    return cpus


def cpu_sets(spec: str, count: int, available: Sequence[int]) -> list[list[int]] | None:
    """The CPUs of each of ``count`` replicas (None: no pinning). ``spec``: "auto", "off", or cpulists joined by
    "|" (one per replica, disjoint, each within ``available``)."""
    available = sorted(available)
    if spec == "off" or (spec == "auto" and count == 1):
        return None
    if spec == "auto":
        if count > len(available):
            raise ValueError(f"--replicas {count} on {len(available)} CPUs: each replica needs a core of its own "
                             f"(fewer replicas, or --cpu-sets off to let them share)")
        size, extra = divmod(len(available), count)
        starts = [i * size + min(i, extra) for i in range(count + 1)]
        return [available[starts[i]:starts[i + 1]] for i in range(count)]
    sets = [parse_cpu_list(part) for part in spec.split("|")]
    if len(sets) != count:
        raise ValueError(f"--cpu-sets names {len(sets)} CPU sets for {count} replicas")
    flat = [cpu for cpus in sets for cpu in cpus]
    if len(set(flat)) != len(flat):
        raise ValueError(f"--cpu-sets {spec!r}: the sets overlap")
    if outside := sorted(set(flat) - set(available)):
        raise ValueError(f"--cpu-sets {spec!r}: CPUs {outside} are not available here ({available})")
    return sets


def cpu_list(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


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
    parser.add_argument("--cpu-sets", default="auto",
                        help='CPUs of each replica: auto (split this process\'s CPUs evenly; one replica: all), '
                             'off (every replica on every CPU), or "0-3|4-7" (default %(default)s)')
    add_router_arguments(parser)
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1 (got {args.replicas})")
    try:
        args.cpus = cpu_sets(args.cpu_sets, args.replicas, sorted(os.sched_getaffinity(0)))
    except ValueError as exc:
        parser.error(str(exc))
    if args.grpc_port is None:
        args.grpc_port = args.http_port + 1
    return args


def start_replicas(model_repository: Path, count: int, log_dir: Path,
                   cpus: Sequence[Sequence[int]] | None = None) -> list[TritonServer]:
    servers = []
    for i in range(count):
        http, grpc, metrics = free_ports(3, REPLICA_HOST)
        server = TritonServer(model_repository, host=REPLICA_HOST, http_port=http, grpc_port=grpc,
                              metrics_port=metrics, log_file=log_dir / f"replica-{i}.log",
                              cpus=cpus[i] if cpus is not None else None)
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
              f"  CPUs {cpu_list(s.cpus) if s.cpus is not None else 'all'}" for i, s in enumerate(servers)]
    lines += ["Try:",
              f"  curl -s {base}/v1/chat/completions{key} -H 'Content-Type: application/json' -d '{chat}'",
              f'  .venv/bin/scalellm-client --chatml --url {args.host}:{args.grpc_port} '
              '"What is the capital of France?"']
    return "\n".join(lines)


def spawn(model_dir: Path, replicas: int, http_port: int, grpc_port: int, log_dir: Path,
          router_args: Sequence[str] = (), timeout_s: float = 600.0) -> tuple[subprocess.Popen, list[str]]:
    """This launcher as a child process (what benchmarks and probes run), once READY: the process (SIGINT stops
    it) and the replicas' metrics URLs."""
    cmd = [sys.executable, "-m", "scalellm.router.launch", "--replicas", str(replicas), "--model-dir",
           str(model_dir), "--router-port", str(http_port), "--router-grpc-port", str(grpc_port), "--log-dir",
           str(log_dir), *router_args]
    process = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "SCALELLM_API_KEY": ""})
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not any(line.startswith("READY") for line in lines):
        line = process.stdout.readline()
        if not line or time.monotonic() > deadline:
            process.kill()
            raise ServerNotReady("the launcher did not get ready:\n" + "".join(lines))
        lines.append(line)
    lines += [process.stdout.readline() for _ in range(replicas)]  # the replicas' lines follow READY
    return process, re.findall(r"metrics (http://\S+/metrics)\s+log", "".join(lines))


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
        servers = start_replicas(repository, args.replicas, args.log_dir, args.cpus)
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
