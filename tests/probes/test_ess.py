import random
from types import SimpleNamespace

import pytest
import torch

from probes.base import SetupContext, StepContext
from probes.ess import EssProbe
from probes.functional.ess import dr_grpo_weights, kish_ess, kish_sums


def test_kish_ess_limits_and_brute_force():
    assert kish_ess(*kish_sums(torch.ones(10))) == pytest.approx(10)
    assert kish_ess(*kish_sums(torch.tensor([0.0, 0.0, 5.0]))) == pytest.approx(1)
    rng = random.Random(0)
    w = [rng.random() for _ in range(50)]
    assert kish_ess(*kish_sums(torch.tensor(w))) == pytest.approx(sum(w) ** 2 / sum(x * x for x in w))


def test_sums_over_shards_equal_the_whole():
    w = torch.rand(40, generator=torch.Generator().manual_seed(1))
    parts = [kish_sums(w[:13]), kish_sums(w[13:])]
    assert kish_ess(sum(p[0] for p in parts), sum(p[1] for p in parts)) == pytest.approx(kish_ess(*kish_sums(w)))


def test_dr_grpo_weights_are_abs_advantage_times_tokens():
    adv = torch.tensor([0.5, -0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert dr_grpo_weights(adv, mask).tolist() == [1.5, 0.5, 0.0]


def test_dr_grpo_weights_with_the_loss_token_weights():
    adv = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    tw = torch.tensor([[2.0, 0.5, 9.0], [1.0, 0.0, 3.0]])  # padding's weight never counts
    assert dr_grpo_weights(adv, mask, tw).tolist() == [0.5 * 2.5, 2.0 * 4.0]


def _probe_and_cfg(ppo_epochs: int):
    """A set-up ESS probe and the config it reads."""
    probe = EssProbe("ess")
    probe.setup(SetupContext(None, None, None, None, {}))
    probe.reset_stats()
    return probe, SimpleNamespace(train=SimpleNamespace(ppo_epochs=ppo_epochs))


def test_loss_ess_summed_over_microbatches_with_sampler_weights():
    probe, cfg = _probe_and_cfg(1)
    gen = torch.Generator().manual_seed(5)
    adv = torch.randn(6, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) < 0.8).long()
    tw = torch.rand(6, 5, generator=gen) * 2
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        mb = SimpleNamespace(completion_mask=mask[rows], advantages=adv[rows])
        probe.on_after_backward(StepContext(1, None, None, 0.0, None, None, cfg, microbatch=mb, token_weight=tw[rows]))
    out = probe.compute()
    w = [abs(float(adv[i])) * sum(float(tw[i, t]) for t in range(5) if mask[i, t]) for i in range(6)]
    assert out["loss_ess"] == pytest.approx(sum(w) ** 2 / sum(x * x for x in w), rel=1e-12)
    assert out["max_weight_share"] == pytest.approx(max(w) / sum(w), rel=1e-12)
    assert out["sequences"] == 6


def test_ppo_ratio_ess_against_brute_force():
    probe, cfg = _probe_and_cfg(3)
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    old = -torch.rand(3, 4, generator=gen)
    new = old + 0.3 * torch.randn(3, 4, generator=gen)
    mb = SimpleNamespace(completion_mask=mask, old_logp=old, advantages=torch.tensor([0.5, -0.5, 0.0]))
    for epoch in range(3):  # only the last epoch counts
        ctx = StepContext(1, None, None, 0.0, None, None, cfg, epoch=epoch, microbatch=mb, token_logp=new)
        probe.on_after_backward(ctx)
    out = probe.compute()
    d = (new - old).double() * mask
    tok = d.exp()[mask.bool()]
    seq = d.sum(-1).exp()
    assert out["ratio_ess_frac_tok"] == pytest.approx(float(tok.sum() ** 2 / (tok**2).sum()) / tok.numel(), rel=1e-12)
    assert out["ratio_ess_frac_seq"] == pytest.approx(float(seq.sum() ** 2 / (seq**2).sum()) / 3, rel=1e-12)


def test_ppo_ratio_ess_in_a_run(tmp_path):
    from tests.helpers.runs import run_in_process, train_log

    common = ("train.total_steps=1", "train.ppo_epochs=2", "probes.probes=[{name: ess, kind: ess}]")
    (still,) = train_log(run_in_process(tmp_path / "lr0", *common, "train.lr=0"))
    assert still["probe/ess/ratio_ess_frac_tok"] == 1.0 and still["probe/ess/ratio_ess_frac_seq"] == 1.0
    (moved,) = train_log(run_in_process(tmp_path / "lr", *common, "train.lr=1e-2"))
    assert 0 < moved["probe/ess/ratio_ess_frac_seq"] < 1 and 0 < moved["probe/ess/ratio_ess_frac_tok"] < 1
    (single,) = train_log(run_in_process(tmp_path / "one", "train.total_steps=1", "probes.probes=[{name: ess, kind: ess}]"))
    assert not any(k.startswith("probe/ess/ratio") for k in single)
