"""Launch tritonserver on a GPU repository, after refusing engines built with other TensorRT(-LLM) versions.

    python -m scalellm.trtllm.serve --model-repository OUTPUT/model_repository [--http-port 8000 ...]

Inside NVIDIA's ``tritonserver:<yy.mm>-trtllm-python-py3`` image. One engine rank: ``tritonserver``; several
(``--tp-size`` > 1): the image's ``/app/scripts/launch_triton_server.py --world_size N`` (MPI "leader mode",
one server process per GPU). The LLM-API route is always one ``tritonserver``: its LLM spawns its own workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scalellm.trtllm.versions import VersionMismatch, check_versions, engine_dir_of

LAUNCH_SCRIPT = "/app/scripts/launch_triton_server.py"  # in the NGC trtllm image


def world_size(engine_dir: Path) -> int:
    """Ranks the engines were built for (config.json written by engine.save: pretrained_config.mapping)."""
    config = json.loads((engine_dir / "config.json").read_text())
    return int(config.get("pretrained_config", {}).get("mapping", {}).get("world_size", 1))


def command(repo: Path, ranks: int, http: int, grpc: int, metrics: int, extra: list[str]) -> list[str]:
    if ranks > 1:
        return [sys.executable, LAUNCH_SCRIPT, f"--world_size={ranks}", f"--model_repo={repo}",
                f"--http_port={http}", f"--grpc_port={grpc}", f"--metrics_port={metrics}", *extra]
    return ["tritonserver", f"--model-repository={repo}", f"--http-port={http}", f"--grpc-port={grpc}",
            f"--metrics-port={metrics}", *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args, extra = parser.parse_known_args(argv)
    repo = args.model_repository.resolve()
    engine_dir = engine_dir_of(repo)
    ranks = 1
    if engine_dir is not None:
        try:
            built = check_versions(engine_dir)
        except (VersionMismatch, FileNotFoundError) as error:
            print(f"[serve] refusing to serve: {error}", file=sys.stderr)
            return 1
        ranks = world_size(engine_dir)
        print(f"[serve] {engine_dir}: {ranks} rank(s), built with {built.describe()}", flush=True)
    cmd = command(repo, ranks, args.http_port, args.grpc_port, args.metrics_port, extra)
    print(f"[serve] {' '.join(cmd)}", flush=True)
    if args.dry_run:
        return 0
    os.execvp(cmd[0], cmd)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
