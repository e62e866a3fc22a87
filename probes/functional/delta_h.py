"""The math of the δH probe: pure functions on per-token tables of an E-batch.

Notation (DESIGN.md): a completion y = (y_1, ..., y_τ) ends at a stop token or at the length
budget L; h_t is the full-vocabulary entropy of π_t = π(· | x, y_<t) (temperature included),
ℓ_t = log π_t(y_t), s_t the set of tokens that would end the completion at t
(rl_training/stops.py), P_S,t = Σ_{v∈s_t} π_t(v) and P_C,t = 1 − P_S,t. H(θ) = E[Σ_t h_t] per
sequence (= E[−Σ_t ℓ_t]).

Per sequence i and position t the probe measures (``TokenTable``): the mask, c_t = 1[y_t ∉ s_t],
h_t, ℓ_t, P_S,t at θ_k and at θ_{k+1} = θ_k + Δθ, and their derivatives along Δθ (dh_t, dℓ_t,
dP_S,t, by forward-mode AD). Every estimator is a function of that table.

Stop-aware value estimate (the derivation behind ``pred`` and ``true``)
-----------------------------------------------------------------------
H is the value of the empty prefix under the recursion V_t = h_t + Σ_{v∉s_t} π_t(v) V_{t+1}(y_<t, v):
a stop token has no future. Along a sampled sequence, with a baseline b_t that does not depend
on y_t or on any later token of the same sequence, the doubly robust estimate

    V̂_t = h_t + c_t (V̂_{t+1} − b_t) + P_C,t b_t            (V̂ past the last token = 0)

is unbiased for V_t: E_{y_t}[c_t (V̂_{t+1} − b_t)] = Σ_{v∉s_t} π_t(v) V_{t+1}(v) − P_C,t b_t.
The stop decision enters through P_C,t b_t at EVERY position of every sequence, so a change of
the stopping probability is seen whether or not the E-batch happens to contain a stop. Without
the split (s_t = ∅) the same information is carried only by sampled stops (a term −b_t on the
rare sequence that stops), and a batch without one reports a small SE around the wrong value.

At θ' on the same samples, with ρ_t = π'_t(y_t)/π_t(y_t) (importance sampling per decision):

    V̂'_t = h'_t + c_t ρ_t (V̂'_{t+1} − b_t) + P'_C,t b_t   is unbiased for V'_t,

and ΔH_true = mean_i (V̂'_0 − V̂_0) (``true``): exactly 0 when Δθ = 0. Its derivative at θ along
Δθ is the first-order prediction δH₁ = ⟨∇H, Δθ⟩ (``pred``, Rao–Blackwellised: ∇h_t enters
exactly, the score only through the continue branch):

    c_i = Σ_t [dh_t + c_t dℓ_t (V̂_{t+1} − b_t) − dP_S,t b_t],

so ``pred`` is exactly the first-order term of ``true`` (tested). −Σ_t dP_S,t b_t is the part of
δH₁ due to stopping probabilities (``pred_stop``): the change of P_S times the entropy a
stopped completion no longer has. Stop strings of several tokens are seen this way only at
their last token (where P_S is near 1 and barely moves): their decision is an ordinary token
whose variance the SE carries; the probe counts such endings (``stops_multi``).

An E-batch drawn by another sampler q (bf16 or LoRA-merged decoding, a compiled graph) is a
sample of q, not of the evaluated π_θk. The same recursion with ρ_t = π_t(y_t)/q_t(y_t) is
unbiased for V_t under y ~ q (per-decision importance sampling: only the continue branch is
sampled, the stop branch enters through P_C,t b_t), and its derivative weights position t's
terms by W_t = Π_{s<t} ρ_s (``sampler_weights``). With q = π_θk every ρ is 1 and nothing changes;
at bf16's gap on tiny-random (6e-4 nats per token) the sequence weights' ESS is 0.99999 of B_E,
and a gap of 0.02 nats per token, uncorrected, moves δH₁ by 40-50 % in the exact tests.

Baseline: b_t estimates the expected future entropy after continuing at t from the OTHER
sequences of the E-batch (leave-one-out per-position means of h and P_S, ``value_baseline``). It
never uses sequence i's own tokens (unbiased), exists at every due step including the first,
uses stopping probabilities rather than sampled stops, and makes the contributions only weakly
(O(1/n)) dependent.

Estimators blind to the stop decision — the same recursion with s_t = ∅, the score-function
estimator −E[(S − b) dS] over whole sequences, or self-normalised importance sampling of ΔH
(which cancels a common factor P'_C/P_C of the sequences that go on) — are unbiased too, but
carry the stop term only on sampled stops: with stopping probabilities of 0.4–0.8 % per
position their 95 % intervals covered 54–75 % (the recursion with s_t = ∅) and 70–78 % (score
function) in the exact tests, against 94–95 % for these (tests/probes/test_delta_h_exact.py).
The probe therefore logs only these.

Design and standard errors
--------------------------
The E-batch estimates the mean over the probe's prompt pool (N prompts, equal weight): each due
step draws n prompts without replacement and k_p completions of each. The estimate of any
per-sequence quantity x is mean_p x̄_p, with the two-stage variance (Cochran 1977, §10.8/11.3,
completions from an infinite population):

    Var ≈ (1 − f) s_b² / n + f s_w² Σ_p (1/k_p) / n²,        f = n / N,

s_b² the sample variance of the prompt means x̄_p, s_w² the pooled within-prompt variance. With
every prompt in the batch (f = 1) only the within term remains (stratified); with few prompts of
a large pool the between term dominates. So a prompt that carries most of δH₁ is either always
in the batch or its absence is part of the SE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from probes.functional.ess import kish_ess, kish_sums

NEG_INF = float("-inf")


# ------------------------------------------------------------------------ per-token pieces


# Elements of a [positions, V] chunk in ``token_terms``. Under the forward-mode pass it holds
# ten such float64 tensors at once (primals and tangents; measured), so one pass over a whole
# microbatch of 8 × 200 positions at Qwen's vocabulary (151,936) peaked 18 GB above its inputs;
# chunks of 2**24 elements (128 MiB in float64) keep that near 1.3 GB. Positions do not
# interact, so the values are the same bit for bit.
_TERMS_CHUNK = 2**24


def token_terms(logits: torch.Tensor, targets: torch.Tensor, always: torch.Tensor, extra: torch.Tensor,
                extra_mask: torch.Tensor, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """h, ℓ = log π(y_t) and P_S per position, [B, L] in ``dtype``, differentiable (also forward-mode).

    ``logits`` [B, L, V] (already divided by T); ``always`` [K0] stop ids valid everywhere;
    ``extra``/``extra_mask`` [B, L, K] the position-dependent ones. A logit of −inf (a masked
    token) gives p = 0 and contributes 0 to h with a finite derivative. float64 by default: the
    δH probe differences these values between θ_k and θ_{k+1}; float32 halves the [B, L, V]
    temporaries where only gradients are taken (the Fisher probe). Computed ``_TERMS_CHUNK``
    elements of the vocabulary-wide tensors at a time.
    """
    B, L, V = logits.shape
    has_extra = bool(extra_mask.any())  # once: on a GPU each read waits for the device
    rows = max(1, _TERMS_CHUNK // max(L * V, 1))  # whole rows a chunk, or else a part of one row
    cols = L if rows > 1 else max(1, min(L, _TERMS_CHUNK // max(V, 1)))
    if B * L == 0 or (rows >= B and cols >= L):
        return _position_terms(logits, targets, extra, extra_mask, always, dtype, has_extra)
    parts = []  # slices, not reshapes: the logits of a completion are a strided view, and a copy would cost a whole one
    for b in range(0, B, rows):
        row = [_position_terms(*(t[b:b + rows, c:c + cols] for t in (logits, targets, extra, extra_mask)), always,
                               dtype, has_extra) for c in range(0, L, cols)]
        parts.append({k: torch.cat([part[k] for part in row], dim=1) for k in ("h", "lp", "ps")})
    return {k: torch.cat([part[k] for part in parts]) for k in ("h", "lp", "ps")}


def _position_terms(logits, targets, extra, extra_mask, always, dtype, has_extra: bool) -> dict[str, torch.Tensor]:
    """``token_terms`` of a block of positions [b, l, V]."""
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    p = logp.exp()
    finite_logp = logp.masked_fill(logp == NEG_INF, 0.0)  # 0·(−inf) would be NaN
    h = -(p * finite_logp).sum(-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ps = p[..., always].sum(-1) if always.numel() else torch.zeros_like(h)
    if has_extra:
        ps = ps + (p.gather(-1, extra) * extra_mask).sum(-1)
    return {"h": h, "lp": lp, "ps": ps}


@dataclass
class TokenTable:
    """Per-token measurements of an E-batch, all [N, L] float64 (mask and cont as 0/1)."""

    mask: torch.Tensor
    cont: torch.Tensor  # 1 where y_t ∉ s_t (the sequence goes on, or ends at the budget)
    h: torch.Tensor
    lp: torch.Tensor
    ps: torch.Tensor
    h_new: torch.Tensor
    lp_new: torch.Tensor
    ps_new: torch.Tensor
    dh: torch.Tensor
    dlp: torch.Tensor
    dps: torch.Tensor
    # log ρ^s_t = ℓ_t − log π_sampler(y_t): 0 when the E-batch was drawn from the evaluated π_θk
    ls: torch.Tensor | None = None

    def __post_init__(self):
        if self.ls is None:
            self.ls = torch.zeros_like(self.mask)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def stack(self) -> torch.Tensor:
        """[N, F, L] for gathering across ranks."""
        return torch.stack([getattr(self, n) for n in self.names()], dim=1)

    @classmethod
    def unstack(cls, t: torch.Tensor) -> TokenTable:
        return cls(*t.unbind(dim=1))

    def without_stop_split(self) -> TokenTable:
        """The same samples with s_t = ∅: what an estimator blind to stopping would see."""
        zero = torch.zeros_like(self.ps)
        return replace(self, cont=self.mask.clone(), ps=zero, ps_new=zero, dps=zero)


# ------------------------------------------------------------------------ estimators


def future_entropy(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_{t+1} = Σ_{t' > t} h_t' (masked), [N, L]."""
    hm = h * mask
    return hm.flip(-1).cumsum(-1).flip(-1) - hm


