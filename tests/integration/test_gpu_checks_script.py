"""scripts/gpu_checks.sh, the one device call that measures what the open issues wait for, runs
here on its small shapes (GPU_CHECKS_SHAPE=tiny): every part ends with exit 0 and writes its
JSON, so a device session does not spend its minutes on a broken script."""

import json
import sys

import pytest

from rl_training.models import save_smollm2_tokenizer
from tests.helpers.runs import REPO, run_cmd

pytestmark = pytest.mark.slow
SCRIPT = str(REPO / "scripts" / "gpu_checks.sh")
PARTS = ("nccl", "fisher_cost", "gpu_step", "gpu_vocab", "fisher_cost_qwen", "sketch_rate")


def test_every_part_runs_on_the_cpu_shapes(tmp_path):
    env = {"PYTHON": sys.executable, "GPU_CHECKS_SHAPE": "tiny",
           "GPU_CHECKS_TOKENIZER": str(save_smollm2_tokenizer(tmp_path / "tokenizer"))}
    out = tmp_path / "out"
    proc = run_cmd(["bash", SCRIPT, str(out), "900"], env=env)
    log = (out / "checks.log").read_text()
    for name in PARTS:
        assert f"== {name}: exit 0 after" in log, log[-3000:]
    assert "ok: 2 steps with every collective on a 1-rank gloo group" in log
    assert "TRL --trl" in proc.stdout  # trl imports here: the step is compared with TRL's
    step = json.loads((out / "gpu_step.json").read_text())
    trainers = {"bare", "delta_h", "delta_h_fp32", "gns_ess", "fisher_sketch", "compiled", "float32_logits", "float16"}
    assert step["done"] == "trl" and set(step["steps"]) == trainers
    assert json.loads((out / "gpu_vocab.json").read_text())["vocab"] == 50000
    for name in ("fisher_cost", "fisher_cost_qwen"):
        assert json.loads((out / f"{name}.json").read_text())["kernel_over_plain"] > 0
    assert json.loads((out / "sketch_rate.json").read_text())["counter_over_torch"] > 0


def test_parts_and_budget_choose_what_runs_and_a_missing_tokenizer_is_one_line(tmp_path):
    env = {"PYTHON": sys.executable, "GPU_CHECKS_SHAPE": "tiny", "GPU_CHECKS_TOKENIZER": str(tmp_path / "none")}
    proc = run_cmd(["bash", SCRIPT, str(tmp_path / "a")], env=env, expect=2)
    assert proc.stderr.strip().splitlines() == [f"gpu_checks: tokenizer folder {tmp_path / 'none'} not found "
                                                f"(see this script's header)"]
    env["GPU_CHECKS_TOKENIZER"] = str(tmp_path)  # a folder: the parts below never read it
    run_cmd(["bash", SCRIPT, str(tmp_path / "b"), "35", "gpu_vocab,fisher_cost_qwen"], env=env)
    log = (tmp_path / "b" / "checks.log").read_text()
    assert "== gpu_vocab: skipped" in log and "== fisher_cost_qwen: skipped" in log  # under 30 s left for each
    assert "== nccl" not in log and "== gpu_step" not in log  # not asked for
