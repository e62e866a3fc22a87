"""Dr-GRPO (arXiv 2503.20783) as pure functions on tensors.

A_i = r_i − mean of its group (no division by the group's std), and the token sum of the
clipped surrogate divided by a constant N · L_budget (N sequences in the optimizer step,
L_budget = max_new_tokens), so that neither long nor short answers are favoured.

When the sampler's policy differs from the one the loss scores (bf16 or merged generation
weights: ``rollout/logp_mismatch_tok``), the rollouts are off-policy by that rounding and the
gradient is biased towards the sampler. ``sampler_weights`` are the importance weights
π_θk / π_sampler that correct it (truncated or masked, as in TRL's
``vllm_importance_sampling_mode`` and verl's rollout IS; Yao et al. 2025, "truncated
importance sampling"); the loss multiplies each token's term by its weight.
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


SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class SamplerWeights:
    weight: torch.Tensor  # [B, L] detached, 0 on padding
    outside: torch.Tensor  # [B, L] bool: completion tokens whose ratio fell outside [clip_min, clip_max]


def sampler_weights(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, *, mode: str,
                    clip_min: float, clip_max: float) -> SamplerWeights | None:
    """Importance weights of each token's loss term, or None for ``mode="none"``.

    ``logp`` is log π_θk as the trainer scores the tokens, ``sampler_logp`` as the sampler drew
    them. ``token_*``: ρ_t = π_θk(y_t)/π_s(y_t) per token; ``sequence_*``: Π_t ρ_t over the
    completion, on each of its tokens (unbiased for the sequence gradient when nothing is cut,
    at a variance that grows with the length). ``*_truncate`` clamps to [clip_min, clip_max];
    ``*_mask`` zeroes weights outside it.
    """
    assert mode in SAMPLER_CORRECTIONS, f"unknown sampler correction {mode!r}"
    if mode == "none":
        return None
    m = mask.to(logp.device).bool()
    log_ratio = (logp.detach().double() - sampler_logp.to(logp.device).double()) * m
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    ratio = log_ratio.clamp(max=700.0).exp()  # exp overflows float64 past 709
    outside = ((ratio < clip_min) | (ratio > clip_max)) & m
    w = ratio.clamp(clip_min, clip_max) if mode.endswith("truncate") else ratio.masked_fill(outside, 0.0)
    return SamplerWeights(w.masked_fill(~m, 0.0).to(logp.dtype), outside)


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
    token_weight: torch.Tensor | None = None,  # [B, L] detached: sampler importance weights (sampler_weights)
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
    if token_weight is not None:  # the KL estimate is a sample under the sampler too
        per_token = per_token * token_weight
    loss = (per_token * mask).sum() / (num_sequences * l_budget)
    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        clipped_tokens = (is_clipped.to(mask.dtype) * mask).sum()
    return LossTerms(loss=loss, clipped_tokens=clipped_tokens, kl_sum=kl_sum, tokens=mask.sum().detach())
