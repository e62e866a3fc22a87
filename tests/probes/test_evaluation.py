"""Probe forwards: the derivative pass gives θ_k's values, bit for bit those of a plain forward,
and where a device breaks that the evaluator goes back to a plain forward for θ_k."""

import warnings

import pytest
import torch

import probes.evaluation as evaluation
from probes.evaluation import PolicyEvaluator, same_bits
from rl_training.models import ModelSpec, apply_lora, load_tokenizer_and_model
from rl_training.policy import TokenBatch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _setup(dtype: str):
    _, model = load_tokenizer_and_model(ModelSpec("tiny-random", dtype))
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make every direction through A vanish
            p.data = 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    delta = {n: 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in theta.items()}
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (4, 7), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :3] = 0  # left padding
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # a completion that stopped early
    stops = (torch.tensor([0]), torch.zeros(4, 12, 1, dtype=torch.long), torch.zeros(4, 12, 1, dtype=torch.bool))
    return model, TokenBatch(prompt, prompt_mask, ids, mask), stops, theta, delta


def _fallback_warnings(caught) -> list:
    return [w for w in caught if "differ from a plain forward" in str(w.message)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_derivative_pass_gives_the_plain_forwards_values_bit_for_bit(dtype):
    model, tensors, stops, theta, delta = _setup(dtype)
    ev = PolicyEvaluator(model, "auto", 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values, tangents = ev.terms_jvp(tensors, stops, theta, delta)
    assert ev.primal_is_plain is True and not _fallback_warnings(caught)
    plain = ev.terms(tensors, stops, theta)
    assert same_bits(values, plain)
    assert all(bool(t.isfinite().all()) and bool(t.abs().max() > 0) for t in tangents.values())
    # (the derivatives themselves: tests/probes/test_delta_h_exact.py, against autograd to 1e-9)


def test_a_device_whose_derivative_pass_rounds_differently_gets_plain_forwards(monkeypatch):
    model, tensors, stops, theta, delta = _setup("float32")
    real_jvp = evaluation.jvp

    def off_by_rounding(fn, primals, tangents):
        values, out = real_jvp(fn, primals, tangents)
        return {k: v * (1 + 2**-20) for k, v in values.items()}, out

    monkeypatch.setattr(evaluation, "jvp", off_by_rounding)
    ev = PolicyEvaluator(model, "auto", 1.0)
    with pytest.warns(UserWarning, match="differ from a plain forward"):
        values, _ = ev.terms_jvp(tensors, stops, theta, delta)
    assert ev.primal_is_plain is False
    plain = ev.terms(tensors, stops, theta)
    assert same_bits(values, plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again, _ = ev.terms_jvp(tensors, stops, theta, delta)
    assert same_bits(again, plain) and not _fallback_warnings(caught)  # warned once per evaluator


def test_same_bits_treats_nan_as_equal_and_any_other_difference_as_a_difference():
    a = {"x": torch.tensor([1.0, float("nan"), float("-inf")])}
    assert same_bits(a, {"x": a["x"].clone()})
    assert not same_bits(a, {"x": torch.tensor([1.0, 0.0, float("-inf")])})
    assert not same_bits(a, {"x": torch.tensor([torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)), float("nan"),
                                                float("-inf")])})
    assert not same_bits(a, {"y": a["x"]})


def test_input_grad_hooks_are_off_while_a_probe_evaluates_and_back_after():
    """TRL's default gradient checkpointing has transformers hook the embeddings to call
    requires_grad_ on their output (twice by the time training runs: the second registration
    drops the first one's handle); a functorch transform refuses that call."""
    model, tensors, stops, theta, delta = _setup("float32")
    want_values, want_tangents = PolicyEvaluator(model, "auto", 1.0).terms_jvp(tensors, stops, theta, delta)
    embeddings = model.get_input_embeddings()
    other = embeddings.register_forward_hook(lambda m, i, o: None)  # a hook of someone else: kept, in its place
    model.enable_input_require_grads()
    model.enable_input_require_grads()
    hooks = list(embeddings._forward_hooks.values())
    assert len(hooks) == 3
    values, tangents = PolicyEvaluator(model, "auto", 1.0).terms_jvp(tensors, stops, theta, delta)
    assert same_bits(values, want_values) and same_bits(tangents, want_tangents)
    assert list(embeddings._forward_hooks.values()) == hooks
    with evaluation.without_input_grad_hooks(model):
        assert list(embeddings._forward_hooks.values()) == [hooks[0]]
    other.remove()


def test_a_trainers_autocast_forward_is_set_aside_while_a_probe_evaluates():
    """accelerate's prepare (TRL with bf16=True, its default) swaps ``forward`` for one under bf16
    autocast and keeps the original as ``_original_forward``: the probe evaluates with the
    original, bit for bit as without the wrapper, and leaves the wrapper in place for training."""
    from types import MethodType

    model, tensors, stops, theta, delta = _setup("float32")
    want_values, want_tangents = PolicyEvaluator(model, "auto", 1.0).terms_jvp(tensors, stops, theta, delta)
    model._original_forward = model.forward  # what accelerate does, with its bf16 autocast
    wrapped = MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__), model)
    model.forward = wrapped
    ids = torch.cat([tensors.prompt_ids, tensors.completion_ids], 1)
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16  # the wrapper is on: training autocasts
    values, tangents = PolicyEvaluator(model, "auto", 1.0).terms_jvp(tensors, stops, theta, delta)
    assert same_bits(values, want_values) and same_bits(tangents, want_tangents)
    assert model.forward == wrapped
    # the trainer's forward on request (δH's logp_gap_tok): the wrapper's bf16 rounding shows
    assert evaluation.trainer_wraps_forward(model)
    trainers = PolicyEvaluator(model, "model", 1.0, trainer_forward=True).terms(tensors, stops, theta)
    gap = float(((trainers["lp"] - want_values["lp"]).abs() * tensors.completion_mask).max())
    assert 1e-4 < gap < 0.1 and model.forward == wrapped


