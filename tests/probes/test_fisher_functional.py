"""Fisher-kernel functions against explicit references: flatten-and-matmul Grams, a hand-rolled
Adam second moment, the dense projection matrix, Monte-Carlo sketch statistics, hand-computed
kernel summaries, and the peak memory of a 4M-parameter projection."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils._python_dispatch

from probes.functional import fisher as F

ROOT = Path(__file__).resolve().parents[2]


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- gram


@pytest.mark.parametrize("weighted", [False, True])
def test_gram_equals_flatten_and_matmul(weighted):
    a, b = _randn(3, 4, 5, seed=0, dtype=torch.float32), _randn(2, 4, 5, seed=1, dtype=torch.float32)
    w = _randn(4, 5, seed=2).abs() if weighted else None
    A, B = a.reshape(3, -1).double(), b.reshape(2, -1).double()
    Aw = A * w.reshape(-1) if weighted else A
    K = F.gram(a, b, weight=w)
    assert K.dtype == torch.float64 and K.shape == (3, 2)
    torch.testing.assert_close(K, Aw @ B.T, rtol=1e-12, atol=0)
    torch.testing.assert_close(F.gram(a, weight=w), Aw @ A.T, rtol=1e-12, atol=0)


def test_gram_chunks_and_accumulates_in_float64():
    # 64 rows × 75,000 columns spans two float64 chunks of 2**22 / 64 columns.
    a, b = _randn(64, 300, 250, seed=3, dtype=torch.float32), _randn(5, 300, 250, seed=4, dtype=torch.float32)
    torch.testing.assert_close(F.gram(a, b), a.reshape(64, -1).double() @ b.reshape(5, -1).double().T,
                               rtol=1e-12, atol=1e-9)
    # float32 accumulation would lose the 1 under 1e8: (1e8 + 1) − 1e8 = 0 in float32.
    x = torch.tensor([[1e8, 1.0, -1e8]], dtype=torch.float32)
    assert F.gram(x, torch.ones(1, 3)).item() == 1.0
    assert F.gram(x.bfloat16(), torch.ones(1, 3, dtype=torch.bfloat16)).item() == 1.0  # bf16 1e8: ulp 2**19


def test_streamed_kernel_equals_full_kernel():
    """Σ_param gram(rows_param, weight=D_param) = G D Gᵀ with G the concatenated gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = dict(model.named_parameters())
    xs = _randn(5, 4, seed=5, dtype=torch.float32)
    rows = {n: [] for n in params}
    for x in xs:  # one backward per sequence: the brute-force per-sequence gradients
        model.zero_grad()
        model(x).logsumexp(-1).backward()
        for n, p in params.items():
            rows[n].append(p.grad.clone())
    rows = {n: torch.stack(r) for n, r in rows.items()}
    D = {n: _randn(*p.shape, seed=6 + i).abs() for i, (n, p) in enumerate(params.items())}
    K = sum(F.gram(rows[n], weight=D[n]) for n in params)
    G = torch.cat([rows[n].reshape(5, -1).double() for n in params], dim=1)
    Dv = torch.cat([D[n].reshape(-1) for n in params])
    torch.testing.assert_close(K, (G * Dv) @ G.T, rtol=1e-12, atol=1e-15)


