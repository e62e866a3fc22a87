import math

import pytest
import torch

from rl_training.algs.dr_grpo import dr_grpo_loss, group_advantages, group_has_signal, k3_kl


def test_group_advantages_subtract_group_mean_without_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    a = group_advantages(r, 4)
    assert a.tolist() == [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25]


def test_group_has_signal():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5])
    assert group_has_signal(r, 2).tolist() == [False, True, False, False]


def test_loss_on_policy_equals_hand_computed_value():
    # On policy (ratio 1) the loss is −Σ_i A_i |y_i| / (N · L_budget).
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([0.5, -0.5])
    terms = dr_grpo_loss(logp, logp.detach(), adv, mask, num_sequences=4, l_budget=10, eps_low=0.2, eps_high=0.2)
    assert terms.loss.item() == pytest.approx(-(0.5 * 3 - 0.5 * 2) / 40)
    terms.loss.backward()
    # d loss / d logp_t = −A_i / (N L) on every unmasked token, 0 on padding.
    expected = torch.tensor([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.0]]) / 40
    torch.testing.assert_close(logp.grad, expected)
    assert terms.tokens.item() == 5 and terms.clipped_tokens.item() == 0


def test_loss_clips_ratio_per_token_by_sign_of_advantage():
    old = torch.zeros(1, 4)
    # ratios e^0.5 ≈ 1.65 (above 1 + 0.2) and e^-0.5 ≈ 0.61 (below 1 − 0.2), twice.
    logp = torch.tensor([[0.5, -0.5, 0.5, -0.5]], requires_grad=True)
    mask = torch.ones(1, 4)
    pos = dr_grpo_loss(logp, old, torch.tensor([1.0]), mask, num_sequences=1, l_budget=4, eps_low=0.2, eps_high=0.2)
    # A > 0: min(ρA, clip(ρ)A) -> 1.2 for the high ratios, e^-0.5 for the low ones.
    expected = -(1.2 + math.exp(-0.5) + 1.2 + math.exp(-0.5)) / 4
    assert pos.loss.item() == pytest.approx(expected, rel=1e-6)
    assert pos.clipped_tokens.item() == 2
    pos.loss.backward()
    # Clipped tokens get no gradient; the others get −A ρ / (N L).
    g = logp.grad[0]
    assert g[0].item() == 0.0 and g[2].item() == 0.0
    assert g[1].item() == pytest.approx(-math.exp(-0.5) / 4, rel=1e-6)
    neg = dr_grpo_loss(logp, old, torch.tensor([-1.0]), mask, num_sequences=1, l_budget=4, eps_low=0.2, eps_high=0.3)
    # A < 0: max(ρ, clip(ρ)) -> e^0.5 for the high ratios, 0.8 for the low ones.
    assert neg.loss.item() == pytest.approx((2 * math.exp(0.5) + 2 * 0.8) / 4, rel=1e-6)
    assert neg.clipped_tokens.item() == 2


def test_kl_is_added_only_when_beta_positive():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    kl = k3_kl(logp, ref)
    d = ref - logp
    torch.testing.assert_close(kl, torch.exp(d) - d - 1)
    assert (kl >= 0).all()
    base = dr_grpo_loss(logp, logp, torch.tensor([0.0]), mask, num_sequences=1, l_budget=2, eps_low=0.2, eps_high=0.2, ref_logp=ref)
    assert base.loss.item() == 0.0 and base.kl_sum.item() == 0.0
    with_kl = dr_grpo_loss(logp, logp, torch.tensor([0.0]), mask, num_sequences=1, l_budget=2,
                           eps_low=0.2, eps_high=0.2, ref_logp=ref, kl_beta=0.1)
    assert with_kl.loss.item() == pytest.approx(0.1 * kl.sum().item() / 2, rel=1e-6)
    assert with_kl.kl_sum.item() == pytest.approx(kl.sum().item(), rel=1e-6)
