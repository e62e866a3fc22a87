"""δH estimators against exact enumeration.

A tiny Llama (vocab 5) with LoRA, completions of exactly 4 tokens after a fixed prompt: the
5⁴ = 625 sequences are enumerated, so H(θ) = Σ_y π(y) Σ_t h_t(y) and ∇H (autograd, float64)
are exact. Δθ comes from a real AdamW step. E-batches are drawn from the exact π; the
estimates are assembled with the probe's own code (probes/directional.py for the per-sequence
directional derivatives, probes/functional/delta_h.py for the estimators).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from probes.directional import per_row_directional
from probes.functional import delta_h as F
from rl_training import policy

V, L, T = 5, 4, 0.8
REPEATS = 1000
LOGIT_SCALE = 8.0  # peaked but not degenerate: per-token entropy well below log 5
T975 = {15: 2.1314, 63: 1.9983}  # Student-t 0.975 quantiles (df = B_E − 1)


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).double()
    with torch.no_grad():  # a peaked, non-uniform policy
        base.lm_head.weight.mul_(LOGIT_SCALE)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model.eval()


def _all_sequences():
    grid = torch.cartesian_prod(*[torch.arange(V)] * L)  # [625, 4]
    prompt = torch.tensor([[1, 3]]).expand(grid.shape[0], -1)
    ones = torch.ones_like
    return prompt, ones(prompt), grid, ones(grid)


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _token_stats(model, tensors, params=None):
    call = None
    if params is not None:
        call = lambda **kw: torch.func.functional_call(model, params, args=(), kwargs=kw)  # noqa: E731
    logits = policy.completion_logits(model, *tensors, T, forward=call)
    return F.token_entropy_logprob(logits, tensors[2])  # h, logp [625, 4]


def _exact_H(model, tensors, params=None):
    h, logp = _token_stats(model, tensors, params)
    return (logp.sum(-1).exp() * h.sum(-1)).sum()


def _rmsnorm_float64(self, x):
    # HF's LlamaRMSNorm rounds through float32 (θ-dependent rounding noise ~1e-8 that would
    # swamp finite differences); the exact tests need the whole function in float64.
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@pytest.fixture(scope="module")
def world():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlamaRMSNorm, "forward", _rmsnorm_float64)
        yield _world()


def _world():
    model = _model()
    tensors = _all_sequences()
    theta = {n: p.detach().clone() for n, p in _trainable(model).items()}
    # Δθ from a real AdamW step on a Dr-GRPO-like loss over a few sequences.
    opt = torch.optim.AdamW(_trainable(model).values(), lr=1e-3, weight_decay=0.01)
    _, logp = _token_stats(model, tensors)
    adv = torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (-(adv.unsqueeze(1) * logp).sum() / logp.numel()).backward()
    opt.step()
    opt.zero_grad()
    theta_new = {n: p.detach().clone() for n, p in _trainable(model).items()}
    delta = {n: theta_new[n] - theta[n] for n in theta}
    # Exact quantities at θ.
    params = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    H = _exact_H(model, tensors, params)
    grad = torch.autograd.grad(H, list(params.values()))
    exact_pred = sum(float((g * delta[n]).sum()) for n, g in zip(params, grad))
    with torch.no_grad():
        h, logp = _token_stats(model, tensors, theta)
        h_new, logp_new = _token_stats(model, tensors, theta_new)
        H_new = _exact_H(model, tensors, theta_new)
    mask = torch.ones_like(h)
    # Per-sequence directional derivatives through the probe's hooks: RB with b = 0, SF, and
    # per position e_t = ⟨∇log π(y_t), Δθ⟩ (RB with a baseline b is d_rb0 − Σ_t b_t e_t).
    def run(fn):
        return per_row_directional(model, theta, delta, lambda call: fn(*_call_stats(model, tensors, call)))

    _, d_rb0, tot_rb = run(lambda hh, lp: F.rb_surrogate(hh, lp, mask, torch.zeros(L, dtype=torch.float64)))
    _, d_sf, tot_sf = run(lambda hh, lp: lp.sum(-1))
    e = torch.stack([run(lambda hh, lp, t=t: lp[:, t])[1] for t in range(L)], dim=1)
    print(f"H/token {float(H)/L:.3f} (max {math.log(V):.3f}); exact δH₁ {exact_pred:.4g}; "
          f"S range [{float(logp.sum(-1).min()):.1f}, {float(logp.sum(-1).max()):.1f}]")
    return dict(model=model, tensors=tensors, theta=theta, theta_new=theta_new, delta=delta, exact_pred=exact_pred,
                exact_true=float(H_new - H.detach()), H=float(H.detach()), p=logp.sum(-1).exp(), S=logp.sum(-1), S_new=logp_new.sum(-1),
                Hseq=h.sum(-1), Hseq_new=h_new.sum(-1), G=F.future_entropy(h, mask), d_rb0=d_rb0, d_sf=d_sf, e=e,
                totals=(tot_rb, tot_sf))


def _call_stats(model, tensors, call):
    logits = policy.completion_logits(model, *tensors, T, forward=call)
    return F.token_entropy_logprob(logits, tensors[2])


def test_exact_identities(world):
    w = world
    assert float(w["p"].sum()) == pytest.approx(1.0, abs=1e-12)
    # H = E[Σ_t h_t] = E[−S] exactly.
    assert float((w["p"] * -w["S"]).sum()) == pytest.approx(w["H"], rel=1e-12)
    # The hooks' per-row derivatives add up to the ordinary gradient's.
    assert float(w["d_rb0"].sum()) == pytest.approx(w["totals"][0], rel=1e-10)
    assert float(w["d_sf"].sum()) == pytest.approx(w["totals"][1], rel=1e-10)
    # Exact expectations of the per-sequence contributions are ⟨∇H, Δθ⟩.
    p = w["p"]
    assert float((p * w["d_rb0"]).sum()) == pytest.approx(w["exact_pred"], rel=1e-9)
    assert float((p * -(w["S"] - float((p * w["S"]).sum())) * w["d_sf"]).sum()) == pytest.approx(w["exact_pred"], rel=1e-9)
    assert abs(w["exact_pred"]) > 1e-4  # the step really moves the entropy


def test_per_row_directional_matches_per_sequence_backward_loop(world):
    w = world
    model, tensors = w["model"], w["tensors"]
    for i in (0, 17, 311, 624):
        rows = tuple(t[i : i + 1] for t in tensors)
        params = {n: t.clone().requires_grad_(True) for n, t in w["theta"].items()}
        h, lp = _call_stats(model, rows, lambda **kw: torch.func.functional_call(model, params, args=(), kwargs=kw))
        f = F.rb_surrogate(h, lp, torch.ones_like(h), torch.zeros(L, dtype=torch.float64))
        g = torch.autograd.grad(f.sum(), list(params.values()))
        brute = sum(float((gi * w["delta"][n]).sum()) for n, gi in zip(params, g))
        assert float(w["d_rb0"][i]) == pytest.approx(brute, rel=1e-10, abs=1e-14)


def test_finite_differences_converge_to_directional_derivative(world):
    w = world
    model, tensors = w["model"], w["tensors"]
    v = w["delta"]
    rel = []
    for eta in (1e-2, 1e-3, 1e-4, 1e-5):  # below ~1e-6 float64 rounding takes over
        moved = {n: w["theta"][n] + eta * v[n] for n in v}
        with torch.no_grad():
            fd = (float(_exact_H(model, tensors, moved)) - w["H"]) / eta
        rel.append(abs(fd - w["exact_pred"]) / abs(w["exact_pred"]))
    assert rel == sorted(rel, reverse=True), rel  # converges as η → 0
    assert rel[-1] < 1e-6, rel


def _repeats(world, be: int):
    w = world
    gen = torch.Generator().manual_seed(1000 + be)
    baseline = torch.zeros(L, dtype=torch.float64)
    rows = {"rb": [], "sf": [], "snis": []}
    for _ in range(REPEATS):
        idx = torch.multinomial(w["p"], be, replacement=True, generator=gen)
        c = w["d_rb0"][idx] - (w["e"][idx] * baseline).sum(-1)  # RB with the previous batch's baseline
        rows["rb"].append(F.mean_se(float(c.sum()), float((c * c).sum()), be))
        rows["sf"].append(F.sf_estimate(F.sf_sums(w["S"][idx], w["d_sf"][idx]), be))
        s = F.snis_estimate(F.snis_sums(w["S"][idx], w["S_new"][idx], w["Hseq"][idx], w["Hseq_new"][idx]), be)
        rows["snis"].append((s["true"], s["true_se"]))
        baseline = w["G"][idx].mean(0)  # what the probe carries to its next due step
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}


@pytest.fixture(scope="module")
def repeats(world):
    return {be: _repeats(world, be) for be in (4, 16, 64)}


@pytest.mark.parametrize("estimator", ["rb", "sf"])
@pytest.mark.parametrize("be", [4, 16, 64])
def test_estimator_is_unbiased_at_every_batch_size(world, repeats, estimator, be):
    est = repeats[be][estimator][:, 0]
    mean, se = float(est.mean()), float(est.std() / math.sqrt(len(est)))
    assert abs(mean - world["exact_pred"]) < 3 * se, (mean, se, world["exact_pred"])


@pytest.mark.parametrize("estimator", ["rb", "sf"])
@pytest.mark.parametrize("be", [16, 64])
def test_confidence_intervals_cover(world, repeats, estimator, be):
    est, se = repeats[be][estimator][:, 0], repeats[be][estimator][:, 1]
    covered = ((est - world["exact_pred"]).abs() <= T975[be - 1] * se).double().mean().item()
    assert 0.93 <= covered <= 0.97, covered


def test_snis_matches_exact_entropy_change(world, repeats):
    est = repeats[64]["snis"][:, 0]
    mean, se = float(est.mean()), float(est.std() / math.sqrt(len(est)))
    assert abs(mean - world["exact_true"]) < 3 * se, (mean, se, world["exact_true"])
    # A small step: the first-order prediction is close to the exact change.
    assert world["exact_true"] == pytest.approx(world["exact_pred"], rel=0.05)