def _stacked(layers: int, micro: list[int], seed: int = 0) -> tuple[F.StackedRows, dict[str, torch.Tensor]]:
    """``layers`` copies of a LoRA pair and a bias, their rows written microbatch by microbatch
    into a StackedRows as the capture hooks write them; and the same rows as plain tensors."""
    shapes = {"A": (4, 6), "B": (5, 4), "bias": (5,)}
    full = {f"l{layer}.{kind}": _randn(sum(micro), *shape, seed=seed + 31 * layer + len(kind), dtype=torch.float32)
            for layer in range(layers) for kind, shape in shapes.items()}
    rows = F.StackedRows({n: g.shape[1:] for n, g in full.items()}, sum(micro))
    start = 0
    for m in micro:
        for n, g in full.items():
            rows.destination(n, start, m).copy_(g[start:start + m])
        start += m
    return rows, full


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view  # a view launches nothing
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk", [2**25, 7])  # one chunk a shape; a few columns at a time
@pytest.mark.parametrize("micro", [[7], [3, 4]])
def test_stacked_rows_gram_and_dot_equal_the_per_parameter_sums(monkeypatch, chunk, micro):
    monkeypatch.setattr(F, "_STACK_CHUNK", chunk)
    rows, full = _stacked(3, micro)
    D = {n: _randn(*g.shape[1:], seed=100 + i).abs() for i, (n, g) in enumerate(full.items())}
    v = {n: _randn(*g.shape[1:], seed=200 + i) for i, (n, g) in enumerate(full.items())}
    assert len(rows.blocks) == 3 and sorted(rows) == sorted(full) and len(rows) == 9
    for n, g in full.items():
        assert torch.equal(rows[n], g)
    torch.testing.assert_close(rows.gram(), sum(F.gram(g) for g in full.values()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.gram(D), sum(F.gram(g, weight=D[n]) for n, g in full.items()),
                               rtol=1e-12, atol=1e-12)
    want = sum(F.gram(g[2:], v[n].unsqueeze(0), weight=D[n])[:, 0] for n, g in full.items())
    torch.testing.assert_close(rows.dot(v, slice(2, None), D), want, rtol=1e-12, atol=1e-12)
    assert rows.dot(v, slice(7, None)).shape == (0,)
    with pytest.raises(ValueError, match="past the 7 held"):
        rows.destination("l0.A", 5, 3)


def test_stacked_rows_launch_per_shape_not_per_parameter():
    """The Gram and the contraction with a vector cost their launches per shape, not per
    parameter (10× the layers: the same count), which is what a GPU pays for these small ops."""
    launches = []
    for layers in (4, 40):
        rows, full = _stacked(layers, [7])
        v = {n: torch.ones(g.shape[1:]) for n, g in full.items()}
        with _Ops() as gram_ops:
            rows.gram()
        with _Ops() as dot_ops:
            rows.dot(v)
        launches.append((gram_ops.n, dot_ops.n))
    assert launches[0] == launches[1], launches
    assert launches[0][0] <= 1 + 3 * 4 and launches[0][1] <= 1 + 3 * 6, launches


# ---------------------------------------------------------------- Adam preconditioner


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_matches_manual_second_moment(amsgrad):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = dict(model.named_parameters())
    beta2, eps = 0.99, 1e-8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, beta2), eps=eps,
                            weight_decay=0.01, amsgrad=amsgrad)
    assert F.adam_preconditioner(opt, params) is None
    v = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    vmax = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for step in range(3):
        opt.zero_grad()
        model(_randn(6, 4, seed=10 + step, dtype=torch.float32)).pow(2).sum().backward()
        if step == 0:
            assert F.adam_preconditioner(opt, params) is None  # gradients but no step yet
        for n, p in params.items():
            v[n] = beta2 * v[n] + (1 - beta2) * p.grad.double() ** 2
            vmax[n] = torch.maximum(vmax[n], v[n])
        opt.step()
    D = F.adam_preconditioner(opt, params)
    assert set(D) == set(params)
    for n in params:
        vh = (vmax if amsgrad else v)[n] / (1 - beta2**3)
        assert D[n].dtype == torch.float64
        torch.testing.assert_close(D[n], 1 / (vh.sqrt() + eps), rtol=1e-5, atol=0)
    # a float step (older torch, or a loaded state) gives the same D
    for p in params.values():
        opt.state[p]["step"] = float(opt.state[p]["step"])
    D2 = F.adam_preconditioner(opt, params)
    for n in params:
        torch.testing.assert_close(D2[n], D[n], rtol=0, atol=0)
    # a parameter the optimizer never stepped, next to ones it did: refused, by name
    with pytest.raises(ValueError, match="extra"):
        F.adam_preconditioner(opt, {**params, "extra": torch.nn.Parameter(torch.zeros(2))})


