"""Dr-GRPO (arXiv 2503.20783) as pure functions on tensors.

A_i = r_i − mean of its group (no division by the group's std), and the token sum of the
clipped surrogate divided by a constant N · L_budget (N sequences in the optimizer step,
L_budget = max_new_tokens), so that neither long nor short answers are favoured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [N] laid out group by group -> A [N] = r − group mean."""
    assert rewards.numel() % group_size == 0, "rewards must hold whole groups"
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


def group_has_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N/G] bool: groups whose rewards are not all equal (the others have A ≡ 0)."""
    grouped = rewards.view(-1, group_size)
    return grouped.max(dim=1).values != grouped.min(dim=1).values


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar, already divided by N · L_budget
    clipped_tokens: torch.Tensor  # scalar count of tokens where the clip is active
    kl_sum: torch.Tensor  # Σ over tokens of the k3 KL estimate (0 when no reference)
    tokens: torch.Tensor  # Σ mask


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π || π_ref): exp(d) − d − 1 with d = ref − logp (≥ 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def dr_grpo_loss(
    logp: torch.Tensor,  # [B, L] log π_θ(y_t | ·) at T, with grad
    old_logp: torch.Tensor,  # [B, L] behaviour log-probs (detached)
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, L] 1 on completion tokens
    *,
    num_sequences: float,  # N: sequences in the whole optimizer step (all ranks, all microbatches)
    l_budget: int,  # max_new_tokens
    eps_low: float,
    eps_high: float,
    ref_logp: torch.Tensor | None = None,  # [B, L] reference log-probs, used when kl_beta > 0
    kl_beta: float = 0.0,
) -> LossTerms:
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl_sum = logp.new_zeros(())
    if kl_beta > 0:
        assert ref_logp is not None, "kl_beta > 0 needs reference log-probs"
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_beta * kl
        kl_sum = (kl * mask).sum().detach()
    loss = (per_token * mask).sum() / (num_sequences * l_budget)
    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        clipped_tokens = (is_clipped.to(mask.dtype) * mask).sum()
    return LossTerms(loss=loss, clipped_tokens=clipped_tokens, kl_sum=kl_sum, tokens=mask.sum().detach())
