"""Which TensorRT-LLM and TensorRT built an engine, and refusing to serve it with others.

A TensorRT engine only loads in the exact TensorRT it was built with, and TensorRT-LLM's runtime checks its own
version too; the failure users meet otherwise is a bare "Version tag does not match" deep in the server log.
``build.py`` writes ``VERSIONS_FILE`` next to the engines; the GPU launcher runs this check first:

    python -m scalellm.trtllm.versions --model-repository OUTPUT/model_repository   # or: ENGINE_DIR

exit 0 when the installed versions match, 1 with a message saying what to rebuild (docs/gpu.md, "Serve").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from scalellm.trtllm import PINNED_IMAGE

VERSIONS_FILE = "scalellm_trtllm.json"
ENGINE_CONFIG_FILE = "config.json"  # written by tensorrt_llm's engine.save(); has a top-level "version"
# Distribution names to look up without importing anything (import tensorrt_llm needs CUDA libraries).
DISTRIBUTIONS = {"tensorrt_llm": ("tensorrt_llm", "tensorrt-llm"),
                 "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt_cu12", "tensorrt-cu13")}
GPT_MODEL_PATH = re.compile(r'key:\s*"gpt_model_path"\s*value:\s*{\s*string_value:\s*"([^"]*)"', re.DOTALL)


class VersionMismatch(RuntimeError):
    """The engine was built with other TensorRT-LLM / TensorRT versions than the ones installed here."""


@dataclass(frozen=True)
class Versions:
    tensorrt_llm: str | None
    tensorrt: str | None

    def describe(self) -> str:
        return f"TensorRT-LLM {self.tensorrt_llm or 'unknown'} / TensorRT {self.tensorrt or 'unknown'}"


def installed_versions() -> Versions:
    """The versions installed in this Python environment (None where a package is absent)."""
    found: dict[str, str | None] = {}
    for key, names in DISTRIBUTIONS.items():
        found[key] = None
        for name in names:
            try:
                found[key] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return Versions(**found)


def record_versions(engine_dir: Path, versions: Versions, extra: dict | None = None) -> Path:
    """Write ``engine_dir/VERSIONS_FILE`` (called by the build, after the engines are saved)."""
    path = Path(engine_dir) / VERSIONS_FILE
    payload = {"tensorrt_llm": versions.tensorrt_llm, "tensorrt": versions.tensorrt, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def recorded_versions(engine_dir: Path) -> Versions:
    """What built the engines in ``engine_dir``: our record, else the TensorRT-LLM version in its config.json."""
    engine_dir = Path(engine_dir)
    record = engine_dir / VERSIONS_FILE
    if record.is_file():
        data = json.loads(record.read_text())
        return Versions(tensorrt_llm=data.get("tensorrt_llm"), tensorrt=data.get("tensorrt"))
    config = engine_dir / ENGINE_CONFIG_FILE
    if config.is_file():
        return Versions(tensorrt_llm=json.loads(config.read_text()).get("version"), tensorrt=None)
    raise FileNotFoundError(f"{engine_dir} holds no TensorRT-LLM engine ({VERSIONS_FILE} or {ENGINE_CONFIG_FILE} "
                            "missing): build one with build_engines.py --backend tensorrt_llm")


def check_versions(engine_dir: Path, installed: Versions | None = None) -> Versions:
    """Raise VersionMismatch unless the installed TensorRT-LLM and TensorRT are the ones that built the engine.

    A version the record does not know (an engine built elsewhere) is not compared; one not installed here is
    a mismatch (nothing could load the engine).
    """
    built = recorded_versions(engine_dir)
    installed = installed if installed is not None else installed_versions()
    wrong = [
        name for name, want, have in (("TensorRT-LLM", built.tensorrt_llm, installed.tensorrt_llm),
                                      ("TensorRT", built.tensorrt, installed.tensorrt))
        if want is not None and want != have
    ]
    if wrong:
        raise VersionMismatch(
            f"the engine in {engine_dir} was built with {built.describe()}, but this environment has "
            f"{installed.describe()} ({' and '.join(wrong)} differ). A TensorRT engine only loads in the versions "
            "that built it: rebuild the engine here (build_engines.py --backend tensorrt_llm ... --force, in "
            f"this container), or serve it in an image with {built.describe()} (built for: {PINNED_IMAGE})."
        )
    return built


def engine_dir_of(model_repository: Path) -> Path | None:
    """The engine directory that the rendered ``tensorrt_llm`` model points at (None: no engine model)."""
    config = Path(model_repository) / "tensorrt_llm" / "config.pbtxt"
    if not config.is_file():
        return None
    found = GPT_MODEL_PATH.search(config.read_text())
    return Path(found.group(1)) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Refuse to serve a TensorRT-LLM engine with other versions.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("engine_dir", nargs="?", type=Path, help="directory holding the engines")
    where.add_argument("--model-repository", type=Path, help="a repository rendered by build_engines.py")
    args = parser.parse_args(argv)
    engine_dir = args.engine_dir
    if args.model_repository is not None:
        engine_dir = engine_dir_of(args.model_repository)
        if engine_dir is None:
            print(f"[versions] {args.model_repository}: no TensorRT engine model (LLM API path); nothing to check")
            return 0
    try:
        built = check_versions(engine_dir)
    except (VersionMismatch, FileNotFoundError) as error:
        print(f"[versions] refusing to serve: {error}", file=sys.stderr)
        return 1
    print(f"[versions] {engine_dir}: built with {built.describe()}, matches this environment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
