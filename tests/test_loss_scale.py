import pytest
import torch

from rl_training.errors import ConfigError
from rl_training.loss_scale import LossScaler
from rl_training.trainer import total_grad_norm


def _params(*grads):
    out = []
    for g in grads:
        p = torch.zeros_like(g, requires_grad=True)
        p.grad = g.clone()
        out.append(p)
    return out


def test_disabled_is_the_identity():
    s = LossScaler(False, 2.0**10)
    loss = torch.tensor(3.0)
    assert s.scale == 1.0 and s.scale_loss(loss) is loss
    p = _params(torch.tensor([float("inf")]))
    s.unscale_(p)
    assert s.finite(total_grad_norm(p)) and p[0].grad.item() == float("inf")  # nothing checked, nothing skipped
    s.update(False)
    assert s.scale == 1.0


def test_scale_then_unscale_is_exact_and_overflow_is_reported():
    s = LossScaler(True, 2.0**12)
    assert s.scale_loss(torch.tensor(0.1)).item() == pytest.approx(0.1 * 4096)
    g = torch.randn(5, generator=torch.Generator().manual_seed(0))
    p = _params(g * 4096, torch.ones(2) * 4096)
    s.unscale_(p)
    assert s.finite(total_grad_norm(p))
    assert torch.equal(p[0].grad, g) and torch.equal(p[1].grad, torch.ones(2))  # a power of two: exact
    for bad in (_params(torch.ones(3), torch.tensor([1.0, float("nan")])), _params(torch.tensor([float("inf")]))):
        s.unscale_(bad)
        assert not s.finite(total_grad_norm(bad))


def test_backoff_growth_and_state():
    s = LossScaler(True, 2.0**16, growth_interval=3)
    s.update(False)
    assert s.scale == 2.0**15 and s.good_steps == 0
    for _ in range(2):
        s.update(True)
    assert s.scale == 2.0**15 and s.good_steps == 2
    s.update(True)
    assert s.scale == 2.0**16 and s.good_steps == 0
    s.update(True)
    t = LossScaler(True, 2.0**4, growth_interval=3)
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.good_steps) == (2.0**16, 1)
    with pytest.raises(AssertionError, match="power of two"):
        LossScaler(True, 1000.0)


def test_an_overflow_at_scale_one_is_the_models_and_stops_the_run():
    s = LossScaler(True, 2.0)
    s.update(False)
    assert s.scale == 1.0
    with pytest.raises(ConfigError, match=r"'model.dtype' float16: .* even at loss scale 1 .*train in bfloat16"):
        s.update(False)
