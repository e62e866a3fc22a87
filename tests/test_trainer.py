import json
import math

import torch

from tests.helpers.runs import adapter, run_in_process, train_log


def test_tiny_run_trains_logs_and_saves(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=2")
    for name in ("config.yaml", "summary.json", "logs/train_log.jsonl", "logs/rollouts.jsonl", "final_adapter"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = train_log(run)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("train/loss", "train/entropy", "train/surprisal", "train/clip_frac", "train/kl", "train/grad_norm",
                "train/lr", "rollout/reward_mean", "rollout/pass_rate", "rollout/format_rate",
                "rollout/completion_len_mean", "rollout/completion_len_max", "rollout/groups_rejected_frac",
                "rollout/rounds", "time/step_s", "time/rollout_s", "time/tokens_per_s"):
        assert key in rows[0] and rows[0][key] is not None and math.isfinite(rows[0][key]), key
    # A full-vocabulary entropy of a near-uniform tiny model is close to log(vocab) and positive.
    assert 0 < rows[0]["train/entropy"] <= math.log(1024)
    # The LoRA B matrices start at zero; a step with nonzero advantages moves them.
    assert any(t.abs().sum() > 0 for k, t in adapter(run).items() if "lora_B" in k)
    rollouts = [json.loads(x) for x in (run / "logs" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 8
    assert {"prompt", "completion", "reward", "advantage", "format_ok", "answer_ok"} <= set(rollouts[0])
    # Accepted groups have reward variance, and advantages are r − group mean.
    by_group = {}
    for r in rollouts:
        by_group.setdefault((r["step"], r["group"]), []).append(r)
    for rows_g in by_group.values():
        mean = sum(r["reward"] for r in rows_g) / len(rows_g)
        assert len({r["reward"] for r in rows_g}) > 1
        for r in rows_g:
            assert abs(r["advantage"] - (r["reward"] - mean)) < 1e-6


def test_same_seed_same_run(tmp_path):
    a = adapter(run_in_process(tmp_path / "a", "train.total_steps=1"))
    b = adapter(run_in_process(tmp_path / "b", "train.total_steps=1"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kl_and_ppo_epochs_are_wired(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=2", "train.kl_beta=0.1", "train.ppo_epochs=2", "train.lr=0.05")
    first, second = train_log(run)
    # Step 1 starts at the reference (LoRA B = 0): KL is exactly 0; after a large step it is not.
    assert first["train/kl"] == 0 and second["train/kl"] > 0
    # The second PPO epoch is off-policy after a large step: the clip engages.
    assert first["train/clip_frac"] > 0
