"""The invariance and accuracy tests (marked ``isa_path``) again under every lower instruction-set path this CPU
has: our kernels' level (``SCALELLM_ISA``, scalellm/models/cpu.py) with torch's own kernels taken down the same
path (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``). Each path runs in a new process, since torch reads those
variables once when it starts. The CPU's best path is the rest of the suite itself; a path the CPU lacks is
reported as skipped ("not run"), never passed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from scalellm.models import cpu

# (our level, ATen's capability, oneDNN's ISA cap): one path each, best first
PATHS = {
    "amx": ("amx", "avx512", "AVX512_CORE_AMX"),
    "avx512_bf16": ("avx512_bf16", "avx512", "AVX512_CORE_BF16"),
    "avx512": ("avx512", "avx512", "AVX512_CORE_VNNI"),
    "avx2": ("avx2", "avx2", "AVX2"),
    "avx2-aten-default": ("avx2", "default", "AVX2"),  # ATen's scalar kernels around ours
}


@pytest.mark.parametrize("path", list(PATHS))
def test_invariance_and_accuracy_hold_on_every_instruction_set_path(path):
    level, aten, onednn = PATHS[path]
    if cpu.missing_flags(level):
        pytest.skip(f"not run: this CPU lacks {', '.join(cpu.missing_flags(level))} for the {level} path")
    if path == cpu.supported_levels()[0] and "SCALELLM_ISA" not in os.environ:
        pytest.skip(f"{path} is this CPU's best path: the rest of the suite runs the isa_path tests there")
    env = {**os.environ, "SCALELLM_ISA": level, "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "isa_path", "-p", "no:cacheprovider",
                          "tests/test_kernels.py", "tests/test_weight_formats.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(f"{path}: {summary}")
    assert run.returncode == 0, f"{path} path ({env['SCALELLM_ISA']}, ATen {aten}, oneDNN {onednn}):\n" + \
        run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in summary
