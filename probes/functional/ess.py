"""Kish effective sample size, from sums that reduce across ranks by addition."""

from __future__ import annotations

import torch


def kish_sums(weights: torch.Tensor) -> tuple[float, float]:
    """(Σw, Σw²) of nonnegative weights, in float64."""
    w = weights.detach().double().flatten()
    assert bool((w >= 0).all()), "Kish ESS needs nonnegative weights"
    return float(w.sum()), float((w * w).sum())


def kish_ess(sum_w: float, sum_w2: float) -> float:
    """(Σw)² / Σw²: N for equal weights, 1 when one weight dominates; nan when all are 0."""
    return sum_w * sum_w / sum_w2 if sum_w2 > 0 else float("nan")


def dr_grpo_weights(advantages: torch.Tensor, completion_mask: torch.Tensor,
                    token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """|A_i| · (tokens of i): each sequence's share of the Dr-GRPO loss at ratio 1; with the
    loss's per-token importance weights, |A_i| · Σ_t weight_t over its tokens."""
    per_token = completion_mask.detach().double().cpu()
    if token_weight is not None:
        per_token = per_token * token_weight.detach().double().cpu()
    return advantages.detach().abs().double().cpu() * per_token.sum(dim=1)
