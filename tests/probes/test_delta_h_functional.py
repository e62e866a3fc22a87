"""The δH estimators' building blocks against direct computations."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import jvp

from probes.functional import delta_h as F

ROOT = Path(__file__).resolve().parents[2]


def _rand(*shape, seed, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


@pytest.mark.parametrize("chunk", [7, 13, 40])  # parts of a row; one row; several rows
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_terms_by_chunks_of_positions_are_the_whole_pass_bit_for_bit(monkeypatch, chunk, dtype):
    """Chunking over positions (to bound the [positions, V] temporaries) changes no value and no
    forward-mode derivative, with masked logits and position-dependent stops in the batch."""
    logits, tangent = _rand(3, 4, 6, seed=2).float(), _rand(3, 4, 6, seed=3).float()
    logits[1, 2, 3] = float("-inf")
    targets = torch.tensor([[0, 1, 3, 2], [5, 4, 0, 1], [2, 2, 2, 5]])
    always = torch.tensor([5])
    extra = torch.zeros(3, 4, 2, dtype=torch.long)
    extra_mask = torch.zeros(3, 4, 2, dtype=torch.bool)
    extra[0, 2], extra_mask[0, 2] = torch.tensor([4, 1]), True
    extra[2, 3, 0], extra_mask[2, 3, 0] = 3, True

    def run():
        return jvp(lambda z: F.token_terms(z, targets, always, extra, extra_mask, dtype=dtype), (logits,), (tangent,))

    whole = run()
    monkeypatch.setattr(F, "_TERMS_CHUNK", chunk)
    chunked = run()
    for a, b in zip(whole, chunked):
        for k in ("h", "lp", "ps"):
            assert a[k].dtype == dtype and a[k].shape == (3, 4)
            assert torch.equal(a[k], b[k]), k


_TERMS_MEMORY = """
import json, sys, torch
from torch.func import jvp
torch.set_num_threads(1)
from probes.functional import delta_h as F
L, V = 50, 2**15
def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))
growth = {}
for name, B, chunk in (("whole", 4, 2**40), ("chunked", 4, 2**20), ("chunked_4x", 16, 2**20)):
    logits, tangent = torch.randn(B, L, V), torch.randn(B, L, V)
    targets, always = torch.randint(0, V, (B, L)), torch.tensor([0])
    extra, extra_mask = torch.zeros(B, L, 1, dtype=torch.long), torch.zeros(B, L, 1, dtype=torch.bool)
    F._TERMS_CHUNK = chunk
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the current RSS
        f.write("5")
    before = status_kib("VmRSS")
    with torch.no_grad():
        jvp(lambda z: F.token_terms(z, targets, always, extra, extra_mask), (logits,), (tangent,))
    growth[name] = (status_kib("VmHWM") - before) / 1024
    del logits, tangent
