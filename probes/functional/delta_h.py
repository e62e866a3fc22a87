"""The math of the δH probe as pure functions on tensors and power sums.

Notation (DESIGN.md): S(y) = Σ_t log π(y_t | x, y_<t) over completion tokens, h_t the
full-vocabulary entropy at position t, H(θ) = E_y[Σ_t h_t] = E_y[−S(y)] (per sequence).

Every estimator is written so that it can be assembled from sums over sequences. The sums
are all-reduced across ranks by the probe manager, so N ranks compute exactly what one
process computes on the same E-batch.
"""

from __future__ import annotations

import math

import torch


# ------------------------------------------------------------------------ per-token pieces


def token_entropy_logprob(logits: torch.Tensor, targets: torch.Tensor, dtype=torch.float64):
    """(h [B, L], log π(y_t) [B, L]) from logits / T [B, L, V], differentiable, in ``dtype``."""
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    return h, logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def future_entropy(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_{t+1} = Σ_{t' > t} h_t' (masked), [B, L]."""
    hm = h * mask
    return hm.flip(-1).cumsum(-1).flip(-1) - hm


def rb_surrogate(h: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Per-sequence Rao–Blackwellised surrogate f_i, [B], whose gradient is unbiased for ∇H:

        ∇E[Σ_t h_t] = E[Σ_t ∇h_t + Σ_t (G_{t+1} − b_t) ∇log π(y_t | y_<t)],

    with b_t (``baseline``, [≥L]) independent of the sampled tokens. The weights G − b are
    detached, so ∇f_i is exactly the bracket for sequence i.
    """
    L = h.shape[1]
    b = torch.zeros(L, dtype=h.dtype, device=h.device)
    n = min(L, baseline.numel())
    b[:n] = baseline[:n].to(h.dtype)
    weight = (future_entropy(h.detach(), mask) - b) * mask
    return (h * mask).sum(-1) + (weight * logp).sum(-1)


# ------------------------------------------------------------------------ estimators from sums


def mean_se(total: float, total_sq: float, n: float) -> tuple[float, float]:
    """Mean and standard error of the mean of iid contributions given Σc, Σc², n."""
    if n < 2:
        return (total / n if n else float("nan")), float("nan")
    mean = total / n
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    return mean, math.sqrt(var / n)


SF_SUMS = ("S", "d", "Sd", "d2", "Sd2", "S2d2")


def sf_sums(S: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
    """Power sums for the score-function estimator; S_i and d_i = ⟨∇S_i, Δθ⟩ per sequence."""
    S, d = S.double(), d.double()
    return {"S": float(S.sum()), "d": float(d.sum()), "Sd": float((S * d).sum()), "d2": float((d * d).sum()),
            "Sd2": float((S * d * d).sum()), "S2d2": float((S * S * d * d).sum())}


def sf_estimate(s: dict[str, float], n: float) -> tuple[float, float]:
    """δH₁ = −(1/n) Σ_i (S_i − b_i) d_i with the leave-one-out baseline b_i = mean_{j≠i} S_j.

    S_i − b_i = n/(n−1)·(S_i − S̄), so the estimate is −Σ(S_i − S̄)d_i/(n−1): an unbiased
    sample covariance, computable from power sums. Its SE treats c_i = −n/(n−1)(S_i − S̄)d_i
    as the contributions (Σc² also from power sums).
    """
    if n < 2:
        return float("nan"), float("nan")
    k = n / (n - 1)
    s_bar = s["S"] / n
    total = -k * (s["Sd"] - s_bar * s["d"])
    total_sq = k * k * (s["S2d2"] - 2 * s_bar * s["Sd2"] + s_bar * s_bar * s["d2"])
    return mean_se(total, total_sq, n)


SNIS_SUMS = ("w", "wHn", "w2", "w2Hn", "w2Hn2", "H", "H2", "wHnH", "wH")


def snis_sums(S_old: torch.Tensor, S_new: torch.Tensor, H_old: torch.Tensor, H_new: torch.Tensor) -> dict[str, float]:
    """Power sums for SNIS ΔH; w_i = exp(S_i(θ') − S_i(θ)), H_i = Σ_t h_t of sequence i."""
    w = torch.exp(S_new.double() - S_old.double())
    Hn, H = H_new.double(), H_old.double()
    return {"w": float(w.sum()), "wHn": float((w * Hn).sum()), "w2": float((w * w).sum()),
            "w2Hn": float((w * w * Hn).sum()), "w2Hn2": float((w * w * Hn * Hn).sum()),
            "H": float(H.sum()), "H2": float((H * H).sum()), "wHnH": float((w * Hn * H).sum()),
            "wH": float((w * H).sum())}


def snis_estimate(s: dict[str, float], n: float) -> dict[str, float]:
    """ΔH_true = Σw H'/Σw − mean H, its delta-method SE, and the Kish ESS/n of w.

    Influence of sequence i: ψ_i = w_i (H'_i − R)/w̄ − (H_i − H̄) with R = Σw H'/Σw;
    SE² = Σψ²/(n(n−1)), expanded into the power sums so that ranks only add.
    """
    if n < 2 or s["w"] <= 0:
        return {"true": float("nan"), "true_se": float("nan"), "ess_frac": float("nan")}
    w_bar, R, H_bar = s["w"] / n, s["wHn"] / s["w"], s["H"] / n
    saa = (s["w2Hn2"] - 2 * R * s["w2Hn"] + R * R * s["w2"]) / (w_bar * w_bar)
    sbb = s["H2"] - n * H_bar * H_bar
    sab = (s["wHnH"] - H_bar * s["wHn"] - R * s["wH"] + R * H_bar * s["w"]) / w_bar
    var = max(saa - 2 * sab + sbb, 0.0) / (n * (n - 1))
    return {"true": R - H_bar, "true_se": math.sqrt(var), "ess_frac": s["w"] * s["w"] / s["w2"] / n}


def cov_prediction(lr: float, n_tok: float, sum_logp: float, sum_adv: float, sum_logp_adv: float) -> float:
    """Cui et al. (2505.22617): ΔH ≈ −η·Cov(log π(y_t), A) over the training batch's tokens."""
    if n_tok < 1:
        return float("nan")
    cov = sum_logp_adv / n_tok - (sum_logp / n_tok) * (sum_adv / n_tok)
    return -lr * cov
