"""Fisher kernel K(t,t') = ⟨∇S(t), ∇S(t')⟩ over the trainable parameters (S: sequence log-prob).

Per-sequence gradients arrive parameter by parameter as rows [n, *param.shape] (the capture
engine), so K = Σ_param gram(rows_param) and no [n × total params] matrix is built; the probe
holds them stacked by shape (``StackedRows``) and sums a shape's parameters in one batched matmul.
With Adam, the preconditioned kernel ⟨D∇S(t), ∇S(t')⟩ carries D = 1/(√v̂ + ε) ONCE, as the
update direction does (D on both sides would precondition twice).

Across ranks the exact rows are too large to gather, so each rank sketches them: s = Rᵀg with
R ∈ R^{d×k}, entries N(0, 1/k), drawn from the seed block by block (TRAK's habit) and never
held dense. ⟨s_a, s_b⟩ is unbiased for ⟨a, b⟩ with variance (|a|²|b|² + ⟨a,b⟩²)/k.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping

import torch

from rl_training.counter_rng import counter_normals

# Rows of R drawn per generator seeding. Part of the sketch's definition (changing it changes
# R), and bounds the extra memory of ``project`` to BLOCK·k numbers.
BLOCK = 2**14
# Columns per float64 chunk in ``gram``: bounds its float64 copies to ~32 MiB.
_GRAM_CHUNK = 2**22
# Elements per float64 chunk of ``StackedRows``: 256 MiB, small beside the rows it reads (GBs where
# it matters) and few launches (the user's 74 M LoRA parameters × 16 rows: 35 chunks).
_STACK_CHUNK = 2**25


def gram(a: torch.Tensor, b: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """[na, nb] float64: K[i, j] = Σ_p a[i,p]·w[p]·b[j,p] over the flattened parameter.

    b defaults to a; weight is the diagonal preconditioner D (once). Chunked and cast per chunk,
    so float32/bf16 rows accumulate in float64 without a float64 copy of the whole rows.
    """
    A = a.reshape(a.shape[0], -1)
    B = A if b is None else b.reshape(b.shape[0], -1)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"gram: rows of {tuple(a.shape[1:])} and {tuple(b.shape[1:])} differ")
    w = None if weight is None else weight.reshape(-1)
    if w is not None and w.numel() != A.shape[1]:
        raise ValueError(f"gram: weight of {tuple(weight.shape)} for rows of {tuple(a.shape[1:])}")
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    step = max(1, _GRAM_CHUNK // max(A.shape[0], B.shape[0], 1))
    for s in range(0, A.shape[1], step):
        xa = A[:, s : s + step].double()
        if w is not None:
            xa = xa * w[s : s + step].to(xa.device, torch.float64)
        out += xa @ B[:, s : s + step].double().T
    return out


class StackedRows(Mapping):
    """Per-sequence gradients {parameter: [n, *shape]} held as one [m, n, *shape] float32 block
    per shape (the same projection of every layer), so that a sum over the parameters costs a few
    kernels a shape, not a few a parameter: on a GPU such small ops cost their launches (the
    user's LoRA has 392 parameters and at most 14 shapes). ``rows[name]`` is a view into its
    block. The blocks are allocated up front and filled in place (``destination``: the capture
    hooks' matmuls write there), so holding n rows costs their size and nothing more."""

    def __init__(self, shapes: Mapping[str, tuple], n: int, device: torch.device | str = "cpu"):
        by_shape: dict[tuple, list[str]] = {}
        for name, shape in shapes.items():
            by_shape.setdefault(tuple(shape), []).append(name)
        self.n = n
        self.blocks: list[tuple[list[str], torch.Tensor]] = []
        self._where: dict[str, tuple[int, int]] = {}
        for shape, names in by_shape.items():
            for i, name in enumerate(names):
                self._where[name] = (len(self.blocks), i)
            self.blocks.append((names, torch.empty(len(names), n, *shape, device=device)))

    def destination(self, name: str, start: int, rows: int) -> torch.Tensor:
        """The view [rows, *shape] of ``name``'s rows start … start + rows, to be written."""
        if start + rows > self.n:
            raise ValueError(f"rows {start}…{start + rows} of {name} past the {self.n} held")
        return self[name][start:start + rows]

    def __getitem__(self, name: str) -> torch.Tensor:
        b, i = self._where[name]
        return self.blocks[b][1][i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def gram(self, weight: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[n, n] float64: Σ_param ``gram(rows[param], weight=weight[param])`` (D once)."""
        out = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.blocks[0][1].device)
        for X, w in self._chunks(weight):
            xw = X if w is None else X * w[:, None, :]
            out += torch.bmm(xw, X.transpose(1, 2)).sum(0)
        return out

    def dot(self, vectors: Mapping[str, torch.Tensor], rows: slice = slice(None),
            weight: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[rows] float64: Σ_param ⟨D v_param, g_param,j⟩ for the rows j in ``rows``."""
        first = self.blocks[0][1][:, rows]
        out = torch.zeros(first.shape[1], dtype=torch.float64, device=first.device)
        for X, v in self._chunks(vectors, rows, weight):
            out += torch.bmm(X, v[:, :, None]).sum(0)[:, 0]
        return out

    def _chunks(self, per_param: Mapping[str, torch.Tensor] | None, rows: slice = slice(None),
                weight: Mapping[str, torch.Tensor] | None = None):
        """(X [m, n, c] float64, the per-parameter vectors [m, c] float64 × weight, or None) over
        every block, c columns at a time."""
        for names, block in self.blocks:
            X = block[:, rows].reshape(len(names), -1, math.prod(block.shape[2:]))
            V = None if per_param is None else torch.stack([per_param[n].reshape(-1) for n in names])
            if V is not None and weight is not None:
                V = V.double() * torch.stack([weight[n].reshape(-1) for n in names]).to(V.device, torch.float64)
            step = max(1, _STACK_CHUNK // max(X.shape[0] * X.shape[1], 1))
            for s in range(0, X.shape[2], step):
                yield X[:, :, s:s + step].double(), None if V is None else V[:, s:s + step].to(X.device, torch.float64)


def adam_preconditioner(optimizer: torch.optim.Optimizer,
                        params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor] | None:
    """name -> D = 1/(√v̂ + ε) (float64, param's shape), v̂ = v/(1 − β2^step); None before a step.

    D is the denominator of Adam's update without lr and momentum (amsgrad: its running max of
    v). Apply it ONCE, as gram(a, b, weight=D) = ⟨D a, b⟩: never D on both sides.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out, missing = {}, []
    for name, p in params.items():
        st = optimizer.state.get(p) or {}
        if "exp_avg_sq" not in st or id(p) not in group_of:
            missing.append(name)
            continue
        g = group_of[id(p)]
        beta2, eps = float(g["betas"][1]), float(g["eps"])
        v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
        vhat = v.detach().double() / (1 - beta2 ** float(st["step"]))  # step: tensor or float
        out[name] = 1.0 / (vhat.sqrt() + eps)
    if missing and out:
        raise ValueError(f"adam_preconditioner: no Adam state for {missing[:3]} (others have one)")
    return out or None


def _block_seed(seed: int, name: str, block: int) -> int:
    """63-bit seed of one block of R: the same in every process (sha256, not the salted hash())."""
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class GaussianSketch:
    """s = Rᵀ g, R_name ∈ R^{d×k} with entries N(0, 1/k), drawn in BLOCK-row blocks.

    Block j of R_name comes from a generator seeded with (seed, name, j), so R depends only on
    (seed, name, d) and the generator, not on n, the call, or the process; the sketch of a full
    gradient is Σ_name project(name, rows_name). Extra memory O(BLOCK·k). Output float64 [n, k].

    Generator (``generator``, default by the rows' device): on a CPU ``torch``'s CPU normal
    stream (the same on every machine up to ~1 ulp between ISA levels, far below the sketch's
    noise; d·k normals at ~0.2 G/s per core); elsewhere ``counter``, the counter-based normals of
    ``counter_normals`` computed where the rows are: the d·k normals cost a GPU milliseconds where
    the CPU stream cost seconds a due step (2.2 M LoRA parameters × k 512 ≈ 5 s) plus a copy a
    block, and unlike CUDA's Philox (whose element order follows the launch grid, sized by the SM
    count) they do not depend on the GPU model. The ranks of a job hold their rows on one device
    type, so they draw the same R.
    """

    def __init__(self, seed: int, k: int, generator: str | None = None):
        if k < 1:
            raise ValueError(f"GaussianSketch: k must be ≥ 1, got {k}")
        if generator not in (None, "torch", "counter"):
            raise ValueError(f"GaussianSketch: generator must be torch or counter, got {generator}")
        self.seed, self.k, self.generator = int(seed), int(k), generator

    def _normal(self, name: str, block: int, rows: int, device: torch.device) -> torch.Tensor:
        """[rows, k] float32 standard normals of block `block` of R_name (before the 1/√k), on ``device``."""
        seed = _block_seed(self.seed, name, block)
        if (self.generator or ("torch" if device.type == "cpu" else "counter")) == "counter":
            return counter_normals(seed, rows * self.k, device).view(rows, self.k)
        return torch.randn(rows, self.k, generator=torch.Generator().manual_seed(seed)).to(device)

    def project(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """[n, *shape] -> [n, k] float64 on the rows' device: rows (flattened, row-major) times R_name."""
        x = rows.detach().reshape(rows.shape[0], -1)
        # float64 rows keep float64 products (exact checks); others multiply in float32, whose
        # rounding (~1e-7) is far below the sketch's 1/√k noise.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.zeros(x.shape[0], self.k, dtype=torch.float64, device=x.device)
        for j, s in enumerate(range(0, x.shape[1], BLOCK)):
            e = min(s + BLOCK, x.shape[1])
            z = self._normal(name, j, e - s, x.device).to(dtype)
            out += (x[:, s:e].to(dtype) @ z).double()
        return out / math.sqrt(self.k)

    def matrix(self, name: str, d: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense R_name [d, k] float64, from the same blocks as ``project`` on ``device`` (small d: tests)."""
        device = torch.device(device)
        blocks = [self._normal(name, j, min(BLOCK, d - s), device) for j, s in enumerate(range(0, d, BLOCK))]
        return torch.cat(blocks).double() / math.sqrt(self.k)


class KroneckerSketch:
    """s(G) = R_outᵀ G R_in ∈ R^{k_out × k_in} per Linear weight G [out, in] (flattened), with
    R_out [out, k_out] and R_in [in, k_in] of N(0, 1/k_out) and N(0, 1/k_in) entries drawn from
    (seed, name, side) by the CPU generator (the same R on every machine), cached per device.

    A sequence's weight gradient is Σ_t δ_t x_tᵀ, so its sketch Σ_t (R_outᵀ δ_t)(R_inᵀ x_t)ᵀ comes
    straight from the capture hooks' x and δ (``project_tokens``) without forming the gradient:
    memory O((out + in)·k + rows·k_out·k_in) and time O(tokens·(out·k_out + in·k_in)), where a
    dense sketch needs the [rows × out·in] gradients and out·in·k normals. The price is variance:
    ⟨s_A, s_B⟩ is unbiased for ⟨A, B⟩ with ``kronecker_variance``, above a dense sketch's of the
    same k_out·k_in columns. A bias (1-D) is sketched by R_out alone (``sketch_variance``).
    """

    def __init__(self, seed: int, k_out: int, k_in: int):
        if k_out < 1 or k_in < 1:
            raise ValueError(f"KroneckerSketch: k_out and k_in must be ≥ 1, got {k_out}, {k_in}")
        self.seed, self.k_out, self.k_in = int(seed), int(k_out), int(k_in)
        self._cache: dict[tuple, torch.Tensor] = {}

    def factor(self, name: str, side: str, d: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """R_side [d, k_side] float32 (side: "out" | "in") on ``device``."""
        key = (name, side, d, str(torch.device(device)))
        if key not in self._cache:
            self._cache[key] = self._draw(name, side, d).to(device)
        return self._cache[key]

    def prepare(self, shapes: Mapping[str, tuple], device: torch.device | str) -> None:
        """Every factor of these parameters drawn now and moved to ``device`` in ONE copy: drawn
        one at a time in the hooks, each would be a host-to-device copy of its own (784 a due
        step at the user's shape)."""
        keys, host = [], []
        for name, shape in shapes.items():
            for side, d in zip(("out", "in"), shape):
                key = (name, side, d, str(torch.device(device)))
                if key not in self._cache:
                    keys.append(key)
                    host.append(self._draw(name, side, d))
        if host:
            flat = torch.cat([h.reshape(-1) for h in host]).to(device)
            for key, part, h in zip(keys, flat.split([h.numel() for h in host]), host):
                self._cache[key] = part.view_as(h)

    def _draw(self, name: str, side: str, d: int) -> torch.Tensor:
        """R_side [d, k_side] float32 on the CPU, from (seed, name, side): the same on every machine."""
        k = self.k_out if side == "out" else self.k_in
        gen = torch.Generator().manual_seed(_block_seed(self.seed, f"{name}/{side}", 0))
        return torch.randn(d, k, generator=gen) / math.sqrt(k)

    def dim(self, shape: torch.Size | tuple) -> int:
        """Sketch columns of a parameter of ``shape`` (a weight [out, in] or a bias [out])."""
        return self.k_out * self.k_in if len(shape) == 2 else self.k_out

    def project_tokens(self, name: str, x: torch.Tensor, delta: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, k_out·k_in] float64 sketches of Σ_t δ_t x_tᵀ per row, from x [rows, T, in] and
        δ [rows, T, out] (padding positions have δ = 0); with ``out`` (float32 [rows, k_out·k_in],
        contiguous) written there in float32 instead, and returned."""
        R_out = self.factor(name, "out", delta.shape[-1], delta.device)
        R_in = self.factor(name, "in", x.shape[-1], x.device)
        u, v = delta.float() @ R_out, x.float() @ R_in  # [rows, T, k_out], [rows, T, k_in]
        if out is not None:
            return torch.bmm(u.transpose(1, 2), v, out=out.view(x.shape[0], self.k_out, self.k_in)).view_as(out)
        return torch.bmm(u.transpose(1, 2), v).reshape(x.shape[0], -1).double()

    def project(self, name: str, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, dim] float64 sketches of formed rows: weights [n, out, in], biases [n, out]; with
        ``out`` (float32 [n, dim]) written there in float32 instead, and returned."""
        g = rows.detach().float()
        R_out = self.factor(name, "out", g.shape[1], g.device)
        if g.dim() == 2:
            s = torch.matmul(g, R_out, out=out)
        else:
            R_in = self.factor(name, "in", g.shape[2], g.device)
            s = (R_out.T @ g @ R_in).reshape(g.shape[0], -1)
            if out is not None:
                s = out.copy_(s)
        return s if out is not None else s.double()


def kronecker_variance(A: torch.Tensor, B: torch.Tensor, k_out: int, k_in: int) -> float:
    """Var(⟨s_A, s_B⟩ − ⟨A, B⟩) of ``KroneckerSketch`` for weights A, B [out, in].

    With P = RRᵀ (E P = I, E[P M P] = M + (Mᵀ + tr M·I)/k for a d×k Gaussian R of variance 1/k)
    and Y = BᵀA: ⟨s_A, s_B⟩ = tr(P_out A P_in Bᵀ), so by the law of total variance
    Var = E[tr(XXᵀ) + tr(X²)]/k_out + (tr(YYᵀ) + tr(Y²))/k_in with X = A P_in Bᵀ, and
    E tr(XXᵀ) = |ABᵀ|²(1 + 1/k_in) + |A|²|B|²/k_in, E tr(X²) = tr(Y²) + (|Y|² + ⟨A, B⟩²)/k_in.
    """
    A, B = A.double(), B.double()
    if A.shape[0] < A.shape[1]:  # the same traces through [out, out] products: cheaper for LoRA's A
        Z = A @ B.T
        yy, y2, ab = float(((A @ A.T) * (B @ B.T)).sum()), float((Z * Z.T).sum()), float(Z.trace())
        abt = float(Z.pow(2).sum())
    else:
        Y = B.T @ A
        yy, y2, ab = float((Y * Y).sum()), float((Y * Y.T).sum()), float(Y.trace())
        abt = float(((A.T @ A) * (B.T @ B)).sum())
    a2, b2 = float(A.pow(2).sum()), float(B.pow(2).sum())
    e_xx = abt * (1 + 1 / k_in) + a2 * b2 / k_in
    e_x2 = y2 + (yy + ab * ab) / k_in
    return (e_xx + e_x2) / k_out + (yy + y2) / k_in


def kronecker_variance_matrix(rows: dict[str, torch.Tensor], k_out: int, k_in: int, n: int) -> torch.Tensor:
    """[n, n] float64 Var of every entry of the mode-sketch kernel of the first n exact rows
    {parameter: [rows, *shape]}: R is independent per parameter, so the variances add (a bias,
    sketched by R_out alone, with ``sketch_variance``)."""
    var = torch.zeros(n, n, dtype=torch.float64)
    for G in rows.values():
        for i in range(n):
            for j in range(i, n):
                if G.dim() == 3:
                    v = kronecker_variance(G[i], G[j], k_out, k_in)
                else:
                    a, b = G[i].double(), G[j].double()
                    v = float(sketch_variance(a @ a, b @ b, a @ b, k_out))
                var[i, j] = var[j, i] = var[i, j] + v
    return var


def sketch_variance(a2, b2, ab, k: int):
    """Var(⟨s_a, s_b⟩ − ⟨a, b⟩) = (|a|²|b|² + ⟨a,b⟩²)/k for a Gaussian sketch (floats or tensors)."""
    return (a2 * b2 + ab * ab) / k


def kernel_summary(K: torch.Tensor, prompt: torch.Tensor) -> dict[str, float]:
    """Means of K's diagonal, off-diagonal (signed, |·|), and off-diagonal pairs of the same /
    different prompt id; nan where a set is empty."""
    K = K.detach().double()
    n = K.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=K.device)
    p = prompt.to(K.device)
    same = p[:, None] == p[None, :]

    def mean(mask: torch.Tensor, vals: torch.Tensor = K) -> float:
        return float(vals[mask].mean()) if bool(mask.any()) else float("nan")

    return {"diag_mean": float(K.diagonal().mean()) if n else float("nan"),
            "offdiag_mean": mean(off), "offdiag_abs_mean": mean(off, K.abs()),
            "same_prompt_mean": mean(off & same), "diff_prompt_mean": mean(~same)}


def spectrum(K: torch.Tensor, top: int) -> dict:
    """Eigenvalues of the symmetrised K, descending: ``top`` (the largest ``top``), ``min``,
    ``effective_rank`` = exp(entropy of λ/Σλ over λ > 0) (Roy & Vetterli) and
    ``participation_ratio`` = (Σλ)²/Σλ² over λ > 0 (negatives of a PSD K are rounding)."""
    S = K.detach().double()
    lam = torch.linalg.eigvalsh((S + S.T) / 2).flip(0)
    pos = lam[lam > 0]
    if pos.numel() == 0:
        eff = pr = float("nan")
    else:
        q = pos / pos.sum()
        eff = float(torch.exp(-(q * q.log()).sum()))
        pr = float(pos.sum() ** 2 / (pos * pos).sum())
    return {"top": lam[:top].tolist(), "min": float(lam[-1]), "effective_rank": eff,
            "participation_ratio": pr}


def cross_summary(K_eu: torch.Tensor) -> dict:
    """E×U cross kernel: mean, mean |·|, and ``column_mean`` [nU] float64 = mean_t K[t, j], how
    much a step along training sequence j's ∇S moves the evaluation log-probs on average."""
    K = K_eu.detach().double()
    return {"mean": float(K.mean()), "abs_mean": float(K.abs().mean()), "column_mean": K.mean(dim=0)}


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """The factor torch's ``clip_grad_norm_`` (ours, accelerate's) multiplies the gradient by:
    min(1, max_norm / (‖g‖ + 1e-6)); 1 when clipping is off (max_norm <= 0)."""
    return 1.0 if max_norm <= 0 else min(1.0, max_norm / (grad_norm + 1e-6))
