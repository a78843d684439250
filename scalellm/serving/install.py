"""Where tritonserver comes from, and what the pytriton wheel's server needs next to it.

``$TRITONSERVER``, then ``tritonserver`` on PATH (e.g. an NGC container), then the one bundled in the
``nvidia-pytriton`` wheel. The wheel's server gets a backend directory (``build/triton_backends/python/``)
holding its Python backend and the stub built for the *running* Python, and an environment where the stub
finds this virtualenv's packages (its ``bin/`` first on PATH) and the wheel's bundled libraries (libcudart is
needed even on CPU).

The server and its stubs run on mimalloc (the ``cmeel-mimalloc`` wheel, through ``LD_PRELOAD``) where it is
installed: Triton's own advice is a malloc other than glibc's (its containers ship tcmalloc and jemalloc for
``LD_PRELOAD``), and per streamed token the server spends a fifth of its CPU in glibc's allocator
(docs/benchmarks.md, "Triton's CPU per streamed token"). ``$SCALELLM_MALLOC`` chooses: ``system`` for glibc's,
or the path of another allocator's shared library.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
MALLOC_ENV = "SCALELLM_MALLOC"


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
    repo = Path(__file__).resolve().parents[2]
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


def _mimalloc() -> Path | None:
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    lib = next((f for f in files if f.name == "libmimalloc.so"), None)
    return Path(lib.locate()).resolve() if lib is not None else None


def locate_malloc(env: dict[str, str] | None = None) -> Path | None:
    """The allocator to preload: ``$SCALELLM_MALLOC`` (a path, or ``system`` for none), else mimalloc if installed."""
    choice = (os.environ if env is None else env).get(MALLOC_ENV, "")
    if choice == "system":
        return None
    if choice:
        path = Path(choice)
        if not path.is_file():
            raise FileNotFoundError(f"${MALLOC_ENV}={choice}: no such file (a malloc's .so, or 'system')")
        return path.resolve()
    return _mimalloc()


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """This virtualenv's bin/ first on PATH (the stub's Python finds our packages), the wheel's libs, the malloc."""
    env = dict(os.environ if base is None else base)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(" ", os.pathsep).split(os.pathsep) if p]
    if (malloc := locate_malloc(env)) is not None and str(malloc) not in preload:
        env["LD_PRELOAD"] = os.pathsep.join([str(malloc), *preload])
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.prefix) / "bin"), env.get("PATH", "")) if p)
    if install.libs_dir is not None:
        libs = [env.get("LD_LIBRARY_PATH", ""), str(install.libs_dir)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env
