import random

import pytest
import torch

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
