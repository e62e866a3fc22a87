"""δH in the precision the user trains in: a bf16 base model and small learning rates.

With a bf16 base, the probe evaluates its forwards in float32 by default (probes/evaluation.py):
the update of lr 1e-6 would otherwise be rounded away in the forward at θ_{k+1} while δH₁ sees
it. And every forward of the probe runs in eval mode, so LoRA dropout cannot make Δθ = 0 look
like a change."""

import math

import pytest

from tests.helpers.runs import run_in_process, train_log

SMALL_LR = ("train.total_steps=4", "train.lr=1e-6", "probes.probes=[{name: delta_h, kind: delta_h, options: {batch_size: 16}}]")


def _rows(tmp_path, *overrides):
    return train_log(run_in_process(tmp_path, *overrides))


@pytest.mark.parametrize("extra", [("model.dtype=bfloat16",), ("model.lora.dropout=0.3",),
                                   ("model.dtype=bfloat16", "model.lora.dropout=0.3")])
def test_no_update_measures_exactly_no_change(tmp_path, extra):
    for row in _rows(tmp_path, "train.total_steps=2", "train.lr=0", *extra,
                     "probes.probes=[{name: delta_h, kind: delta_h, options: {batch_size: 8}}]"):
        assert row["probe/delta_h/true"] == 0.0 and row["probe/delta_h/true_se"] == 0.0
        assert row["probe/delta_h/ess_frac"] == 1.0
        assert row["probe/delta_h/pred"] == 0.0
        assert row["probe/delta_h/theta_k_own_forward"] == 0.0  # θ_k's values came from the forward-mode pass


def test_a_device_whose_forward_mode_pass_rounds_differently_still_measures_no_change_exactly(tmp_path, monkeypatch):
    """Where the forward-mode pass's values are not a plain forward's bit for bit (a GPU library
    may pick other kernels), θ_k gets a plain forward of its own, so Δθ = 0 still reads 0."""
    import probes.evaluation as evaluation

    real_jvp = evaluation.jvp

    def off_by_rounding(fn, primals, tangents):
        values, out = real_jvp(fn, primals, tangents)
        return {k: v * (1 + 2**-20) for k, v in values.items()}, out

    monkeypatch.setattr(evaluation, "jvp", off_by_rounding)
    for row in _rows(tmp_path, "train.total_steps=2", "train.lr=0",
                     "probes.probes=[{name: delta_h, kind: delta_h, options: {batch_size: 8}}]"):
        assert row["probe/delta_h/theta_k_own_forward"] == 1.0
        assert row["probe/delta_h/true"] == 0.0 and row["probe/delta_h/pred"] == 0.0


@pytest.fixture(scope="module")
def small_lr_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("precision")
    return {
        "float32": _rows(base / "f32", *SMALL_LR),
        "bfloat16": _rows(base / "bf16", *SMALL_LR, "model.dtype=bfloat16"),
        "bfloat16, probe in bf16": _rows(base / "bf16_model", *SMALL_LR, "model.dtype=bfloat16",
                                         "probes.probes=[{name: delta_h, kind: delta_h, options: {batch_size: 16, precision: model}}]"),
    }


def test_bf16_model_measures_small_lr_changes_like_fp32(small_lr_runs):
    f32, bf16 = small_lr_runs["float32"], small_lr_runs["bfloat16"]
    for a, b in zip(f32[1:], bf16[1:], strict=True):  # steps 2–4 (step 1: Adam's sign-like first step)
        print(f"step {a['step']}: fp32 pred {a['probe/delta_h/pred']:.3g} ± {a['probe/delta_h/pred_se']:.2g} "
              f"true {a['probe/delta_h/true']:.3g} ± {a['probe/delta_h/true_se']:.2g} | bf16 pred "
              f"{b['probe/delta_h/pred']:.3g} ± {b['probe/delta_h/pred_se']:.2g} true {b['probe/delta_h/true']:.3g} "
              f"± {b['probe/delta_h/true_se']:.2g} gap/token {b['probe/delta_h/logp_gap_tok']:.2g}")
        assert b["probe/delta_h/true_se"] < 3 * a["probe/delta_h/true_se"]
        se = math.hypot(b["probe/delta_h/pred_se"], b["probe/delta_h/true_se"])
        assert abs(b["probe/delta_h/pred"] - b["probe/delta_h/true"]) < 2 * se
        assert 0 < b["probe/delta_h/logp_gap_tok"] < 0.1  # the bf16 sampler vs the fp32 evaluation


def test_bf16_probe_forwards_are_rounding_noise_at_small_lr(small_lr_runs):
    """The defect the float32 default removes: in bf16 the measured change is noise far larger
    than the change itself (measured: true_se 100× the float32 one)."""
    f32, bf16 = small_lr_runs["float32"], small_lr_runs["bfloat16, probe in bf16"]
    ratios = [b["probe/delta_h/true_se"] / a["probe/delta_h/true_se"] for a, b in zip(f32[1:], bf16[1:], strict=True)]
    print("true_se bf16 / fp32:", [f"{r:.0f}" for r in ratios])
    assert min(ratios) > 10