print(json.dumps(growth))
"""


def test_token_terms_peak_memory_is_bounded_by_its_chunk():
    """Under the forward-mode pass the whole [B, L, V] at once peaks at about ten float64 copies
    of it (Qwen's vocabulary, 8 × 200 positions: 18 GB); by chunks the peak is the chunk's and
    does not grow with the positions. In a child process (its own peak); MB."""
    # Every block of 64 KiB or more mmapped, so that a freed one leaves the RSS at once: glibc's
    # heap would otherwise keep freed chunks of up to 32 MB, and the peak would vary by run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _TERMS_MEMORY], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout)
    one = 4 * 50 * 2**15 * 8 / 2**20  # MB of one float64 [4, 50, V]: 50
    # measured: whole 513 MB (ten copies); chunked 80 MB (ten copies of one 8 MB chunk), at 4× the positions too
    assert growth["whole"] > 5 * one and growth["chunked"] < 2 * one, growth
    assert growth["chunked_4x"] < growth["chunked"] + 10, growth


def test_token_terms_with_masked_logits_are_finite_and_match_a_direct_sum():
    logits = _rand(2, 3, 6, seed=0)
    logits[0, 1, 2] = float("-inf")  # a masked token: p = 0
    targets = torch.tensor([[0, 1, 3], [5, 4, 0]])
    always = torch.tensor([5])
    extra = torch.tensor([[[0], [0], [4]], [[0], [0], [0]]])
    extra_mask = torch.tensor([[[False], [False], [True]], [[False], [False], [False]]])
    got = F.token_terms(logits, targets, always, extra, extra_mask)
    p = torch.softmax(logits, -1)
    h = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)
    assert torch.allclose(got["h"], h, rtol=1e-12)
    assert torch.allclose(got["lp"], torch.log(p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)), rtol=1e-12)
    ps = p[..., 5].clone()
    ps[0, 2] += p[0, 2, 4]
    assert torch.allclose(got["ps"], ps, rtol=1e-12)
    # Forward-mode derivatives stay finite where p = 0 (0·log 0 must not become NaN).
    _, tangent = jvp(lambda z: F.token_terms(z, targets, always, extra, extra_mask), (logits,), (_rand(2, 3, 6, seed=1),))
    assert all(torch.isfinite(t).all() for t in tangent.values())


def test_future_entropy_loo_mean_and_value_baseline():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 0.0, 0.0], [3.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    assert F.future_entropy(h, mask)[0].tolist() == [5.0, 3.0, 0.0, 0.0]
    loo = F.loo_mean(h, mask)
    assert loo[0].tolist() == [2.5, 1.5, 1.0, 0.0]  # position 2: only row 2 besides row 0; position 3: none
    ps = torch.full_like(h, 0.1)
    b = F.value_baseline(h, ps, mask)
    # Row 0 from rows 1, 2: b_1 = h̄_2 = 1.0 (row 2 only); b_0 = h̄_1 + 0.9·b_1 = 1.5 + 0.9.
    assert b[0, 1].item() == pytest.approx(1.0) and b[0, 0].item() == pytest.approx(1.5 + 0.9 * 1.0)
    assert b[0, 3].item() == 0.0


def test_value_baseline_of_a_part_with_every_rows_totals_is_the_wholes():
    """Rows split over "ranks", each trimmed to its own width: with the totals summed over the
    parts, each part's baseline equals the rows' baseline computed with all of them at hand
    (the others' means, and the recursion over positions only other parts reach)."""
    gen = torch.Generator().manual_seed(5)
    h, ps = torch.rand(7, 9, generator=gen, dtype=torch.float64), torch.rand(7, 9, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 5, 2, 8, 4, 1])
    mask = (torch.arange(9) < lengths[:, None]).double()
    whole = F.value_baseline(h * mask, ps * mask, mask)
    parts = [slice(0, 3), slice(3, 4), slice(4, 7)]
    widths = [int(lengths[s].max()) for s in parts]
    totals = sum(F.baseline_totals(h[s, :w], ps[s, :w], mask[s, :w], 12) for s, w in zip(parts, widths))
    for s, w in zip(parts, widths):
        got = F.value_baseline(h[s, :w] * mask[s, :w], ps[s, :w] * mask[s, :w], mask[s, :w], totals)
        assert got.shape == (s.stop - s.start, w)
        torch.testing.assert_close(got, whole[s, :w], rtol=1e-12, atol=1e-12)
    own = F.value_baseline(h[parts[1], :3], ps[parts[1], :3], mask[parts[1], :3])
    assert not torch.allclose(own, whole[parts[1], :3]), "one part alone is another baseline"


def test_values_recursion_unrolled_by_hand():
    h = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    ps = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    cont = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # stops at the last token
    mask = torch.ones_like(h)
    b = torch.tensor([[4.0, 5.0, 6.0]], dtype=torch.float64)
    rho = torch.tensor([[1.1, 0.9, 1.3]], dtype=torch.float64)
    V2 = 3 + 0 + 0.7 * 6  # a stop: no ρ-term, only (1 − P_S) b
    V1 = 2 + 0.9 * (V2 - 5) + 0.8 * 5
    V0 = 1 + 1.1 * (V1 - 4) + 0.9 * 4
    assert F.values(h, ps, cont, mask, b, ratio=rho)[0].tolist() == pytest.approx([V0, V1, V2, 0.0])


def test_without_stop_split_makes_the_value_the_future_entropy():
    tab = _table(6, 5, seed=3)
    naive = tab.without_stop_split()
    V = F.values(naive.h, naive.ps, naive.cont, naive.mask, _rand(6, 5, seed=9))
    G0 = (naive.h * naive.mask).sum(-1)
    assert torch.allclose(V[:, 0], G0, rtol=1e-12)


def _table(N, L, seed, delta=0.0):
    lengths = torch.randint(1, L + 1, (N,), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(L) < lengths.unsqueeze(1)).double()
    stop = torch.zeros(N, L, dtype=torch.float64)
    stop[torch.arange(N), lengths - 1] = (torch.arange(N) % 2).double()  # half of them end at a stop
    h, lp = _rand(N, L, seed=seed + 1).abs() * mask, -_rand(N, L, seed=seed + 2).abs() * mask
    ps = torch.sigmoid(_rand(N, L, seed=seed + 3) - 3) * mask
    dh, dlp, dps = (_rand(N, L, seed=seed + k, scale=1e-3) * mask for k in (4, 5, 6))
    return F.TokenTable(mask, mask * (1 - stop), h, lp, ps, h + delta * dh, lp + delta * dlp, ps + delta * dps,
                        dh, dlp, dps)


def test_pred_is_the_derivative_of_true_along_the_tangents():
    eps = 1e-6
    tab = _table(7, 5, seed=11, delta=eps)
    c = F.contributions(tab)
    assert torch.allclose(c["true"] / eps, c["rb"], rtol=1e-4, atol=1e-9)


def _sampled_elsewhere(tab, seed):
    """The table of an E-batch drawn by another sampler: ls = ℓ − log q ≠ 0 on real tokens."""
    from dataclasses import replace

    return replace(tab, ls=_rand(*tab.mask.shape, seed=seed, scale=0.05) * tab.mask)


def test_with_sampler_weights_pred_is_still_the_derivative_of_true():
    eps = 1e-6
    tab = _sampled_elsewhere(_table(7, 5, seed=11, delta=eps), seed=12)
    c = F.contributions(tab)
    assert torch.allclose(c["true"] / eps, c["rb"], rtol=1e-4, atol=1e-9)
    assert not torch.allclose(c["rb"], F.contributions(_table(7, 5, seed=11, delta=eps))["rb"], rtol=1e-3)


def test_rb_surrogate_differentiates_to_the_probes_contribution_with_and_without_sampler_weights():
    """The Fisher probe's F is built from rb_surrogate: along the tangents its derivative is rb."""
    for tab in (_table(6, 5, seed=40), _sampled_elsewhere(_table(6, 5, seed=40), seed=41)):
        b = F.value_baseline(tab.h, tab.ps, tab.mask)

        def f(eps):
            terms = {"h": tab.h + eps * tab.dh, "lp": tab.lp + eps * tab.dlp, "ps": tab.ps + eps * tab.dps}
            return F.rb_surrogate(terms, tab.cont, tab.mask, b, tab.ls)

        _, df = jvp(f, (torch.zeros((), dtype=torch.float64),), (torch.ones((), dtype=torch.float64),))
        torch.testing.assert_close(df, F.contributions(tab)["rb"], rtol=1e-12, atol=1e-15)


def test_stack_round_trip_and_delta_zero_gives_zero():
    tab = _table(4, 3, seed=20)
    back = F.TokenTable.unstack(tab.stack())
    assert all(torch.equal(getattr(tab, n), getattr(back, n)) for n in F.TokenTable.names())
    same = _table(4, 3, seed=20, delta=0.0)
    assert torch.equal(F.contributions(same)["true"], torch.zeros(4, dtype=torch.float64))
    assert F.kish_ess_frac(F.contributions(same)["log_w"]) == 1.0


def test_pool_mean_se_two_stage_formula():
    x = _rand(12, seed=30)
    prompt = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    means = x.view(4, 3).mean(1)
    s_b2 = float(means.var())
    s_w2 = float(((x.view(4, 3) - means.unsqueeze(1)) ** 2).sum()) / 8
    for pool in (4, 10, 1000):
        f = 4 / pool
        between, within = (1 - f) * s_b2 / 4, f * s_w2 * (4 / 3) / 16
        est, se, df = F.pool_mean_se(x, prompt, pool)
        assert est == pytest.approx(float(means.mean())) and se == pytest.approx(math.sqrt(between + within), rel=1e-12)
        # Satterthwaite: 3 between-prompt df, 8 within.
        assert df == pytest.approx((between + within) ** 2 / (between**2 / 3 + within**2 / 8), rel=1e-12)
    # One prompt, the whole pool: the SE of a plain mean, N − 1 df.
    est, se, df = F.pool_mean_se(x, torch.zeros(12, dtype=torch.long), 1)
    assert se == pytest.approx(float(x.std() / math.sqrt(12)), rel=1e-12) and df == pytest.approx(11)
    # Single completions: the between term alone, n − 1 df.
    est, se, df = F.pool_mean_se(x, torch.arange(12), 50)
    assert se == pytest.approx(float(x.std() / math.sqrt(12)), rel=1e-12) and df == pytest.approx(11)


def test_t975_matches_student_t_tables():
    tables = ((1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (5, 2.5705818), (10, 2.2281389),
              (30, 2.0422725), (1000, 1.9623391), (float("inf"), 1.9599640))
    for df, want in tables:
        assert F.t975(df) == pytest.approx(want, abs=1e-6), df
    assert F.t975(3) > F.t975(3.5) > F.t975(4)  # fractional df in between


def test_cov_prediction():
    lp, a = _rand(30, seed=11), _rand(30, seed=12)
    cov = float(((lp - lp.mean()) * (a - a.mean())).mean())
    got = F.cov_prediction(1e-3, 30, float(lp.sum()), float(a.sum()), float((lp * a).sum()))
    assert got == pytest.approx(-1e-3 * cov, rel=1e-9)
