import math

import pytest
import torch

from rl_training.algs.dr_grpo import dr_grpo_loss, group_advantages, group_has_signal, k3_kl, sampler_weights


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


# --------------------------------------------------------------------------- sampler correction


def test_sampler_weights_per_mode_against_hand_values():
    # Token log-ratios log π_θk − log π_s: row 0 [ln 4, ln 0.25, pad], row 1 [ln 1.5, ln 3].
    sampler = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(4.0), math.log(0.25), 7.0], [math.log(1.5), math.log(3.0), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    kw = dict(clip_min=0.5, clip_max=2.0)
    assert sampler_weights(logp, sampler, mask, mode="none", **kw) is None

    def check(mode, weight, outside):
        sw = sampler_weights(logp, sampler, mask, mode=mode, **kw)
        torch.testing.assert_close(sw.weight, torch.tensor(weight), rtol=1e-6, atol=0)
        assert sw.outside.tolist() == outside

    check("token_truncate", [[2.0, 0.5, 0.0], [1.5, 2.0, 0.0]], [[True, True, False], [False, True, False]])
    check("token_mask", [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]], [[True, True, False], [False, True, False]])
    # Sequences: row 0's ratio is 4 · 0.25 = 1 (the padding's 7 does not count), row 1's 4.5.
    check("sequence_truncate", [[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]], [[False, False, False], [True, True, False]])
    check("sequence_mask", [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [[False, False, False], [True, True, False]])


def test_sampler_weights_are_one_on_policy_and_leave_the_loss_unchanged():
    logp = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([0.5, -0.5, 1.0])
    kw = dict(num_sequences=3, l_budget=4, eps_low=0.2, eps_high=0.2)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        sw = sampler_weights(logp, logp.detach(), mask, mode=mode, clip_min=0.0, clip_max=2.0)
        assert torch.equal(sw.weight, mask.float()) and not sw.outside.any()
        plain = dr_grpo_loss(logp, logp.detach(), adv, mask, **kw).loss
        weighted = dr_grpo_loss(logp, logp.detach(), adv, mask, token_weight=sw.weight, **kw).loss
        assert torch.equal(plain, weighted)


def _tabular_sequences(theta1: torch.Tensor, theta2: torch.Tensor):
    """Every 2-token sequence of a tabular policy π(y1) π(y2 | y1): (y, log π(y1), log π(y2 | y1))."""
    V = theta1.numel()
    lp1, lp2 = theta1.log_softmax(-1), theta2.log_softmax(-1)
    return [((a, b), lp1[a], lp2[a, b]) for a in range(V) for b in range(V)]


def test_sequence_correction_makes_the_sampler_batch_gradient_the_trainer_policy_gradient():
    """By enumeration: sampled from q ≠ π, the sequence-weighted loss's expected gradient is
    E_π[∇ loss] exactly (nothing truncated); uncorrected, and with token weights at L = 2 (the
    prefix stays q's), it is not."""
    gen = torch.Generator().manual_seed(0)
    V = 3
    theta1 = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True)
    theta2 = torch.randn(V, V, generator=gen, dtype=torch.float64, requires_grad=True)
    q1 = (theta1 + 0.4 * torch.randn(V, generator=gen, dtype=torch.float64)).detach()  # the sampler's policy
    q2 = (theta2 + 0.4 * torch.randn(V, V, generator=gen, dtype=torch.float64)).detach()
    reward = torch.randn(V, V, generator=gen, dtype=torch.float64)
    mask = torch.ones(1, 2)
    kw = dict(num_sequences=1, l_budget=2, eps_low=0.2, eps_high=0.2)

    def expected_grad(sampler, mode):
        total = 0.0
        for (y, l1, l2), (_, s1, s2) in zip(_tabular_sequences(theta1, theta2), _tabular_sequences(*sampler)):
            logp = torch.stack([l1, l2]).unsqueeze(0)
            slp = torch.stack([s1, s2]).unsqueeze(0).detach()
            sw = sampler_weights(logp, slp, mask, mode=mode, clip_min=0.0, clip_max=1e30)
            loss = dr_grpo_loss(logp, logp.detach(), reward[y].view(1), mask, token_weight=None if sw is None else sw.weight, **kw).loss
            total = total + (s1 + s2).exp().detach() * loss  # weighted by the sampler's probability of y
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, (theta1, theta2))])

    target = expected_grad((theta1.detach(), theta2.detach()), "none")  # sampled from π itself
    torch.testing.assert_close(expected_grad((q1, q2), "sequence_truncate"), target, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(expected_grad((q1, q2), "sequence_mask"), target, rtol=1e-12, atol=1e-14)
    for biased in ("none", "token_truncate"):
        assert (expected_grad((q1, q2), biased) - target).norm() > 1e-3 * target.norm()
