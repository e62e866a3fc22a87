"""Our probes inside TRL 1.16's GRPOTrainer (``probes/trl_callback.py``): two real TRL steps.

tiny-random + LoRA, TRL generating (G = 4, two prompts per step, two microbatches of four rows,
so TRL's shuffle spreads every group over both), ``loss_type="dr_grpo"``. The δH, ESS and GNS
keys (and Fisher's) reach TRL's log with finite values, and the ones with an independent reference agree with
it: δH₁ with the measured ΔH of TRL's real update, GNS's |g|² with TRL's own (pre-clipping) grad_norm², ESS's N with the rows of the step, and
GNS's P and q with the groups' advantages TRL computed, Fisher's δH₁ with δH's, and its
training-sequence contributions with δH₁ at TRL's first (clipped) AdamW step. On two processes
(torchrun) the reduced values equal one process's on the same generation batch.
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from probes.trl_callback import ProbeCallback, is_correction_warning  # noqa: E402
from rl_training.errors import ConfigError  # noqa: E402
from tests.helpers.runs import REPO, free_port, run_cmd  # noqa: E402
from tests.helpers.trl_grpo import EVAL, G, PROBES, TRAIN, make_trainer, train_keyed  # noqa: E402

ROWS, ACCUM = 4, 2  # 8 rows = 2 groups per step


def test_probes_log_inside_trl_grpo(tmp_path):
    trainer = make_trainer(tmp_path / "trl", rows=ROWS, accum=ACCUM)
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


@pytest.mark.parametrize("reentrant", [True, False])
def test_with_trls_default_gradient_checkpointing_every_probe_logs_what_it_logs_without(tmp_path, monkeypatch,
                                                                                      reentrant):
    """TRL turns gradient checkpointing on by default, and with it a hook that makes the
    embeddings' output require a gradient (which the δH probe's forward-mode pass refused):
    on the same keyed completions every probe value equals the run without checkpointing."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"

    def logs(out, **checkpointing):
        trainer = make_trainer(out, rows=ROWS, accum=ACCUM, keyed=True, train=TRAIN, **checkpointing)
        ProbeCallback(trainer, PROBES, eval_prompts=EVAL, strict=True)
        trainer.train()
        return [{k: v for k, v in row.items() if k.startswith("probe/") and "time" not in k}
                for row in trainer.state.log_history if "probe/gns/g2" in row]

    plain = logs(tmp_path / "plain", gradient_checkpointing=False)
    checkpointed = logs(tmp_path / "checkpointed", gradient_checkpointing=True,
                        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert len(plain) == 2 and len(plain[0]) > 70
    assert checkpointed == plain


def test_with_trls_default_bf16_autocast_the_probes_still_evaluate_in_float32(tmp_path, monkeypatch):
    """TRL's bf16=True (its default) has accelerate wrap the model's forward in bf16 autocast; the
    probes must set it aside, or δH's measured change reads bf16 rounding: with it set aside
    δH₁ meets the measured ΔH within 2 % of an SE at both steps (measured 0.5 and 0.8 %, as in
    float32; with the wrapper 0.6 and 2.3 SE off). GNS's |g|² is the autocast gradient TRL clips,
    and δH's logp_gap_tok measures the autocast forward against the probe's."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"
    trainer = make_trainer(tmp_path / "trl", rows=ROWS, accum=ACCUM, keyed=True, train=TRAIN, bf16=True)
    ProbeCallback(trainer, PROBES, eval_prompts=EVAL, strict=True)
    trainer.train()
    logs = [row for row in trainer.state.log_history if "probe/gns/g2" in row]
    assert len(logs) == 2
    for row in logs:
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("probe/"))
        assert abs(row["probe/delta_h/pred"] - row["probe/delta_h/true"]) < 0.02 * row["probe/delta_h/true_se"]
        assert row["probe/gns/g2"] == pytest.approx(row["grad_norm"] ** 2, rel=1e-4)
        # how far TRL's autocast forward is from the probe's float32 one (measured 6e-4 nats a token)
        assert 1e-5 < row["probe/delta_h/logp_gap_tok"] < 1e-2


def test_refuses_what_it_cannot_probe(tmp_path):
    with pytest.raises(ConfigError, match="loss_type must be 'dr_grpo'"):
        ProbeCallback(make_trainer(tmp_path / "trl", loss_type="grpo"), PROBES, eval_prompts=EVAL)
    with pytest.raises(ConfigError, match="num_iterations = 1"):
        ProbeCallback(make_trainer(tmp_path / "trl", num_iterations=2), PROBES, eval_prompts=EVAL)
    for changed in ({"top_entropy_quantile": 0.2}, {"entropy_coef": 0.01}):
        with pytest.raises(ConfigError, match=f"{next(iter(changed))}=.* changes it"):
            ProbeCallback(make_trainer(tmp_path / "trl", **changed), PROBES, eval_prompts=EVAL)
    fp16 = types.SimpleNamespace(**{**vars(make_trainer(tmp_path / "trl").args), "fp16": True})
    with pytest.raises(ConfigError, match="fp16=True .* is not supported; use bf16=True"):
        ProbeCallback._check(fp16)
    with pytest.raises(ConfigError, match="unknown probe kind"):
        ProbeCallback(make_trainer(tmp_path / "trl"), [{"name": "x", "kind": "nope"}], eval_prompts=EVAL)


def test_vllm_importance_sampling_correction_is_named_where_it_changes_a_figure():
    """TRL's vLLM runs weight each token's loss by π_θ/π_vLLM (its default): the figures that take
    Dr-GRPO's weights are named; δH₁, ΔH and GNS read the real update and are not."""
    args = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                 vllm_importance_sampling_mode="sequence_mask")
    msg = is_correction_warning(args, PROBES)
    assert msg and "sequence_mask" in msg and "ess's the loss-weight ESS" in msg and "fisher's the c_j" in msg
    assert "delta_h's cov_pred" in msg
    assert is_correction_warning(args, [{"name": "gns", "kind": "gns"}]) is None
    for off in ({"use_vllm": False}, {"vllm_importance_sampling_correction": False}):
        assert is_correction_warning(types.SimpleNamespace(**{**vars(args), **off}), PROBES) is None