def loo_mean(x: torch.Tensor, mask: torch.Tensor, total: torch.Tensor | None = None,
             count: torch.Tensor | None = None) -> torch.Tensor:
    """[N, L]: at (i, t) the mean of x[j, t] over the other rows j ≠ i with mask[j, t] = 1 (0 if none).
    ``total``, ``count`` [L]: Σ_j x·mask and Σ_j mask over all the rows j of the estimate, when
    these N rows are a part of them (one rank's); default: these rows'."""
    if total is None:
        total, count = (x * mask).sum(0, keepdim=True), mask.sum(0, keepdim=True)
    own_total, own_count = total - x * mask, count - mask
    return torch.where(own_count > 0, own_total / own_count.clamp(min=1), torch.zeros_like(x))


def baseline_totals(h: torch.Tensor, ps: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """[3, length] float64: Σ_rows h·mask, P_S·mask and mask per position, zero past the rows'
    width: what ``value_baseline`` needs of rows that are not at hand (summed over ranks)."""
    out = torch.zeros(3, length, dtype=torch.float64, device=h.device)
    m = mask.double()
    for i, x in enumerate((h.double() * m, ps.double() * m, m)):
        out[i, : x.shape[1]] = x.sum(0)
    return out


def value_baseline(h: torch.Tensor, ps: torch.Tensor, mask: torch.Tensor,
                   totals: torch.Tensor | None = None) -> torch.Tensor:
    """b[i, t] ≈ expected future entropy after continuing at t, from the OTHER rows only:
    B_t = h̄_{t+1} + (1 − P̄_S,t+1) B_{t+1} with h̄, P̄_S leave-one-out means per position.

    Built from probabilities, not from which other rows happened to stop, so a batch without a
    sampled stop does not shift it (the mean of the others' G_{t+1} would be off by Σ P_S·b).
    ``totals`` [3, L_all ≥ L] (``baseline_totals`` of every row of the estimate, these included):
    the means over rows on other ranks too, and the recursion over their positions past these
    rows' width; -> b [N, L] either way.
    """
    N, L = h.shape
    totals = baseline_totals(h, ps, mask, L) if totals is None else totals
    # these rows padded to every row's width (masked out there), against every row's totals
    h, ps, mask = (torch.nn.functional.pad(x.double(), (0, totals.shape[1] - L)) for x in (h, ps, mask))
    h_bar, ps_bar = loo_mean(h, mask, totals[0], totals[2]), loo_mean(ps, mask, totals[1], totals[2])
    b = torch.zeros(N, h_bar.shape[1], dtype=torch.float64, device=h.device)
    for t in range(b.shape[1] - 2, -1, -1):
        b[:, t] = h_bar[:, t + 1] + (1 - ps_bar[:, t + 1]) * b[:, t + 1]
    return b[:, :L]


def values(h, ps, cont, mask, b, ratio=None) -> torch.Tensor:
    """V̂ [N, L + 1] by the backward recursion V̂_t = h_t + c_t ρ_t (V̂_{t+1} − b_t) + (1 − P_S,t) b_t."""
    N, L = h.shape
    V = torch.zeros(N, L + 1, dtype=torch.float64, device=h.device)
    rho = torch.ones_like(h) if ratio is None else ratio
    for t in range(L - 1, -1, -1):
        v = h[:, t] + cont[:, t] * rho[:, t] * (V[:, t + 1] - b[:, t]) + (1 - ps[:, t]) * b[:, t]
        V[:, t] = v * mask[:, t]
    return V


def stop_split(y: torch.Tensor, mask: torch.Tensor, always: torch.Tensor, extra: torch.Tensor,
               extra_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cont, in_always, in_extra) [B, L]: cont = 1 where y_t is a real token that does not stop."""
    in_always = torch.isin(y, always.to(y.device))
    in_extra = ((extra.to(y.device) == y.unsqueeze(-1)) & extra_mask.to(y.device)).any(-1)
    return mask * (~(in_always | in_extra)).to(mask.dtype), in_always, in_extra


def sampler_weights(ls: torch.Tensor, cont: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ, W) [N, L] of per-decision importance sampling from the sampler to π_θk: ρ_t = exp(ls_t)
    and W_t = Π_{s<t} c_s ρ_s, the weight of reaching position t (1 everywhere when ls = 0)."""
    rho = torch.exp(ls) * mask
    W = torch.cat([torch.ones_like(rho[:, :1]), (cont * rho)[:, :-1].cumprod(-1)], dim=1) * mask
    return rho, W


def _first_order(h, lp, ps, cont, mask, b, rho, W, V) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (Σ_t W_t m_t [h_t + c_t ρ_t (V̂_{t+1} − b_t) ℓ_t], −Σ_t W_t m_t b_t P_S,t): δH₁'s
    contribution and its stop part when h, ℓ, P_S are their derivatives along Δθ; the surrogate
    whose derivative they are when they are the values themselves."""
    go = (W * mask * (h + cont * rho * (V[:, 1:] - b) * lp)).sum(-1)
    return go, -(W * mask * b * ps).sum(-1)


def rb_surrogate(terms: dict[str, torch.Tensor], cont: torch.Tensor, mask: torch.Tensor, b: torch.Tensor,
                 ls: torch.Tensor | None = None) -> torch.Tensor:
    """f_i [N], differentiable: the function whose derivative along Δθ is row i's ``rb``
    contribution, f = Σ_t W_t m_t [h_t + c_t ρ_t (V̂_{t+1} − b_t) ℓ_t − b_t P_S,t], with the baseline
    b (``value_baseline`` of the rows it is an estimate over), V̂ and the sampler weights
    (``sampler_weights`` of ``ls``; 1 without) held at their current values."""
    rho, W = sampler_weights(torch.zeros_like(mask) if ls is None else ls, cont, mask)
    V = values(terms["h"].detach() * mask, terms["ps"].detach() * mask, cont, mask, b, ratio=rho)
    go, stop = _first_order(terms["h"], terms["lp"], terms["ps"], cont, mask, b, rho, W, V)
    return go + stop


def contributions(tab: TokenTable, b: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sequence contributions [N] (their means are the estimates) and per-sequence sums, with
    the baseline ``b`` [N, L] (default: ``value_baseline`` of the table's rows).

    With ``tab.ls`` ≠ 0 (an E-batch drawn by a sampler other than the evaluated π_θk: bf16 or
    LoRA-merged decoding) every decision is importance-weighted back to π_θk, ρ^s_t in the value
    recursion and W_t on each position's terms of δH₁ (the derivative of that recursion), so
    the estimates stay unbiased for π_θk; with ls = 0 they are the on-policy ones.
    """
    m = tab.mask
    b = value_baseline(tab.h, tab.ps, m) if b is None else b
    rho, W = sampler_weights(tab.ls, tab.cont, m)
    V = values(tab.h, tab.ps, tab.cont, m, b, ratio=rho)
    V_new = values(tab.h_new, tab.ps_new, tab.cont, m, b, ratio=torch.exp(tab.lp_new - tab.lp + tab.ls) * m)
    go, stop = _first_order(tab.dh, tab.dlp, tab.dps, tab.cont, m, b, rho, W, V)
    # H from the value estimate too: the plain Σ_t h_t would see the stopping probability only
    # through sampled stops (exact check: 0.02 nats high, z ≈ 100, in batches without one).
    return {"rb": go + stop, "stop": stop, "true": V_new[:, 0] - V[:, 0], "H": V[:, 0],
            "log_w": ((tab.lp_new - tab.lp) * m).sum(-1)}


def pool_mean_se(x: torch.Tensor, prompt: torch.Tensor, pool_size: int) -> tuple[float, float, float]:
    """Mean over prompts of the prompt means of ``x`` [N], its two-stage standard error, and the
    Satterthwaite degrees of freedom of that SE (between: n − 1, within: N − n): intervals are
    est ± t_{df}·se. With a few prompts df is small and ±1.96·se covers well below 95 %.

    Needs n ≥ 2 prompts unless they are the whole pool; where no prompt has two completions the
    within term is unknown and the between term alone is used (conservative when f > 0).
    """
    ids, inv = prompt.unique(return_inverse=True)
    n = ids.numel()
    k = torch.bincount(inv, minlength=n).double()
    means = torch.zeros(n, dtype=torch.float64).index_add_(0, inv, x.double()) / k
    est = float(means.mean())
    f = min(n / pool_size, 1.0)
    s_b2 = float(means.var()) if n > 1 else float("nan")
    within_df = float((k - 1).sum())
    if within_df == 0:
        between, within = s_b2 / n, 0.0
    else:
        s_w2 = float(((x.double() - means[inv]) ** 2).sum()) / within_df
        within = f * s_w2 * float((1 / k).sum()) / n**2
        between = (1 - f) * s_b2 / n if f < 1 else 0.0
    var = between + within
    denom = (between**2 / (n - 1) if between else 0.0) + (within**2 / within_df if within else 0.0)
    df = var**2 / denom if denom > 0 else float("inf")
    return est, math.sqrt(var) if var == var and var >= 0 else float("nan"), df


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b): Lentz's continued fraction (Numerical Recipes §6.4)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * frac


