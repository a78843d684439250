"""``python -m scalellm.router --replica HOST:HTTP_PORT:GRPC_PORT [...] | --replica-dns NAME:HTTP_PORT:GRPC_PORT``:
run the router in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .app import run_router
from .config import DEFAULT_MAX_TOKENS, POLICIES, ReplicaAddress, RouterConfig


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's own flags (shared with the launcher)."""
    parser.add_argument("--policy", choices=POLICIES, default="least-tokens",
                        help="least outstanding tokens, or prefix-aware (default %(default)s)")
    parser.add_argument("--prefix-match-ratio", type=float, default=0.5,
                        help="prefix policy: follow a cached prefix covering at least this share of the prompt")
    parser.add_argument("--prefix-balance-tokens", type=int, default=4096,
                        help="prefix policy: ...unless that replica has this many more outstanding tokens")
    parser.add_argument("--api-key", default=os.environ.get("SCALELLM_API_KEY"),
                        help="require Authorization: Bearer KEY (env SCALELLM_API_KEY); needed whenever the "
                             "router binds beyond 127.0.0.1")
    parser.add_argument("--served-model-name", help="the OpenAI model name (default: the model dir's name)")
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="OpenAI max_tokens when a request leaves it out (default %(default)s: the ensemble's "
                             "own default, scalellm/triton/contract.py)")
    parser.add_argument("--health-interval", type=float, default=1.0, help="seconds between health checks")
    parser.add_argument("--dns-interval", type=float, default=5.0,
                        help="seconds between lookups of the --replica-dns names (default %(default)s)")
    defaults = RouterConfig(replicas=(ReplicaAddress("-", 0, 0),))
    overload = parser.add_argument_group("overload (docs/reliability.md)")
    overload.add_argument("--replica-slots", type=int, default=defaults.replica_slots,
                          help="requests in flight at one replica at most; 0 (default): its llm model's "
                               "max_num_seqs x instances, read from the replica")
    overload.add_argument("--queue-size", type=int, default=defaults.queue_size,
                          help="requests waiting in the router for room, at most; past it: 429/503 at once "
                               "(default %(default)s)")
    overload.add_argument("--queue-timeout", type=float, default=defaults.queue_timeout_s,
                          help="seconds a request waits for room before it gets 429/503 (default %(default)s)")
    overload.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                          help="seconds from arrival after which a request is stopped and ended (default "
                               "%(default)s)")
    overload.add_argument("--max-attempts", type=int, default=defaults.max_attempts,
                          help="tries per request on replicas that answer busy (default %(default)s)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scalellm.router", description=__doc__)
    parser.add_argument("--replica", action="append", default=[], type=ReplicaAddress.parse,
                        help="a Triton replica as HOST:HTTP_PORT:GRPC_PORT (repeat for each)")
    parser.add_argument("--replica-dns", action="append", default=[], type=ReplicaAddress.parse,
                        metavar="NAME:HTTP_PORT:GRPC_PORT",
                        help="every address NAME resolves to is a replica serving these ports (a Kubernetes "
                             "headless Service); looked up again every --dns-interval seconds")
    parser.add_argument("--model-dir", type=Path, help="the model's build_engines.py output (for the OpenAI API)")
    parser.add_argument("--host", default=os.environ.get("SCALELLM_ROUTER_HOST", "127.0.0.1"))
    parser.add_argument("--http-port", type=int, default=9000)
    parser.add_argument("--grpc-port", type=int, default=9001, help="0: no gRPC")
    add_router_arguments(parser)
    args = parser.parse_args(argv)
    if not args.replica and not args.replica_dns:
        parser.error("give the replicas: --replica HOST:HTTP_PORT:GRPC_PORT or --replica-dns NAME:HTTP_PORT:GRPC_PORT")
    return args


def config_from_args(args: argparse.Namespace, replicas: Sequence[ReplicaAddress],
                     replica_dns: Sequence[ReplicaAddress] = ()) -> RouterConfig:
    return RouterConfig(
        replicas=tuple(replicas), replica_dns=tuple(replica_dns), dns_interval_s=args.dns_interval,
        host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        policy=args.policy, prefix_match_ratio=args.prefix_match_ratio,
        prefix_balance_tokens=args.prefix_balance_tokens, health_interval_s=args.health_interval,
        model_dir=args.model_dir, served_model_name=args.served_model_name, api_key=args.api_key or None,
        default_max_tokens=args.default_max_tokens, replica_slots=args.replica_slots, queue_size=args.queue_size,
        queue_timeout_s=args.queue_timeout, request_timeout_s=args.request_timeout,
        max_attempts=args.max_attempts)


def warn_if_open(host: str, api_key: str | None) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.getLogger("scalellm.router").warning(
            "binding %s without --api-key: anyone who can reach this port can use the model", host)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[scalellm.router] %(message)s")
    warn_if_open(args.host, args.api_key)
    config = config_from_args(args, args.replica, args.replica_dns)
    asyncio.run(run_router(config, started=lambda: print("ROUTER READY", flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