def test_float64_mode_keeps_float64_through_transformers_float32_steps():
    x, ints = torch.randn(3, 4, dtype=torch.float64), torch.arange(4)
    with evaluation.Float64Mode():
        kept = [x.to(torch.float32), x.to("cpu", torch.float32), x.to(dtype=torch.bfloat16), x.float(), x.half(),
                torch.nn.functional.softmax(x, dim=-1, dtype=torch.float32), x.softmax(-1, dtype=torch.float32)]
        assert all(t.dtype == torch.float64 for t in kept)
        assert torch.equal(kept[0], x) and torch.equal(kept[5], torch.softmax(x, -1))
        assert ints.float().dtype == torch.float32  # only float64 tensors are kept wide
    assert x.to(torch.float32).dtype == torch.float32  # outside, casts are casts


def test_a_float64_evaluation_is_float64_throughout():
    """transformers' RMSNorm rounds to float32 in any model dtype: without Float64Mode the
    difference of two float64 forwards along a small step is that rounding (finite differences
    off by 1.1× the change at ε = 1e-4 for h, 0.04× for log π), with it they converge to the
    forward-mode derivative linearly in ε (measured 4.5e-6 and 1.7e-6 at 1e-4)."""
    model, tensors, stops, theta, delta = _setup("float64")
    ev = PolicyEvaluator(model, "auto", 1.0)
    assert ev.dtype == torch.float64
    values, d = ev.terms_jvp(tensors, stops, theta, delta)
    mask = tensors.completion_mask.bool()
    for eps in (1e-3, 1e-4):
        new = ev.terms(tensors, stops, {n: theta[n] + eps * delta[n] for n in theta})
        for k in ("h", "lp"):
            fd = (new[k] - values[k])[mask] / eps
            rel = float((fd - d[k][mask]).abs().max() / d[k][mask].abs().max())
            assert rel < 0.1 * eps, (k, eps, rel)  # second order: O(ε); float32 rounding would be O(1e-8/ε)