def t975(df: float) -> float:
    """Student-t 0.975 quantile at any df > 0 (Satterthwaite's are fractional), to 1e-9: the
    factor of a 95 % interval est ± t975(df)·se; 1.96 at df = ∞. P(|T| > t) = I_{df/(df+t²)}(df/2, 1/2)."""
    if math.isinf(df):
        return 1.959963984540054
    lo, hi = 1.959, 1e3
    for _ in range(200):  # bisection: the two-sided tail falls as t grows
        mid = 0.5 * (lo + hi)
        if _betainc(df / 2, 0.5, df / (df + mid * mid)) > 0.05:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


def kish_ess_frac(log_w: torch.Tensor) -> float:
    """Kish ESS / n of importance weights w = exp(log_w): how far θ' is from θ on this batch."""
    return kish_ess(*kish_sums(torch.exp(log_w - log_w.max()))) / log_w.numel()  # ESS is scale-free


def estimate(tab: TokenTable, prompt: torch.Tensor, ended: torch.Tensor, pool_size: int) -> dict[str, float]:
    """Every logged δH quantity (per sequence, nats) from an E-batch's table.

    ``prompt`` [N] pool index of each sequence; ``ended`` [N] 0 budget, 1 single-token stop,
    2 multi-token stop string (rl_training/stops.py).
    """
    c = contributions(tab)
    out: dict[str, float] = {"n": float(prompt.numel()), "prompts": float(prompt.unique().numel())}
    for key, name in (("rb", "pred"), ("stop", "pred_stop"), ("true", "true"), ("H", "H")):
        out[name], out[f"{name}_se"], out[f"{name}_df"] = pool_mean_se(c[key], prompt, pool_size)
    out["ess_frac"] = kish_ess_frac(c["log_w"])
    out["pool_frac"] = min(out["prompts"] / pool_size, 1.0)
    out["stop_frac"] = float((ended > 0).double().mean())
    out["stops_multi"] = float((ended == 2).sum())
    return out


def cov_prediction(lr: float, n_tok: float, sum_logp: float, sum_adv: float, sum_logp_adv: float) -> float:
    """Cui et al. (2505.22617): ΔH ≈ −η·Cov(log π(y_t), A) over the training batch's tokens."""
    if n_tok < 1:
        return float("nan")
    cov = sum_logp_adv / n_tok - (sum_logp / n_tok) * (sum_adv / n_tok)
    return -lr * cov