# ---------------------------------------------------------------- sketch: the projection


def test_sketch_is_deterministic_and_independent_of_rows():
    x = _randn(5, 3, 50, seed=20)
    s1, s2 = F.GaussianSketch(7, 16), F.GaussianSketch(7, 16)  # a fresh instance: another rank
    assert torch.equal(s1.matrix("m.w", 150), s2.matrix("m.w", 150))
    p5 = s1.project("m.w", x)
    assert p5.shape == (5, 16) and p5.dtype == torch.float64
    assert torch.equal(p5, s1.project("m.w", x))
    torch.testing.assert_close(s2.project("m.w", x[:1]), p5[:1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2.project("m.w", x[3:]), p5[3:], rtol=1e-12, atol=1e-12)
    # another name or seed draws another R (correlation of two independent N(0,1) draws ≈ 0)
    for other in (s1.project("m.b", x), F.GaussianSketch(8, 16).project("m.w", x)):
        c = torch.corrcoef(torch.stack([other.flatten(), p5.flatten()]))[0, 1]
        assert abs(float(c)) < 0.3


def test_sketch_is_the_same_in_another_process():
    """No salted hash(): a child with another PYTHONHASHSEED projects to the same numbers."""
    code = ("import torch, json; from probes.functional.fisher import GaussianSketch as G; "
            "x = torch.arange(40, dtype=torch.float64).reshape(2, 20) / 7; "
            "print(json.dumps(G(11, 4).project('layers.0.lora_A.weight', x).flatten().tolist()))")
    here = F.GaussianSketch(11, 4).project("layers.0.lora_A.weight",
                                           torch.arange(40, dtype=torch.float64).reshape(2, 20) / 7)
    for hashseed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": hashseed}, timeout=120)
        assert out.returncode == 0, out.stderr
        assert torch.equal(torch.tensor(json.loads(out.stdout), dtype=torch.float64), here.flatten())


@pytest.mark.parametrize("generator", ["torch", "counter"])
def test_sketch_of_two_parameters_is_the_concatenated_projection(generator):
    """Σ_name project(name, rows) = [x_a, x_b] @ [R_a; R_b], across block boundaries."""
    s = F.GaussianSketch(3, 8, generator)
    da = 2 * F.BLOCK + 123  # two full blocks and a partial one
    xa, xb = _randn(2, da, seed=21), _randn(2, 3, 7, seed=22)
    got = s.project("a", xa) + s.project("b", xb)
    R = torch.cat([s.matrix("a", da), s.matrix("b", 21)])
    assert R.shape == (da + 21, 8)
    ref = torch.cat([xa, xb.reshape(2, -1)], dim=1) @ R
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # the blocks are distinct draws, not one block repeated
    assert not torch.equal(R[: F.BLOCK], R[F.BLOCK : 2 * F.BLOCK])
    # float32 rows (the capture engine's dtype) agree to float32 rounding
    torch.testing.assert_close(s.project("a", xa.float()), s.project("a", xa), rtol=1e-4, atol=1e-3)


def test_sketch_draws_r_where_the_rows_are(monkeypatch):
    """Off the CPU R comes from the counter-based generator on the rows' device (no host draw, no
    copy); on the CPU from torch's stream; both are the same R in every process."""
    devices = []
    real = F.counter_normals
    monkeypatch.setattr(F, "counter_normals", lambda key, n, device: devices.append(device) or real(key, n, device))
    assert F.GaussianSketch(3, 8).project("w", torch.zeros(2, 10, device="meta")).device.type == "meta"
    assert devices == [torch.device("meta")]
    F.GaussianSketch(3, 8).project("w", torch.zeros(2, 10))
    assert len(devices) == 1
    with pytest.raises(ValueError, match="generator must be torch or counter"):
        F.GaussianSketch(3, 8, "philox")


# ---------------------------------------------------------------- sketch: statistics

TRIALS = 4000  # relative SE of a variance estimate ≈ √(2/N) ≈ 2.2%: 10% is > 4 SE
DIM, K = 300, 64


@pytest.mark.parametrize("generator", ["torch", "counter"])
def test_sketch_inner_products_are_unbiased_with_the_stated_variance(generator):
    a = _randn(DIM, seed=30)
    r = _randn(DIM, seed=31)
    orth = r - (r @ a) / (a @ a) * a + 0.02 * a  # nearly orthogonal to a
    corr = 0.8 * a + 0.6 * _randn(DIM, seed=32)  # cosine ≈ 0.8
    X = torch.stack([a, orth, corr])
    pairs = [(0, 1), (0, 2), (0, 0)]
    exact = X @ X.T
    err = torch.empty(TRIALS, len(pairs), dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny matmuls: thread hand-offs would dominate
    try:
        for t in range(TRIALS):
            S = F.GaussianSketch(t, K, generator).project("w", X)
            est = S @ S.T
            err[t] = torch.stack([est[i, j] - exact[i, j] for i, j in pairs])
    finally:
        torch.set_num_threads(threads)
    assert abs(float(exact[0, 1])) < 0.05 * float(exact[0, 0])  # the "orthogonal" pair is
    for c, (i, j) in enumerate(pairs):
        e = err[:, c]
        se = float(e.std()) / math.sqrt(TRIALS)
        assert abs(float(e.mean())) < 4 * se, (i, j, float(e.mean()), se)
        var = F.sketch_variance(exact[i, i], exact[j, j], exact[i, j], K)
        assert abs(float(e.var()) / float(var) - 1) < 0.10, (i, j, float(e.var()), float(var))


# ---------------------------------------------------------------- sketch: memory

_MEMORY = """
import json, time, torch
torch.set_num_threads(1)
from probes.functional.fisher import GaussianSketch
rows = torch.randn(2, 2**22, generator=torch.Generator().manual_seed(0))
s = GaussianSketch(0, 256)
def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))
# Not ru_maxrss: Linux carries the forked parent's peak (the test process, GBs) across exec.
# VmHWM is this image's own peak; "5" to clear_refs resets it to the current RSS.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, t0 = status_kib("VmRSS"), time.perf_counter()
out = s.project("model.layers.0.mlp.lora_A.weight", rows)
seconds = time.perf_counter() - t0
peak = status_kib("VmHWM")
norm_ratio = ((out ** 2).sum(1) / (rows.double() ** 2).sum(1)).tolist()
print(json.dumps({"growth_kib": peak - before, "seconds": seconds, "norm_ratio": norm_ratio}))
"""


def test_sketch_of_a_4m_parameter_never_holds_the_dense_projection():
    """d = 2**22, k = 256: a dense float32 R would be 4 GiB; the peak RSS must grow < 512 MiB.
    A child process, so that earlier tests' peaks do not hide this one's."""
    out = subprocess.run([sys.executable, "-c", _MEMORY], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["growth_kib"] < 512 * 1024, res
    # the whole vector was projected: |s|²/|g|² ≈ 1 ± √(2/k) = ±0.09
    assert all(abs(r - 1) < 0.45 for r in res["norm_ratio"]), res


# ---------------------------------------------------------------- Kronecker sketch (mode sketch)


def test_kronecker_sketch_from_tokens_is_the_sketch_of_the_formed_gradient():
    """Σ_t (R_outᵀδ_t)(R_inᵀx_t)ᵀ = R_outᵀ (Σ_t δ_t x_tᵀ) R_in, per row; the same R in a fresh
    instance (another rank) and another R under another seed or name."""
    x, d = _randn(3, 5, 7, seed=40, dtype=torch.float32), _randn(3, 5, 4, seed=41, dtype=torch.float32)
    G = torch.einsum("bto,bti->boi", d, x)
    s = F.KroneckerSketch(9, 3, 2)
    got = s.project_tokens("m.weight", x, d)
    assert got.shape == (3, 6) and got.dtype == torch.float64 and s.dim(G.shape[1:]) == 6
    torch.testing.assert_close(got, s.project("m.weight", G), rtol=1e-5, atol=1e-6)
    R_out, R_in = s.factor("m.weight", "out", 4), s.factor("m.weight", "in", 7)
    torch.testing.assert_close(got, (R_out.T @ G @ R_in).reshape(3, -1).double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(F.KroneckerSketch(9, 3, 2).project_tokens("m.weight", x, d), got)
    assert not torch.allclose(F.KroneckerSketch(10, 3, 2).project_tokens("m.weight", x, d), got)
    assert not torch.allclose(s.project_tokens("n.weight", x, d), got)
    bias = s.project("m.bias", d.sum(1))  # a bias: R_out alone
    torch.testing.assert_close(bias, (d.sum(1) @ s.factor("m.bias", "out", 4)).double())
    # written in place (the probe's rows): the same values, in float32, in the given rows
    held = torch.zeros(2, 4, 6)
    assert s.project_tokens("m.weight", x, d, out=held[1, :3]).data_ptr() == held[1].data_ptr()
    assert torch.equal(held[1, :3].double(), got) and not held[0].any() and not held[1, 3].any()
    torch.testing.assert_close(s.project("m.weight", G, out=held[0, 1:]).double(), s.project("m.weight", G))
    torch.testing.assert_close(s.project("m.bias", d.sum(1), out=torch.empty(3, 3)).double(), bias)


def test_kronecker_factors_prepared_at_once_are_the_lazy_ones_in_one_storage():
    """The probe draws a step's factors up front, so that a GPU gets them in one copy: the same
    R as drawn one at a time in the hooks (the same sketch on every rank either way)."""
    shapes = {"a.weight": (4, 7), "b.weight": (5, 4), "b.bias": (5,)}
    ready, lazy = F.KroneckerSketch(3, 3, 2), F.KroneckerSketch(3, 3, 2)
    ready.prepare(shapes, "cpu")
    got = [ready.factor(n, side, d) for n, shape in shapes.items() for side, d in zip(("out", "in"), shape)]
    want = [lazy.factor(n, side, d) for n, shape in shapes.items() for side, d in zip(("out", "in"), shape)]
    assert len(got) == 5 and all(torch.equal(g, w) for g, w in zip(got, want))
    assert len({g.untyped_storage().data_ptr() for g in got}) == 1
    x, d = _randn(2, 3, 7, seed=1, dtype=torch.float32), _randn(2, 3, 4, seed=2, dtype=torch.float32)
    assert torch.equal(ready.project_tokens("a.weight", x, d), lazy.project_tokens("a.weight", x, d))


def test_kronecker_sketch_inner_products_are_unbiased_with_the_stated_variance():
    """Over TRIALS seeds, ⟨s_A, s_B⟩ − ⟨A, B⟩ has mean 0 (4 SE) and ``kronecker_variance``
    (10 %), for correlated, unrelated and equal weight pairs, with unequal k_out and k_in."""
    A = _randn(30, 20, seed=50)
    B = 0.7 * A + 0.7 * _randn(30, 20, seed=51)
    C = _randn(30, 20, seed=52)
    X = torch.stack([A, B, C])
    exact = X.reshape(3, -1) @ X.reshape(3, -1).T
    pairs, k_out, k_in = [(0, 1), (0, 2), (0, 0)], 8, 4
    err = torch.empty(TRIALS, len(pairs), dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in range(TRIALS):
            S = F.KroneckerSketch(t, k_out, k_in).project("w", X)
            est = S @ S.T
            err[t] = torch.stack([est[i, j] - exact[i, j] for i, j in pairs])
    finally:
        torch.set_num_threads(threads)
    for c, (i, j) in enumerate(pairs):
        e = err[:, c]
        assert abs(float(e.mean())) < 4 * float(e.std()) / math.sqrt(TRIALS), (i, j)
        var = F.kronecker_variance(X[i], X[j], k_out, k_in)
        assert abs(float(e.var()) / var - 1) < 0.10, (i, j, float(e.var()), var)
    # Transposing swaps the factors and leaves the variance: this takes the formula's other branch.
    assert F.kronecker_variance(A.T, B.T, k_in, k_out) == pytest.approx(F.kronecker_variance(A, B, k_out, k_in), rel=1e-12)
    # A dense sketch of the same k_out·k_in columns has less variance: the price of never forming G.
    assert F.sketch_variance(exact[0, 0], exact[1, 1], exact[0, 1], k_out * k_in) < F.kronecker_variance(A, B, k_out, k_in)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_kronecker_sketch_of_a_large_layer_never_forms_its_gradient():
    """A 4096 × 4096 weight (16.8 M parameters) seen through 4 rows × 32 tokens: a dense
    projection to 64 × 64 columns would hold 16.8 M × 4096 numbers and the row gradients 67 M;
    the largest tensor the Kronecker sketch makes is a factor (4096 × 64) or the inputs."""
    x = _randn(4, 32, 4096, seed=60, dtype=torch.float32)
    d = _randn(4, 32, 4096, seed=61, dtype=torch.float32)
    s = F.KroneckerSketch(0, 64, 64)
    with _LargestTensor() as largest:
        out = s.project_tokens("layers.0.mlp.down_proj.weight", x, d)
    assert out.shape == (4, 64 * 64)
    assert largest.numel <= x.numel(), largest.numel


# ---------------------------------------------------------------- kernel summaries


def test_kernel_summary_by_hand():
    K = torch.tensor([[4.0, 1, 0, -1], [1, 3, 2, 0], [0, 2, 5, 1], [-1, 0, 1, 2]])
    s = F.kernel_summary(K, torch.tensor([0, 0, 1, 1]))
    # off-diagonal pairs: (0,1)=1 (0,2)=0 (0,3)=-1 (1,2)=2 (1,3)=0 (2,3)=1, each twice
    assert s["diag_mean"] == pytest.approx(3.5)
    assert s["offdiag_mean"] == pytest.approx(6 / 12)
    assert s["offdiag_abs_mean"] == pytest.approx(10 / 12)
    assert s["same_prompt_mean"] == pytest.approx(1.0)  # (0,1), (2,3)
    assert s["diff_prompt_mean"] == pytest.approx(0.25)  # (0,2) (0,3) (1,2) (1,3)
    s = F.kernel_summary(K, torch.tensor([0, 1, 2, 3]))
    assert math.isnan(s["same_prompt_mean"]) and s["diff_prompt_mean"] == pytest.approx(0.5)


def test_spectrum_by_hand():
    # eigenvalues 3, 1 (the [[2,1],[1,2]] block), 1, 0
    K = torch.tensor([[2.0, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    s = F.spectrum(K, top=2)
    assert s["top"] == pytest.approx([3.0, 1.0])
    assert s["min"] == pytest.approx(0.0, abs=1e-12)
    p = [0.6, 0.2, 0.2]
    assert s["effective_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert s["participation_ratio"] == pytest.approx(25 / 11)
    flat = F.spectrum(torch.eye(5) * 2, top=10)  # equal eigenvalues: both measures = 5
    assert flat["effective_rank"] == pytest.approx(5) and flat["participation_ratio"] == pytest.approx(5)
    assert len(flat["top"]) == 5


def test_cross_summary_by_hand():
    s = F.cross_summary(torch.tensor([[1.0, -2, 3], [3, 0, -1]]))
    assert s["mean"] == pytest.approx(4 / 6) and s["abs_mean"] == pytest.approx(10 / 6)
    torch.testing.assert_close(s["column_mean"], torch.tensor([2.0, -1, 1], dtype=torch.float64))


def test_kronecker_variance_matrix_adds_weights_and_biases():
    W, b = _randn(3, 5, 4, seed=70), _randn(3, 5, seed=71)
    var = F.kronecker_variance_matrix({"w": W, "b": b}, 3, 2, n=2)
    for i in range(2):
        for j in range(2):
            want = F.kronecker_variance(W[i], W[j], 3, 2) + F.sketch_variance(b[i] @ b[i], b[j] @ b[j], b[i] @ b[j], 3)
            assert float(var[i, j]) == pytest.approx(float(want), rel=1e-12)
