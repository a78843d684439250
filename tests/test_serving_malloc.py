"""The server and its stubs run on mimalloc where it is installed; ``$SCALELLM_MALLOC`` chooses another or none."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import RunningServer, model_repository
from reliability_support import processes_using

from scalellm.serving.install import MALLOC_ENV, locate_malloc, locate_tritonserver, server_env


def _preloaded(env: dict[str, str]) -> list[str]:
    return [p for p in env.get("LD_PRELOAD", "").split(":") if p]


def test_mimalloc_is_preloaded_once_and_before_what_was_there() -> None:
    mimalloc = locate_malloc({})
    assert mimalloc is not None and mimalloc.name == "libmimalloc.so", "cmeel-mimalloc is a server dependency"
    install = locate_tritonserver()
    env = server_env(install, {"LD_PRELOAD": "/opt/other.so"})
    assert _preloaded(env) == [str(mimalloc), "/opt/other.so"]
    assert _preloaded(server_env(install, env)) == [str(mimalloc), "/opt/other.so"]  # a nested launch adds nothing


def test_system_malloc_and_another_library_by_path(tmp_path: Path) -> None:
    install = locate_tritonserver()
    assert _preloaded(server_env(install, {MALLOC_ENV: "system"})) == []
    other = tmp_path / "libjemalloc.so.2"
    other.write_bytes(b"")
    assert _preloaded(server_env(install, {MALLOC_ENV: str(other)})) == [str(other.resolve())]
    with pytest.raises(FileNotFoundError, match=rf"\${MALLOC_ENV}=.*missing\.so: no such file"):
        server_env(install, {MALLOC_ENV: str(tmp_path / "missing.so")})


def test_the_server_and_every_stub_run_on_the_chosen_malloc(server: RunningServer) -> None:
    """mimalloc by default; with ``SCALELLM_MALLOC=system`` in the tests' environment, glibc's."""
    chosen = locate_malloc()
    repo = model_repository().resolve()
    pids = processes_using(repo)
    assert len(pids) >= 4, f"tritonserver and its three stubs serve {repo}: {pids}"
    for pid in pids:
        maps = Path(f"/proc/{pid}/maps").read_text()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        if chosen is None:
            assert "libmimalloc" not in maps, f"{name} (pid {pid}) runs on mimalloc despite ${MALLOC_ENV}=system"
        else:
            assert str(chosen) in maps, f"{name} (pid {pid}) does not run on {chosen}"
