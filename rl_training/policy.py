"""Log-probabilities and entropies of completions under π_T (logits / T), by one forward.

Everything that scores a completion — the loss, the rollout's old/ref log-probs, the probes —
goes through ``completion_logits`` so that all of them see the same policy: same temperature,
same dtype, same position ids as generation (left padding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenBatch(NamedTuple):
    """Prompts left-padded, completions right-padded; masks are 1 on real tokens."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor

    def rows(self, idx) -> TokenBatch:
        return TokenBatch(*(t[idx] for t in self))


def trim(prompt_ids, prompt_mask, completion_ids, completion_mask) -> TokenBatch:
    """Drop columns that are padding in every row (left of prompts, right of completions)."""
    keep_p = prompt_mask.any(dim=0).nonzero()
    start = int(keep_p[0]) if keep_p.numel() else prompt_mask.shape[1]
    keep_c = completion_mask.any(dim=0).nonzero()
    stop = int(keep_c[-1]) + 1 if keep_c.numel() else 1
    return TokenBatch(prompt_ids[:, start:], prompt_mask[:, start:], completion_ids[:, :stop], completion_mask[:, :stop])


def microbatches(tokens: TokenBatch, size: int):
    """(rows, trimmed TokenBatch) per chunk of ``size`` rows."""
    n = tokens.prompt_ids.shape[0]
    for s in range(0, n, size):
        rows = slice(s, s + size)
        yield rows, trim(*tokens.rows(rows))


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float, forward=None):
    """[B, L, V] logits / T that predict each completion token (only those positions are projected);
    float32 at least.

    ``forward`` replaces ``model(**kwargs)``, e.g. by a functional call at other parameters.
    """
    device = next(model.parameters()).device
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1).to(device)
    attention = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
    # Generation numbers positions from the first real token of each left-padded row.
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    length = completion_ids.shape[1]
    out = (forward or model)(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        logits_to_keep=length + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :]
    # widened before the division: logits / T rounded to bf16 again is a second rounding the
    # sampler (float32 scores, float64 softmax) never makes
    return (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits) / temperature


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target], [B, L] (``completion_logits``: float32 at least)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy of softmax(logits) at each position, [B, L] (``completion_logits``)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@torch.no_grad()
def score(model, tokens: TokenBatch, temperature: float, microbatch_size: int, with_entropy: bool = False):
    """No-grad log-probs (and entropies) [N, L] of whole rollouts, in microbatches."""
    completion_mask = tokens.completion_mask
    n, width = completion_mask.shape
    logp = torch.zeros(n, width)
    ent = torch.zeros(n, width) if with_entropy else None
    for sl, (p, pm, c, cm) in microbatches(tokens, microbatch_size):
        logits = completion_logits(model, p, pm, c, cm, temperature)
        w = c.shape[1]
        logp[sl, :w] = token_logprobs(logits, c).cpu()
        if with_entropy:
            ent[sl, :w] = token_entropy(logits).cpu()
    return logp * completion_mask, (ent * completion_mask if with_entropy else None)
