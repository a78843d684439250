"""The engine's TensorRT-LLM / TensorRT versions are recorded, and serving it with others is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scalellm.trtllm.versions import (
    VERSIONS_FILE,
    VersionMismatch,
    Versions,
    check_versions,
    engine_dir_of,
    installed_versions,
    record_versions,
)

BUILT = Versions(tensorrt_llm="0.19.0", tensorrt="10.10.0.31")


def test_matching_versions_pass(tmp_path: Path) -> None:
    record_versions(tmp_path, BUILT, extra={"wanted": {"dtype": "bfloat16"}})
    assert json.loads((tmp_path / VERSIONS_FILE).read_text())["wanted"] == {"dtype": "bfloat16"}
    assert check_versions(tmp_path, installed=BUILT) == BUILT


@pytest.mark.parametrize(("installed", "differ"), [
    (Versions("0.20.0", "10.10.0.31"), "TensorRT-LLM differ"),
    (Versions("0.19.0", "10.11.0.33"), "TensorRT differ"),
    (Versions(None, None), "TensorRT-LLM and TensorRT differ"),
])
def test_a_mismatch_says_what_built_it_and_what_to_rebuild(tmp_path: Path, installed: Versions,
                                                           differ: str) -> None:
    record_versions(tmp_path, BUILT)
    with pytest.raises(VersionMismatch) as error:
        check_versions(tmp_path, installed=installed)
    message = str(error.value)
    assert "built with TensorRT-LLM 0.19.0 / TensorRT 10.10.0.31" in message
    assert f"this environment has {installed.describe()} ({differ})" in message
    assert "rebuild the engine here (build_engines.py --backend tensorrt_llm" in message


def test_engine_without_our_record_falls_back_to_the_version_in_its_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"version": "0.18.2", "build_config": {}}))
    with pytest.raises(VersionMismatch, match="built with TensorRT-LLM 0.18.2 / TensorRT unknown"):
        check_versions(tmp_path, installed=BUILT)
    assert check_versions(tmp_path, installed=Versions("0.18.2", "10.9.0.34")).tensorrt is None


def test_a_directory_without_engines_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no TensorRT-LLM engine"):
        check_versions(tmp_path, installed=BUILT)


def test_the_launcher_check_refuses_here_where_no_tensorrt_llm_is_installed(tmp_path: Path) -> None:
    """The command docs/gpu.md runs before tritonserver: exit 1 and the message, on this CPU machine."""
    assert installed_versions().tensorrt_llm is None
    engine = tmp_path / "engine"
    engine.mkdir()
    record_versions(engine, BUILT)
    repo = tmp_path / "model_repository" / "tensorrt_llm"
    repo.mkdir(parents=True)
    (repo / "config.pbtxt").write_text(
        f'parameters: {{ key: "gpt_model_path" value: {{ string_value: "{engine}" }} }}\n')
    assert engine_dir_of(tmp_path / "model_repository") == engine
    for args in ([str(engine)], ["--model-repository", str(tmp_path / "model_repository")]):
        done = subprocess.run([sys.executable, "-m", "scalellm.trtllm.versions", *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1, done
        assert "refusing to serve" in done.stderr and "TensorRT-LLM 0.19.0" in done.stderr


def test_gpu_launcher_picks_mpi_for_several_ranks_and_refuses_a_mismatch(tmp_path: Path) -> None:
    from scalellm.trtllm.serve import LAUNCH_SCRIPT, command, main, world_size

    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"version": "0.19.0",
                                                    "pretrained_config": {"mapping": {"world_size": 4}}}))
    assert world_size(engine) == 4
    assert command(tmp_path, 4, 8000, 8001, 8002, [])[1:3] == [LAUNCH_SCRIPT, "--world_size=4"]
    assert command(tmp_path, 1, 8000, 8001, 8002, ["--log-verbose=1"])[0] == "tritonserver"
    repo = tmp_path / "repo" / "tensorrt_llm"
    repo.mkdir(parents=True)
    (repo / "config.pbtxt").write_text(
        f'parameters: {{ key: "gpt_model_path" value: {{ string_value: "{engine}" }} }}\n')
    assert main(["--model-repository", str(tmp_path / "repo"), "--dry-run"]) == 1  # no TensorRT-LLM here
