"""Verdicts of the offline experiments (probes/functional/experiments.py) by simulation."""

import math
import random

import pytest

from probes.functional.experiments import scaling_verdict

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
