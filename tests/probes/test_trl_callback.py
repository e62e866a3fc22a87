"""Our probes inside TRL 1.16's GRPOTrainer (``probes/trl_callback.py``): two real TRL steps.

tiny-random + LoRA, TRL generating (G = 4, two prompts per step, two microbatches of four rows,
so TRL's shuffle spreads every group over both), ``loss_type="dr_grpo"``. The δH, ESS and GNS
keys (and Fisher's) reach TRL's log with finite values, and the ones with an independent reference agree with
it: δH₁ with the measured ΔH of TRL's real update, GNS's |g|² with TRL's own (pre-clipping) grad_norm², ESS's N with the rows of the step, and
GNS's P and q with the groups' advantages TRL computed, Fisher's δH₁ with δH's, and its
training-sequence contributions with δH₁ at TRL's first (clipped) AdamW step.
"""

from __future__ import annotations

import math

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from probes.trl_callback import ProbeCallback  # noqa: E402
from rl_training.errors import ConfigError  # noqa: E402
from rl_training.models import TINY_RANDOM, ModelSpec, apply_lora, load_tokenizer_and_model  # noqa: E402

G, ROWS, ACCUM = 4, 4, 2  # 8 rows = 2 groups per step
TRAIN = ["What is 2 + 3?", "What is 7 - 4?", "What is 6 + 1?", "What is 9 - 8?"]
EVAL = ["What is 1 + 1?", "What is 5 - 2?", "What is 4 + 4?", "What is 8 - 3?"]
PROBES = [
    {"name": "delta_h", "kind": "delta_h", "options": {"batch_size": 4, "completions_per_prompt": 2}},
    {"name": "ess", "kind": "ess"},
    {"name": "gns", "kind": "gns"},
    {"name": "fisher", "kind": "fisher", "options": {"batch_size": 4}},
]


def token_sum_reward(prompts, completions, completion_ids, **kwargs):
    """Varies within every group (distinct sampled ids), so every group has signal."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def make_trainer(tmp_path, **overrides):
    tokenizer, base = load_tokenizer_and_model(ModelSpec(TINY_RANDOM, seed=0))
    model = apply_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    settings = dict(
        output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], bf16=False,
        loss_type="dr_grpo", scale_rewards="none", beta=0.0, max_completion_length=8, num_generations=G,
        per_device_train_batch_size=ROWS, gradient_accumulation_steps=ACCUM, temperature=1.0,
        learning_rate=1e-3, max_grad_norm=1e-3, max_steps=2, logging_steps=1, save_strategy="no", seed=0,
        gradient_checkpointing=False, use_vllm=False,
    )  # fmt: skip
    settings.update(overrides)
    return trl.GRPOTrainer(
        model=model, reward_funcs=token_sum_reward, args=trl.GRPOConfig(**settings), processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"prompt": TRAIN}),
    )  # fmt: skip


def test_probes_log_inside_trl_grpo(tmp_path):
    trainer = make_trainer(tmp_path)
    advantages = []
    generate = trainer._generate_and_score_completions

    def keep_advantages(inputs):  # installed before the callback wraps it: sees TRL's own output
        out = generate(inputs)
        advantages.append(out["advantages"].clone())
        return out

    trainer._generate_and_score_completions = keep_advantages
    ProbeCallback(trainer, PROBES, eval_prompts=EVAL, strict=True)
    trainer.train()

    logs = [row for row in trainer.state.log_history if "probe/gns/g2" in row]
    assert len(logs) == 2 and len(advantages) == 2
    for row, adv in zip(logs, advantages):
        for prefix in ("probe/delta_h/", "probe/ess/", "probe/gns/", "probe/fisher/"):
            keys = [k for k in row if k.startswith(prefix)]
            assert keys, prefix
            assert all(math.isfinite(row[k]) for k in keys), {k: row[k] for k in keys}
        for key in ("pred", "pred_se", "true", "true_se", "H"):
            assert f"probe/delta_h/{key}" in row
        assert row["probe/delta_h/n"] == 4
        # Δθ is TRL's real update: the first-order prediction matches the measured change
        # (measured here: ratio 1.01 at both steps, |pred| = 3.0 and 8.7 true_se).
        assert abs(row["probe/delta_h/pred"]) > 2 * row["probe/delta_h/true_se"]
        assert abs(row["probe/delta_h/pred"] - row["probe/delta_h/true"]) < 3 * row["probe/delta_h/true_se"]
        assert row["probe/ess/sequences"] == ROWS * ACCUM
        # |g|² is read after the last backward, before TRL clips (max_grad_norm is tiny here).
        assert row["probe/gns/g2"] == pytest.approx(row["grad_norm"] ** 2, rel=1e-4)
        # Fisher: the same E-batch and Δθ as δH; at TRL's first AdamW step (no weight decay) the
        # training sequences' contributions, with TRL's clipping factor, add up to δH₁. Fisher's
        # full-vocabulary entropies are float32 (gradients only), δH's float64: 1.4e-5 apart here.
        assert row["probe/fisher/pred"] == pytest.approx(row["probe/delta_h/pred"], rel=1e-4)
        signal = [bool((group != 0).any()) for group in adv.reshape(-1, G)]
        assert row["probe/gns/P"] == sum(signal)
        assert row["probe/gns/q"] == pytest.approx(sum(signal) / len(signal))
    assert logs[0]["probe/fisher/contrib_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert sorted(p.name for p in (tmp_path / "trl" / "fisher").iterdir()) == [
        f"step_{k}{suffix}" for k in (1, 2) for suffix in (".npz", ".png", "_top.json")]


def test_refuses_what_it_cannot_probe(tmp_path):
    with pytest.raises(ConfigError, match="loss_type must be 'dr_grpo'"):
        ProbeCallback(make_trainer(tmp_path, loss_type="grpo"), PROBES, eval_prompts=EVAL)
    with pytest.raises(ConfigError, match="num_iterations = 1"):
        ProbeCallback(make_trainer(tmp_path, num_iterations=2), PROBES, eval_prompts=EVAL)
    with pytest.raises(ConfigError, match="unknown probe kind"):
        ProbeCallback(make_trainer(tmp_path), [{"name": "x", "kind": "nope"}], eval_prompts=EVAL)
