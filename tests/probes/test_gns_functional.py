"""The GNS estimators against synthetic problems with a known ḡ and Σ and a group structure.

Each trial draws P groups of G per-sequence gradients γ_i in dimension d; Γ_p is the mean of
its group's γ_i and the step gradient g = mean_p Γ_p. The module is fed Σ_p|Γ_p|², |g|²,
Σ_i|γ_i|², P and G, exactly as the probe feeds it. Two problems:

- "gaussian": γ_i = ḡ + u_p + e_i, u_p ~ N(0, Σ_b) per group, e_i ~ N(0, Σ_w) per sequence
  (full covariances). Cov(Γ_p) = Σ(G) = Σ_b + Σ_w/G.
- "least_squares": sequence loss ½(x_iᵀw − y_i)² at a fixed w, x_i ~ N(0, I_d),
  y_i = x_iᵀ(w* + v_p) + ε_i, v_p ~ N(0, τ²I) shared by the group (its prompt), ε_i ~ N(0, σ²).
  With δ = w − w*, γ_i = x_i x_iᵀ(δ − v_p) − x_i ε_i, so ḡ = δ; given v_p the γ_i are iid with
  covariance (|δ − v_p|² + σ²)I + (δ − v_p)(δ − v_p)ᵀ (Gaussian fourth moments), hence
  tr Σ_w = E_v tr = d(|δ|² + (d+1)τ² + σ²) + |δ|², and Σ(G) = τ²I + Σ_w/G.

Truth: tr Σ = tr Σ(G) (the group is the example), |ḡ|², and tr Σ_w for the within-group scatter.
"""

import math

import pytest
import torch

from probes.functional import gns as F

P, G, D = 8, 4, 20
TRIALS = 20_000  # Monte-Carlo SE of |ḡ̂|² ≈ 0.4% of the truth on least squares (2% ≈ 5 SE)


def _gaussian(n, gen):
    """(γ of n trials, (tr Σ(G), |ḡ|², tr Σ_w)); the parameters come first off `gen`."""
    gbar = torch.randn(D, generator=gen, dtype=torch.float64) * 0.5
    Lb = torch.randn(D, D, generator=gen, dtype=torch.float64) * 0.1
    Lw = torch.randn(D, D, generator=gen, dtype=torch.float64) * 0.3
    tr_b, tr_w = float((Lb**2).sum()), float((Lw**2).sum())  # tr(L Lᵀ)
    truth = (tr_b + tr_w / G, float(gbar @ gbar), tr_w)

    def draw():
        u = torch.randn(n, P, 1, D, generator=gen, dtype=torch.float64) @ Lb.T
        e = torch.randn(n, P, G, D, generator=gen, dtype=torch.float64) @ Lw.T
        return gbar + u + e

    return draw, truth


def _least_squares(n, gen):
    tau, sigma = 0.1, 0.5
    delta = torch.randn(D, generator=gen, dtype=torch.float64) * 0.3
    dd = float(delta @ delta)
    tr_w = D * (dd + (D + 1) * tau**2 + sigma**2) + dd
    truth = (D * tau**2 + tr_w / G, dd, tr_w)

    def draw():
        v = torch.randn(n, P, 1, D, generator=gen, dtype=torch.float64) * tau
        x = torch.randn(n, P, G, D, generator=gen, dtype=torch.float64)
        eps = torch.randn(n, P, G, 1, generator=gen, dtype=torch.float64) * sigma
        return x * ((x * (delta - v)).sum(-1, keepdim=True) - eps)  # ∇ of ½(xᵀw − y)²

    return draw, truth


