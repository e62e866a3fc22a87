"""scripts/gpu_nccl_check.sh, the GPU check of the forced 1-rank nccl group, runs here through its
CPU fallback (a forced 1-rank gloo group): the forced path is exercised end to end in CI too."""

import sys

import pytest

from tests.helpers.runs import REPO, run_cmd

pytestmark = pytest.mark.slow


def test_gpu_nccl_check_script_cpu_fallback(tmp_path):
    proc = run_cmd(["bash", str(REPO / "scripts" / "gpu_nccl_check.sh"), str(tmp_path)], env={"PYTHON": sys.executable})
    assert "ok: 2 steps with every collective on a 1-rank" in proc.stdout
