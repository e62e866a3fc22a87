"""Verdicts of the offline experiments (probes/functional/experiments.py) by simulation."""

import math
import random

import pytest

from probes.functional.experiments import paired_linearity, scaling_verdict

BE_VALUES = [16, 32, 64, 128]
SES = [4e-3, 2.8e-3, 2e-3, 1.4e-3]  # SE of a mean shrinks like 1/sqrt(B_E)
N_SIM = 4000


def _alarm_rate(k: float, alpha: float | None = None, seed: int = 0) -> float:
    """Fraction of N_SIM synthetic batch-scaling experiments whose verdict is a 1/B_E trend;
    each experiment's means are drawn normal around c + k/B_E with the stated SEs."""
    rng = random.Random(seed)
    kwargs = {} if alpha is None else {"alpha": alpha}
    alarms = 0
    for _ in range(N_SIM):
        means = [0.01 + k / b + rng.gauss(0.0, s) for b, s in zip(BE_VALUES, SES)]
        alarms += scaling_verdict(BE_VALUES, means, SES, **kwargs)["verdict"] == "1/B_E trend"
    return alarms / N_SIM


def _within_binomial(rate: float, p: float) -> bool:
    """rate within 4 binomial SDs of p (a false failure about once in 16,000 runs)."""
    return abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / N_SIM)


def test_unbiased_estimator_false_alarm_rate_is_the_nominal_level():
    level = scaling_verdict(BE_VALUES, [0.0] * 4, SES)["alpha"]
    rate = _alarm_rate(k=0.0)
    assert _within_binomial(rate, level), (rate, level)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_false_alarm_rate_follows_a_chosen_level(alpha):
    rate = _alarm_rate(k=0.0, alpha=alpha, seed=1)
    assert _within_binomial(rate, alpha), (rate, alpha)


def test_biased_estimator_is_detected():
    # k/16 − k/128 ≈ 7.5 SE of the mean at B_E = 16: a bias a batch-scaling run must see.
    assert _alarm_rate(k=0.5, seed=2) > 0.95


def test_limit_and_k_recovered_with_their_known_standard_errors():
    exact = [0.01 + 0.5 / b for b in BE_VALUES]
    v = scaling_verdict(BE_VALUES, exact, SES)
    assert v["limit"] == pytest.approx(0.01) and v["k"] == pytest.approx(0.5)
    # The SEs come from the stated SEs alone, not from the (here zero) residuals.
    assert v["k_se"] > 0 and v["limit_se"] > 0
    assert v["k_se"] == scaling_verdict(BE_VALUES, [0.0] * 4, SES)["k_se"]


def test_non_positive_standard_error_gives_no_verdict():
    v = scaling_verdict(BE_VALUES, [0.0] * 4, [1e-3, 0.0, 1e-3, 1e-3])
    assert v["verdict"] == "undetermined"


def test_paired_linearity_is_each_repeats_slope_against_its_own_at_the_smallest_lr():
    """ΔH_r(lr) = a_r·lr + b_r·lr² per repeat (the U-batches' slopes differ, even in sign): the
    ratio at each lr is the mean over repeats of (a_r + b_r·lr)/(a_r + b_r·lr_min); a repeat
    whose ΔH at lr_min is within 2 SE of 0 has no ratio, one that misses an lr is left out."""
    lrs = [1e-6, 1e-5, 1e-4]
    ab = [(1.4, 20.0), (-0.3, 500.0), (-0.8, 600.0)]
    raw = [{"lr": lr, "repeat": r, "true": a * lr + b * lr * lr, "true_se": 1e-9} for r, (a, b) in enumerate(ab)
           for lr in lrs]
    raw += [{"lr": 1e-6, "repeat": 3, "true": 1e-9, "true_se": 1e-9}, {"lr": 1e-5, "repeat": 3, "true": 2e-9, "true_se": 1e-9},
            {"lr": 1e-4, "repeat": 3, "true": 3e-9, "true_se": 1e-9}]  # ΔH at lr_min is noise: no ratio
    raw += [{"lr": 1e-6, "repeat": 4, "true": 5.0, "true_se": 0.1}]  # an incomplete repeat
    rows = paired_linearity(raw)
    assert [q["lr"] for q in rows] == lrs and all(q["repeats"] == 4 and q["ratio_repeats"] == 3 for q in rows)
    for q in rows:
        lr = q["lr"]
        want = sum((a + b * lr) / (a + b * lrs[0]) for a, b in ab) / 3
        assert q["ratio"] == pytest.approx(want, rel=1e-12)
        slopes = [a + b * lr for a, b in ab] + [raw[9 + lrs.index(lr)]["true"] / lr]
        assert q["slope"] == pytest.approx(sum(slopes) / 4, rel=1e-12)
    assert rows[0]["ratio"] == 1.0 and rows[0]["ratio_se"] == 0.0