def _sums(problem, seed, chunk=2_000):
    """Per-trial Σ_p|Γ_p|², |g|², Σ_i|γ_i|², |Γ_1|² (in chunks: bounded memory) and the truth."""
    gen = torch.Generator().manual_seed(seed)
    draw, truth = problem(chunk, gen)
    out = []
    for _ in range(TRIALS // chunk):
        gam = draw()  # (chunk, P, G, D)
        Gam = gam.mean(2)  # (chunk, P, D)
        g = Gam.mean(1)
        out.append(torch.stack([(Gam**2).sum((1, 2)), (g**2).sum(1), (gam**2).sum((1, 2, 3)), (Gam[:, 0] ** 2).sum(1)]))
    return torch.cat(out, 1), truth


def _mean_se(x):
    return float(x.mean()), float(x.std() / math.sqrt(x.numel()))


def _check_unbiased(name, est, truth):
    m, se = _mean_se(est)
    print(f"{name}: truth {truth:.4f} mean {m:.4f} rel {m / truth - 1:+.4f} SE/truth {se / truth:.4f}")
    assert se < 0.005 * truth, "too few trials for a 2% check to mean anything"
    assert abs(m / truth - 1) < 0.02 and abs(m - truth) < 4 * se


@pytest.mark.parametrize("problem", [_gaussian, _least_squares], ids=["gaussian", "least_squares"])
def test_estimators_are_unbiased_and_the_naive_ones_are_not(problem):
    (ssg, sf, ssm, sq1), (tr_true, sig_true, w_true) = _sums(problem, seed=0)
    # The functions are plain arithmetic in their arguments, so tensors broadcast over trials.
    tr, sig = F.noise_and_signal(ssg, sf, P)
    _check_unbiased("tr Σ̂", tr, tr_true)
    _check_unbiased("|ḡ̂|²", sig, sig_true)
    _check_unbiased("s_w", F.within_scatter(ssm, ssg, P, G), w_true)
    # The "can fail" controls: the same data, estimators biased by a known factor (1 − 1/P here).
    # McCandlish's b·(|g_b|² − |g_B|²) with b = 1 group, B = P: E = tr Σ·(1 − b/B).
    # Dropping P/(P − 1): E[(1/P)Σ|Γ_p|² − |g|²] = tr Σ·(P − 1)/P.
    for name, est in (("naive b(|g_b|²-|g_B|²)", sq1 - sf), ("no P/(P-1)", ssg / P - sf)):
        m, se = _mean_se(est)
        print(f"{name}: mean/truth {m / tr_true:.4f} (expected {(P - 1) / P:.4f}), SE/truth {se / tr_true:.4f}")
        assert abs(m / tr_true - 1) > 0.05 and abs(m - tr_true * (P - 1) / P) < 4 * se


def test_degenerate_counts_give_nan():
    assert all(math.isnan(x) for x in F.noise_and_signal(3.0, 1.0, 1))
    assert math.isnan(F.within_scatter(3.0, 1.0, 4, 1))


def test_within_scatter_matches_a_direct_computation():
    gam = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Gam = gam.mean(1, keepdim=True)
    want = float(((gam - Gam) ** 2).sum() / (3 * 4))
    got = F.within_scatter(float((gam**2).sum()), float((Gam**2).sum()), 3, 5)
    assert got == pytest.approx(want, rel=1e-12)


def test_ema_bias_correction_skips_and_round_trip():
    ema = F.Ema(beta=0.95)
    assert math.isnan(ema.mean) and math.isnan(ema.se)
    for step in range(1, 31):  # bias correction: a constant is the mean from the first step on
        ema.update(2.5)
        assert ema.mean == pytest.approx(2.5, rel=1e-12)
        assert math.isnan(ema.se) if step == 1 else ema.se == pytest.approx(0.0, abs=1e-6)  # se needs 2 steps
    before = ema.state_dict()
    for bad in (float("nan"), float("inf"), float("-inf")):
        ema.update(bad)
    assert ema.state_dict() == before
    ema.update(7.0)
    back = F.Ema(beta=0.95)
    back.load_state_dict(ema.state_dict())
    for e in (ema, back):
        e.update(-1.0)
    assert (back.mean, back.se, back.steps) == (ema.mean, ema.se, ema.steps)


def test_ema_se_is_the_spread_of_its_mean_over_independent_runs():
    beta, steps, runs = 0.9, 200, 1_000  # steps ≫ 1/(1 − β) = 10
    x = torch.randn(runs, steps, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 + 3
    means, ses = [], []
    for row in x.tolist():
        ema = F.Ema(beta=beta)
        for v in row:
            ema.update(v)
        means.append(ema.mean)
        ses.append(ema.se)
    sd = float(torch.tensor(means).std())  # ≈ 2·√((1 − β)/(1 + β)) ≈ 0.459; its own SE ≈ 2%
    rms_se = math.sqrt(sum(s * s for s in ses) / runs)
    print(f"EMA: empirical sd of the mean {sd:.4f}, RMS of se {rms_se:.4f}")
    assert rms_se == pytest.approx(sd, rel=0.10)


def test_b_simple_resolved_only_when_the_signal_is_clear():
    assert F.b_simple(5.0, -1.0, 0.1) is None
    assert F.b_simple(5.0, 0.0, 0.0) is None
    assert F.b_simple(5.0, 1.0, 0.6) is None  # 1 ≤ 2·0.6: within noise of 0
    assert F.b_simple(float("nan"), 1.0, 0.1) is None
    assert F.b_simple(5.0, 1.0, 0.4) == pytest.approx(5.0)
    assert F.b_simple(5.0, 2.0, float("nan")) is None  # no SE yet (one step): unresolved
    assert F.b_simple(-3.0, 2.0, 0.1) == 0.0  # a negative noise estimate clamps to 0


def test_generated_prompts_limits():
    # Per generated prompt the gradient is Γ w.p. q, else 0: tr Σ' = q tr Σ + q(1 − q)|ḡ|²,
    # |ḡ'|² = q²|ḡ|², so B' = (B + 1 − q)/q.
    assert F.generated_prompts(37.0, 1.0) == 37.0
    for q in (1e-3, 1e-6):
        assert F.generated_prompts(37.0, q) * q == pytest.approx(38.0, rel=1e-3)
    assert F.generated_prompts(37.0, 0.5) == pytest.approx(75.0)
    assert math.isnan(F.generated_prompts(37.0, 0.0))
