"""Counter-based random numbers: SplitMix64 bit for bit against plain Python, and the uniforms'
and normals' distributions against their sampling distributions."""

import math

import torch

from rl_training.counter_rng import counter_normals, counter_uniforms
from rl_training.sampling import stable_seed


def _splitmix64(key: int, i: int) -> float:
    """The reference: the i-th output of SplitMix64 seeded with ``key``, in plain Python."""
    mask = (1 << 64) - 1
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) / 2**53


def test_counter_uniforms_are_splitmix64_bit_for_bit():
    keys = [0, 1, 12345, stable_seed("a"), stable_seed("b", 7), 2**63 - 1]
    for i in (0, 1, 2, 63, 10**6):
        got = counter_uniforms(torch.tensor(keys, dtype=torch.int64), i).tolist()
        assert got == [_splitmix64(k, i) for k in keys], i


def test_counter_uniforms_are_uniform_and_uncorrelated():
    # 200 streams × 500 draws: the mean, the CDF (Kolmogorov–Smirnov) and the lag-1 correlation
    # along a stream against their sampling distributions for independent U(0, 1).
    keys = torch.tensor([stable_seed("u", r) for r in range(200)], dtype=torch.int64)
    u = torch.stack([counter_uniforms(keys, i) for i in range(500)], dim=1)
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / n) ** 0.5
    ks = float((torch.sort(u.flatten()).values - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max())
    assert ks < 1.63 / n**0.5  # the 1 % critical value
    a, b = u[:, :-1].flatten() - 0.5, u[:, 1:].flatten() - 0.5
    assert abs(float((a * b).mean() / (a * a).mean())) < 4 / a.numel() ** 0.5


def test_counter_uniforms_take_a_counter_per_key():
    keys = torch.tensor([stable_seed("k", r) for r in range(5)], dtype=torch.int64)
    counters = torch.tensor([0, 3, 7, 10**6, 2], dtype=torch.int64)
    want = [counter_uniforms(keys[r : r + 1], int(c)).item() for r, c in enumerate(counters)]
    assert counter_uniforms(keys, counters).tolist() == want


def test_counter_normals_are_box_muller_of_the_stream_and_prefix_stable():
    key = stable_seed("n")
    u = counter_uniforms(torch.tensor(key), torch.arange(6))
    r, a = torch.sqrt(-2 * torch.log1p(-u[0::2])), 2 * math.pi * u[1::2]
    want = torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=1).flatten().float()
    assert torch.equal(counter_normals(key, 6), want)
    assert torch.equal(counter_normals(key, 5), want[:5])  # odd n: the first draws of a longer stream
    assert not torch.equal(counter_normals(key + 1, 6), want)


def test_counter_normals_are_standard_normal_and_uncorrelated():
    # 2**20 draws: mean, variance, fourth moment, the normal CDF at a few points, and the
    # correlation of the two normals of one Box–Muller pair and of neighbouring pairs.
    z = counter_normals(stable_seed("normals"), 2**20).double()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / n**0.5
    assert abs(float(z.var()) - 1) < 4 * (2 / n) ** 0.5
    assert abs(float((z**4).mean()) - 3) < 4 * (96 / n) ** 0.5
    for x in (-2.0, -1.0, 0.0, 0.5, 1.5):
        p = 0.5 * (1 + math.erf(x / 2**0.5))
        assert abs(float((z <= x).double().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5, x
    pairs = z.view(-1, 2)
    for a, b in ((pairs[:, 0], pairs[:, 1]), (pairs[:-1, 1], pairs[1:, 0])):
        assert abs(float((a * b).mean())) < 4 / a.numel() ** 0.5