def test_a_resumed_run_continues_the_probes_state(tmp_path, monkeypatch, caplog):
    """TRL's checkpoints carry the probes' state (``on_save``), and a run resumed from one goes on
    with it: at step 3 the GNS EMAs equal the uninterrupted run's (keyed completions: both runs
    train on the same data). Restarted EMAs would equal step 3's raw values instead."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")

    def run(out, resume=None):
        trainer = make_trainer(out, rows=ROWS, accum=ACCUM, keyed=True, train=TRAIN, max_steps=3,
                               save_strategy="steps", save_steps=1)
        ProbeCallback(trainer, [{"name": "gns", "kind": "gns"}], strict=True)
        trainer.train(resume_from_checkpoint=resume)
        return [row for row in trainer.state.log_history if "probe/gns/g2" in row][-1]

    whole = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "probe_state.pt").is_file() and not list(checkpoint.glob("*.tmp"))
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    assert whole["step"] == resumed["step"] == 3
    assert whole["probe/gns/trS_ema"] != pytest.approx(whole["probe/gns/trS"], rel=1e-3), "the EMA has history"
    for key in ("trS_ema", "g2_ema", "g2_ema_se", "s_w_ema"):
        assert resumed[f"probe/gns/{key}"] == pytest.approx(whole[f"probe/gns/{key}"], rel=1e-5), key
    (tmp_path / "whole" / "checkpoint-1" / "probe_state.pt").unlink()  # as from a run without the callback
    run(tmp_path / "fresh", resume=str(tmp_path / "whole" / "checkpoint-1"))
    assert "has no probe_state.pt; the probes start afresh" in caplog.text


SNIS = ("/true", "/true_se", "/true_df", "/true_tok", "/ratio", "/cov_pred")  # amplify θ_{k+1}'s fp32 rounding


@pytest.mark.slow
@pytest.mark.ports
def test_two_processes_log_what_one_process_logs_on_the_same_generation_batch(tmp_path, monkeypatch):
    """TRL on two processes (torchrun, gloo, DDP) against one, on the same global generation batch
    (``keyed_rollout``; TRL deals it out in rank order and gathers it back): the probes reduce over
    accelerate's process group to the one-process values, both processes log the same ones, and
    the Fisher contributions stay exact across processes (their sum is δH₁ at Adam's first step)."""
    two = tmp_path / "two"
    two.mkdir()
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             str(REPO / "tests" / "helpers" / "trl_grpo.py"), str(two), str(ROWS), str(ACCUM)])
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    one = train_keyed(tmp_path / "one", rows=2 * ROWS, accum=ACCUM)  # the same 16 rows a step
    logs = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    timeless = [[{k: v for k, v in row.items() if "time" not in k} for row in log] for log in logs]
    assert timeless[0] == timeless[1], "every process logs the reduced values"
    assert len(logs[0]) == len(one["logs"]) == 2
    for step, (a, b) in enumerate(zip(logs[0], one["logs"]), start=1):
        keys = [k for k in b if k.startswith("probe/") and "/time" not in k and not k.startswith("probe/fisher/")]
        assert {k for k in a if k in keys} == set(keys)
        for key in keys:
            if key.endswith("/sampler_gap_tok"):  # fp32 rounding of the decode, which batch composition changes
                assert 0 <= a[key] < 1e-5, key
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-3 if key.endswith(SNIS) else 1e-5, abs=1e-12), (step, key)
        assert a["probe/gns/g2"] == pytest.approx(a["grad_norm"] ** 2, rel=1e-4)
        assert a["probe/ess/sequences"] == 16 and a["probe/gns/P"] == 4
        assert a["probe/fisher/exact_frac"] == 0.5 and b["probe/fisher/exact_frac"] == 1.0
        assert (a["probe/fisher/n_E"], a["probe/fisher/n_U"]) == (b["probe/fisher/n_E"], b["probe/fisher/n_U"])
    assert logs[0][0]["probe/fisher/contrib_ratio"] == pytest.approx(1.0, abs=1e-4)
    lora = torch.load(two / "rank0.pt")
    # Adam divides by √v̂ + ε, so an element whose gradients nearly cancel over the two steps
    # amplifies the float32 rounding of another summation order (DDP's, and the CPU's ISA: on an
    # AVX-512 machine one element of 128 differed by 2e-4 of the largest, 2e-5 of the tensor's
    # norm). Other data or a wrong reduction would move every element by its own size.
    for name, p in one["lora"].items():
        assert float((lora[name] - p).norm()) <= 1e-4 * float(p.norm()), name
        torch.testing.assert_close(lora[name], p, rtol=0, atol=1e-3 * float(p.abs().max()))
