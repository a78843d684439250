"""The parts of the engine build that need no TensorRT-LLM: progress lines and the skip-if-unchanged check."""

from __future__ import annotations

from pathlib import Path

from scalellm.trtllm.build import RankProgress, build_wanted, engines_up_to_date
from scalellm.trtllm.options import TrtllmOptions
from scalellm.trtllm.versions import Versions, record_versions

HF = {"architectures": ["MixtralForCausalLM"], "num_attention_heads": 32, "num_key_value_heads": 8,
      "num_local_experts": 8, "intermediate_size": 14336, "max_position_embeddings": 32768}
SOURCE = {"path": "/models/hf/mixtral", "size": 1, "mtime_ns": 2}


def test_progress_prints_one_line_per_rank_and_stage() -> None:
    lines: list[str] = []
    progress = RankProgress(2, lines.append)
    assert progress.run("convert", 1, lambda: 42) == 42
    progress.run("calibrate", None, lambda: None)
    assert lines[0] == "convert rank 2/2 ..." and lines[1].startswith("convert rank 2/2 done in ")
    assert lines[2] == "calibrate all ranks ..." and "(total " in lines[3]


def test_unchanged_engines_are_not_rebuilt_and_any_change_rebuilds(tmp_path: Path) -> None:
    wanted = build_wanted(TrtllmOptions(tp_size=2), SOURCE, HF)
    assert not engines_up_to_date(tmp_path, wanted)  # nothing built yet
    record_versions(tmp_path, Versions("0.19.0", "10.10.0.31"), extra={"wanted": wanted})
    assert engines_up_to_date(tmp_path, build_wanted(TrtllmOptions(tp_size=2), SOURCE, HF))
    for changed in (build_wanted(TrtllmOptions(tp_size=2, moe_ep_size=2), SOURCE, HF),
                    build_wanted(TrtllmOptions(tp_size=2, quantize="int8"), SOURCE, HF),
                    build_wanted(TrtllmOptions(tp_size=2, max_num_tokens=4096), SOURCE, HF),
                    build_wanted(TrtllmOptions(tp_size=2), SOURCE | {"mtime_ns": 3}, HF)):
        assert not engines_up_to_date(tmp_path, changed)
