"""The δH power-sum formulas against direct per-sequence computations."""

import math

import pytest
import torch

from probes.functional import delta_h as F


def _rand(n, seed, scale=1.0, shift=0.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_sf_estimate_equals_leave_one_out_contributions():
    S, d = _rand(12, 0, 3.0, -20.0), _rand(12, 1)
    n = len(S)
    b = (S.sum() - S) / (n - 1)
    c = -(S - b) * d
    mean, se = F.sf_estimate(F.sf_sums(S, d), n)
    assert mean == pytest.approx(float(c.mean()), rel=1e-12)
    assert se == pytest.approx(float(c.std(unbiased=True) / math.sqrt(n)), rel=1e-9)


def test_sf_estimate_is_additive_over_shards():
    S, d = _rand(10, 2), _rand(10, 3)
    parts = [F.sf_sums(S[:4], d[:4]), F.sf_sums(S[4:], d[4:])]
    merged = {k: parts[0][k] + parts[1][k] for k in F.SF_SUMS}
    assert F.sf_estimate(merged, 10) == pytest.approx(F.sf_estimate(F.sf_sums(S, d), 10), rel=1e-12)


def test_snis_estimate_equals_direct_influence_computation():
    n = 9
    S_old, H_old = _rand(n, 4, 2.0, -30.0), _rand(n, 5, 10.0, 100.0)
    S_new, H_new = S_old + _rand(n, 6, 0.3), H_old + _rand(n, 7, 0.5)
    w = torch.exp(S_new - S_old)
    R = float((w * H_new).sum() / w.sum())
    psi = w * (H_new - R) / w.mean() - (H_old - H_old.mean())
    got = F.snis_estimate(F.snis_sums(S_old, S_new, H_old, H_new), n)
    assert got["true"] == pytest.approx(R - float(H_old.mean()), rel=1e-12)
    assert got["true_se"] == pytest.approx(math.sqrt(float((psi**2).sum()) / (n * (n - 1))), rel=1e-6)
    assert got["ess_frac"] == pytest.approx(float(w.sum() ** 2 / (w**2).sum()) / n, rel=1e-12)


def test_snis_se_small_when_entropies_vary_but_changes_do_not():
    # Large spread of H across sequences, tiny per-sequence change: the SE must follow the
    # change, not the spread (no catastrophic cancellation in the power sums).
    n = 8
    H_old = _rand(n, 8, 20.0, 100.0)
    H_new = H_old + 1e-4
    S = _rand(n, 9, 1.0, -50.0)
    got = F.snis_estimate(F.snis_sums(S, S, H_old, H_new), n)
    assert got["true"] == pytest.approx(1e-4, rel=1e-6)
    assert got["true_se"] < 1e-6


def test_future_entropy_and_rb_surrogate_values():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert F.future_entropy(h, mask).tolist() == [[5.0, 3.0, 0.0, 0.0]]
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], dtype=torch.float64)
    f = F.rb_surrogate(h, logp, mask, baseline=torch.tensor([1.0, 1.0], dtype=torch.float64))
    # Σ h (masked) + Σ (G − b)·logp = 6 + (4·−1 + 2·−2 + 0·−3)
    assert f.item() == pytest.approx(6 - 4 - 4)


def test_mean_se_and_cov_prediction():
    c = _rand(20, 10)
    mean, se = F.mean_se(float(c.sum()), float((c * c).sum()), 20)
    assert mean == pytest.approx(float(c.mean())) and se == pytest.approx(float(c.std() / math.sqrt(20)))
    lp, a = _rand(30, 11), _rand(30, 12)
    cov = float(((lp - lp.mean()) * (a - a.mean())).mean())
    got = F.cov_prediction(1e-3, 30, float(lp.sum()), float(a.sum()), float((lp * a).sum()))
    assert got == pytest.approx(-1e-3 * cov, rel=1e-9)
