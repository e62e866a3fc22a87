"""Exact entropy of a real policy whose completions have at most two tokens, and its derivative.

With max_new_tokens = 2 every completion of a prompt is (v1) with v1 a stop token, or (v1, v2):
H_p(θ) = h_1 + Σ_{v1 ∉ A} π_1(v1) h_2(v1), where A are the tokens that stop at the first
position (EOS and tokens holding a whole stop string: ``StopRule.always``; nothing is pending
in an empty prefix). One forward of every prompt with every candidate first token
(``first_two_positions``) gives H_p exactly; autograd gives ∇H_p. In float64 throughout under
``probes.evaluation.Float64Mode`` (HF's RMSNorm and rotary embedding round through float32).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from rl_training.rewards import RewardBreakdown


def has_digit(completion: str, gold) -> RewardBreakdown:
    """1 when the completion contains a digit (a reward a random tiny model sometimes earns)."""
    ok = any(c.isdigit() for c in completion)
    return RewardBreakdown(format_ok=True, answer_ok=ok, parsed=None, reward=float(ok))


def first_two_positions(model, params: dict, prompts: list[list[int]], temperature: float, chunk: int = 160):
    """log π_1 [n, V] at the first completion position and log π_2(· | v1) [n, V, V] for every
    candidate first token v1, differentiable through ``params`` (also forward-mode).

    One forward of a "tree" batch: each row holds a prompt (left-padded) followed by ``chunk``
    of the V candidate first tokens, each at position P_p and attending to the prompt and itself
    only, so the logits give π_1 at the prompt's last token and π_2(· | v1) at every candidate.
    Splitting the candidates over rows of ``chunk`` shrinks the attention to (P + chunk)² per row
    from (P + V)²: at P ≈ 110, V = 772, the value and gradient of H take 2.1 s instead of 3.1 s
    on one CPU thread, and equal the one-row tree's to 2e-15.
    """
    V = model.get_output_embeddings().weight.shape[0]
    n, P = len(prompts), max(len(ids) for ids in prompts)
    chunks = [torch.arange(V)[c: c + chunk] for c in range(0, V, chunk)]
    C = len(chunks[0])
    rows, L = n * len(chunks), P + C
    seq = torch.zeros(rows, L, dtype=torch.long)
    pos = torch.zeros(rows, L, dtype=torch.long)
    allowed = torch.zeros(rows, L, L, dtype=torch.bool)
    allowed[:, torch.arange(L), torch.arange(L)] = True  # padding attends to itself (no empty row)
    for i, ids in enumerate(prompts):
        start = P - len(ids)
        for c, cands in enumerate(chunks):
            r = i * len(chunks) + c
            seq[r, start:P] = torch.tensor(ids)
            seq[r, P: P + len(cands)] = cands
            pos[r, start:P] = torch.arange(len(ids))
            pos[r, P:] = len(ids)
            allowed[r, start:P, start:P] = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
            allowed[r, P: P + len(cands), start:P] = True
    mask = torch.zeros(rows, 1, L, L, dtype=torch.float64).masked_fill(~allowed.unsqueeze(1), float("-inf"))
    out = functional_call(model, params, args=(), kwargs=dict(input_ids=seq, attention_mask=mask, position_ids=pos,
                                                              logits_to_keep=C + 1, use_cache=False), strict=False)
    logp = torch.log_softmax(out.logits.double() / temperature, dim=-1).view(n, len(chunks), C + 1, V)
    return logp[:, 0, 0], logp[:, :, 1:].reshape(n, len(chunks) * C, V)[:, :V]


def pool_entropies(model, params: dict, prompts: list[list[int]], always: torch.Tensor, temperature: float):
    """[n] H_p(θ) of every prompt at LoRA values ``params``, differentiable through them."""
    logp1, logp2 = first_two_positions(model, params, prompts, temperature)
    V = logp1.shape[-1]
    h1 = -(logp1.exp() * logp1).sum(-1)
    h2 = -(logp2.exp() * logp2).sum(-1)  # [n, V]
    cont = torch.ones(V, dtype=torch.float64)
    cont[always] = 0.0
    return h1 + (logp1.exp() * cont * h2).sum(-1)


def pool_entropy_and_derivative(model, theta: dict, delta: dict, prompts: list[list[int]], always, temperature):
    """(H̄(θ), ⟨∇H̄(θ), Δθ⟩) with H̄ the mean over ``prompts``."""
    params = {n: t.detach().double().clone().requires_grad_(True) for n, t in theta.items()}
    H = pool_entropies(model, params, prompts, always, temperature).mean()
    grads = torch.autograd.grad(H, list(params.values()))
    derivative = sum(float((g * delta[name].double()).sum()) for name, g in zip(params, grads))
    return float(H.detach()), derivative


def contribution_moments(model, theta: dict, delta: dict, prompts, always, temperature, baseline: str):
    """Exact mean and sd over y ~ π of the probe's per-sequence δH₁ contribution, per prompt.

    With two tokens (b_2 = 0, V̂_2 = h_2) the contribution depends on v1 only:
    c(v1) = dh_1 − dP_S,1·b_1 + 1[v1 ∉ A]·(dℓ_1(v1)·(h_2(v1) − b_1) + dh_2(v1)), with
    ``baseline`` "zero" (b_1 = 0, what the probe used at its first due step before) or "value"
    (b_1 = E[h_2 | continue], the limit of the leave-one-out value baseline).
    """
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = list(theta)
    primals = tuple(theta[n].double() for n in names)
    tangents = tuple(delta[n].double() for n in names)

    def terms(*values):
        logp1, logp2 = first_two_positions(model, dict(zip(names, values)), prompts, temperature)
        p1 = logp1.exp()
        h1 = -(p1 * logp1).sum(-1)
        h2 = -(logp2.exp() * logp2).sum(-1)
        return {"lp1": logp1, "h1": h1, "h2": h2, "ps1": p1[:, always].sum(-1)}

    with sdpa_kernel([SDPBackend.MATH]):
        prim, tan = jvp(terms, primals, tangents)
    V = prim["lp1"].shape[-1]
    cont = torch.ones(V, dtype=torch.float64)
    cont[always] = 0.0
    p1 = prim["lp1"].exp()
    if baseline == "zero":
        b1 = torch.zeros(len(prompts), 1, dtype=torch.float64)
    else:
        b1 = ((p1 * cont * prim["h2"]).sum(-1) / (p1 * cont).sum(-1)).unsqueeze(1)
    c = (tan["h1"] - tan["ps1"] * b1.squeeze(1)).unsqueeze(1) + cont * (tan["lp1"] * (prim["h2"] - b1) + tan["h2"])
    mean = (p1 * c).sum(-1)
    sd = ((p1 * (c - mean.unsqueeze(1)) ** 2).sum(-1)).sqrt()
    return mean, sd
