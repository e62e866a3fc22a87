"""probes/split_matmul.py: float32 products with bf16 weights as sums of bf16 GEMMs. The pieces
hold a float32 number exactly, the products are as accurate as a float32 GEMM's (against a
float64 reference), forward-mode derivatives go through the split, and the δH evaluator's values
and derivatives over a bf16 model are float32's whether or not it splits. (Off CUDA the pieces are
multiplied as float32 numbers: the same products and sums; the speed is a GPU's.)"""

import re

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from probes import split_matmul as split
from probes.evaluation import PolicyEvaluator
from rl_training.errors import ConfigError
from tests.probes.test_evaluation import _setup


def test_three_bf16_pieces_hold_a_float32_number_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * torch.pow(10.0, torch.empty(10_000).uniform_(-20, 20, generator=g))
    pieces = split.split(x)
    assert all(p.dtype == torch.bfloat16 for p in pieces)
    assert torch.equal(sum(p.double() for p in pieces), x.double())
    assert not torch.equal(sum(p.double() for p in pieces[:2]), x.double())  # two are not enough


def test_split_linear_is_as_accurate_as_a_float32_gemm():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 256, generator=g)
    weight = torch.randn(96, 256, generator=g).to(torch.bfloat16)
    bias = torch.randn(96, generator=g)
    exact = F.linear(x.double(), weight.double(), bias.double())
    fp32_err = (F.linear(x, weight.float(), bias).double() - exact).abs().max()
    out = split.split_linear(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 96)
    assert float((out.double() - exact).abs().max()) <= 2 * float(fp32_err) + 1e-12
    with torch.no_grad():  # a bf16 GEMM of the rounded input is 100× further off: the split matters
        assert float((F.linear(x.bfloat16(), weight).double() - exact).abs().max()) > 50 * float(fp32_err)


def test_forward_mode_derivatives_go_through_the_split():
    g = torch.Generator().manual_seed(2)
    frozen = torch.randn(32, 16, generator=g).to(torch.bfloat16)
    lora = torch.randn(16, 16, generator=g)
    direction = torch.randn(16, 16, generator=g)
    x = torch.randn(4, 16, generator=g)

    def f(weight):
        return torch.tanh(F.linear(F.linear(x, weight), frozen)).sum(-1)

    with split.SplitLinearMode():
        values, tangent = jvp(f, (lora,), (direction,))
    ref_values, ref_tangent = jvp(lambda w: torch.tanh(F.linear(F.linear(x, w), frozen.float())).sum(-1),
                                  (lora,), (direction,))
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-5, atol=1e-6)


def test_inside_the_mode_other_ops_are_untouched_and_bf16_embeddings_widen():
    emb = torch.nn.Embedding(10, 4).to(torch.bfloat16)
    full = torch.nn.Linear(4, 3)
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    with split.SplitLinearMode():
        assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is False  # float32 sums
        e = emb(torch.tensor([1, 2]))
        assert e.dtype == torch.float32 and torch.equal(e, emb.weight[[1, 2]].float())
        assert torch.equal(full(e), F.linear(e, full.weight, full.bias))  # float32 weights: plain linear
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is flag  # restored
    assert not split.available(torch.device("cpu"))  # it would not pay here
    assert split._works("cpu")  # the self-check a GPU runs once passes where the arithmetic is emulated


def test_the_self_check_fails_where_the_split_is_not_float32_accurate(monkeypatch):
    split._works.cache_clear()
    monkeypatch.setattr(split, "PIECES", 1)  # one bf16 piece: a bf16 GEMM
    try:
        assert not split._works("cpu")
    finally:
        split._works.cache_clear()


@pytest.mark.parametrize("mode", ["always", "never"])
def test_the_evaluator_over_a_bf16_model_gives_float32_values_and_derivatives_either_way(mode):
    model, tensors, stops, theta, delta = _setup("bfloat16")
    ev = PolicyEvaluator(model, "auto", 1.0, split_matmul=mode)
    assert ev.split == (mode == "always") and ev.dtype == torch.float32
    values, tangents = ev.terms_jvp(tensors, stops, theta, delta)
    assert ev.primal_is_plain is True  # the plain forward takes the same split: the same bits
    reference = PolicyEvaluator(model, "float64", 1.0)
    ref_values, ref_tangents = reference.terms_jvp(tensors, stops, theta, delta)
    mask = tensors.completion_mask.bool()
    for got, want in ((values, ref_values), (tangents, ref_tangents)):
        for k in ("h", "lp", "ps"):
            err = float((got[k].double() - want[k])[mask].abs().max() / want[k][mask].abs().max())
            assert err < 5e-6, (k, err)  # measured ≤ 9e-7 either way; bf16 passes: 1e-3 values, 1e-2 derivatives
    frozen = ev._params({})
    kept = [n for n, t in frozen.items() if t.dtype == torch.bfloat16]
    if mode == "always":  # the linear weights are read in bf16, without a float32 copy
        assert kept and all(n.endswith("weight") for n in kept)
        assert all(frozen[n].data_ptr() == p.data_ptr() for n, p in model.named_parameters() if n in kept)
    else:
        assert not kept


def test_in_a_training_step_the_split_probe_logs_what_the_float32_one_does():
    """Two δH probes on one bf16 run and one E-batch, split on and off: the same estimates up to
    float32 summation order, and each says which products it took."""
    from tests.probes.test_ebatch import _session

    s = _session("probes.probes=[{name: a, kind: delta_h, options: {batch_size: 8, split_matmul: always}},"
                 " {name: b, kind: delta_h, options: {batch_size: 8, split_matmul: never}}]", "model.dtype=bfloat16")
    out = s.trainer.train_step().metrics
    assert out["probe/a/split_matmul"] == 1 and out["probe/b/split_matmul"] == 0
    for key in ("pred", "true", "H", "pred_se"):
        a, b = out[f"probe/a/{key}"], out[f"probe/b/{key}"]
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-9, (key, a, b)
    with pytest.raises(ConfigError, match=re.escape("split_matmul must be auto|always|never, got 'yes'")):
        _session("probes.probes=[{name: a, kind: delta_h, options: {split_matmul: 'yes'}}]")
