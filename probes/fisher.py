"""Fisher-kernel probe (kind ``fisher``): K(t,t') = ⟨∇S(t), ∇S(t')⟩ between the step's evaluation
and training sequences, and which training sequences move the entropy.

S is a sequence's log-probability under π_T, the gradient over the trainable LoRA parameters
at θ_k. At a due step, before the update, one probe-owned forward+backward of Σ_i S_i per
microbatch (eval mode; ``autograd.grad``, so ``.grad`` and DDP are untouched) hands every
sequence's gradient to the capture engine (``probes/capture.py``): the E-batch (shared with the
δH probe when the spec is the same: one generation) and U, this rank's training batch, kept
in one tensor per parameter shape that the hooks' matmuls write into (``StackedRows``). After the
update the blocks are formed a shape at a time (``probes/functional/fisher.py``), with the Adam
preconditioner D = 1/(√v̂+ε) of this step's update applied once if asked. On a GPU the probe's
small ops cost their launches: at the user's shape (392 LoRA modules, 16 rows) the exact kernel
launches 1.08× a plain forward+backward's kernels (the Gram 149 of them; a parameter at a time
it took 3,025, and 1.40×; ``bench/fisher_cost.py``).

Exact within a rank; across ranks each rank sends a seeded Gaussian sketch (k columns) of its
rows, and cross-rank entries are sketch inner products (variance (|a|²|b|² + ⟨a,b⟩²)/k). At one
rank everything is exact and nothing is sketched. R (d·k normals a due step) is drawn where the
rows are (``GaussianSketch``): on a CPU by torch's generator at ≈ 0.2 G normals/s, 2.3 s for
SmolLM2's LoRA r16 q/v at k = 512; on a GPU by a counter-based generator (the same R on any GPU
model), without a copy.

The contributions c_j below stay exact at any number of ranks: the E half runs after the step's
last training backward, in two parts with a sum over the ranks after each (``exchange`` stats in
two rounds, each one all_reduce at due steps, on the GPU where the rank computes): the E rows'
forward gives each rank's share of the surrogate's baseline totals ([3, L] per position), whose
sum makes the baseline of every rank's E rows, as at one process; then F (one vector the size of
the trainable parameters: 74 M float64, 592 MB, at the user's shape), whose sum each rank meets
its own training sequences with. Through
sketches instead, ⟨F_r', D∇S_j⟩ of two near-orthogonal vectors would carry noise ~|F||∇S_j|/√k,
far above the signal at LoRA's dimension.

Which training sequences move the entropy (DESIGN.md): with f_t the Rao–Blackwellised surrogate
of E-sequence t (``rb_surrogate``: its derivative along Δθ is the δH probe's per-sequence δH₁)
and F = Σ_t w_t ∇f_t over every rank's E rows (w_t: the pool-mean weights of the δH estimate), the loss gradient at PPO
ratio 1 is Σ_j −A_j ∇S_j/(N·L), so for an SGD step of size η on the gradient clipped by the
factor c (1 when not clipped), δH₁ = Σ_j c_j with c_j = η·c·A_j/(N·L)·⟨F, D∇S_j⟩. `pred` = ⟨F, Δθ⟩
with the real Δθ; `contrib_ratio` = Σ_j c_j / pred is 1 for SGD (and for Adam's first step
without weight decay, clipped or not), and otherwise says how much momentum, the KL term and
weight decay change the picture. `pred` equals the δH probe's δH₁ on the same E-batch (tested),
and `pred` and the c_j at several ranks equal one process's (tested at 2 ranks: 1e-5; a baseline
of each rank's own E rows, as before, moved Σ_j c_j by 0.1–0.9 %).

Memory: the rank's per-sequence gradients, (B_E/W + buffer/W) × trainable parameters in
float32, and F in float64, are held between the backward and the update. At the user's scale
(Qwen2.5-1.5B, LoRA r64 on 7 projections: 74 M parameters; 144 rows a rank) that is ≈ 43 GB:
use ``mode: sketch``.
There every sequence's gradient is sketched in the capture hooks from x_t and δ_t
(``KroneckerSketch``: R_outᵀ G R_in per weight, k_out·k_in columns, never forming G), and every
block, same-rank ones too, is a sketch inner product with variance Σ_param ``kronecker_variance``
(`exact_frac` 0); the sketches are written in place into float32 rows held like the exact ones
(one tensor per column count). The c_j stay exact there: the hooks of the training rows' pass
contract each sequence's x_t and δ_t with F (summed over the ranks by then), Σ_t δ_t·(F x_t),
two matmuls a module. Adam's D does not factor over that sketch: mode sketch needs
``preconditioner: none``.

Options: ``batch_size`` (B_E, default 8), ``completions_per_prompt`` (default 2), ``pool``
(eval | train), ``microbatch_size`` (default train.microbatch_size), ``preconditioner``
(none | adam, default adam), ``sketch_dim`` (k, default 512), ``top_eigenvalues`` (default 4),
``save`` (write run_dir/fisher/step_N.npz and step_N_top.json on rank 0, default true), ``mode``
(exact | sketch, default exact), ``sketch_factors`` ([k_out, k_in] of mode sketch, default
[16, 16]), ``sampler_correction`` (per_decision | none, default per_decision: F weights the E
rows' decisions from the sampler back to the evaluated π_θk, as the δH probe does).

| key | meaning |
|---|---|
| `n_E`, `n_U` | sequences in the E-batch and in the training batch (all ranks) |
| `exact_frac` | fraction of kernel entries computed exactly (1 at one rank; the rest are sketched) |
| `preconditioned` | 1 when D was applied (adam and the optimizer has state), else 0 |
| `uu_diag_mean`, `uu_offdiag_mean`, `uu_offdiag_abs_mean` | U×U: mean ⟨∇S_j, ∇S_j⟩, mean off-diagonal, and its mean \\|·\\| |
| `uu_same_prompt_mean`, `uu_diff_prompt_mean` | U×U off-diagonal means within a prompt group / across groups |
| `uu_eig_<i>`, `uu_effective_rank`, `uu_participation_ratio` | top eigenvalues of U×U, exp(spectral entropy), (Σλ)²/Σλ² |
| `ee_*` | the same summaries of E×E (prompt = pool index) |
| `eu_mean`, `eu_abs_mean` | the E×U cross kernel's mean and mean \\|·\\| |
| `pred` | ⟨F, Δθ⟩: δH₁ of the real update on the E-batch (per sequence) |
| `contrib_sum`, `contrib_up`, `contrib_down` | Σ_j c_j, and the sums of its positive and negative terms |
| `contrib_ratio` | contrib_sum / pred |
| `time_grad_s`, `time_kernel_s` | the probe's backward passes; blocks and sketches (slowest rank) |
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from probes.base import Probe, SetupContext, StepContext, is_last_microbatch
from probes.capture import LinearCapture
from probes.ebatch import EBatch, sampler_correction, spec_from_options
from probes.evaluation import probe_model
from probes.fisher_files import META, heatmap, write_results
from probes.functional import delta_h as DH
from probes.functional import fisher as F
from probes.manager import register
from rl_training import policy
from rl_training.errors import ConfigError
from rl_training.sampling import stable_seed

OPTIONS = {"batch_size", "completions_per_prompt", "pool", "microbatch_size", "preconditioner", "sketch_dim",
           "top_eigenvalues", "save", "mode", "sketch_factors", "sampler_correction"}
E_ROW, U_ROW = 0, 1  # row kinds: E-batch sequence, training sequence


@register
class FisherProbe(Probe):
    kind = "fisher"
    needs_param_snapshot = True

    def setup(self, ctx: SetupContext) -> None:
        self.check_options(OPTIONS)
        o, cfg = self.options, ctx.cfg
        self.spec = self.ebatch_spec = spec_from_options(o, batch_size=8)
        self.ebatches = ctx.ebatches
        self.ebatches.check(self.spec, f"probe '{self.name}'")
        self.precondition = str(o.get("preconditioner", "adam"))
        if self.precondition not in ("none", "adam"):
            raise ConfigError(f"probe '{self.name}': preconditioner must be none|adam, got {self.precondition!r}")
        self.k, self.top = int(o.get("sketch_dim", 512)), int(o.get("top_eigenvalues", 4))
        if self.k < 1 or self.top < 1:
            raise ConfigError(f"probe '{self.name}': sketch_dim and top_eigenvalues must be >= 1")
        self.mode = str(o.get("mode", "exact"))
        if self.mode not in ("exact", "sketch"):
            raise ConfigError(f"probe '{self.name}': mode must be exact|sketch, got {self.mode!r}")
        self.factors = tuple(int(k) for k in o.get("sketch_factors", [16, 16]))
        if len(self.factors) != 2 or min(self.factors) < 1:
            raise ConfigError(f"probe '{self.name}': sketch_factors must be [k_out, k_in] >= 1, got {self.factors}")
        if self.mode == "sketch" and self.precondition == "adam":
            raise ConfigError(f"probe '{self.name}': mode sketch cannot apply Adam's D (it does not factor over a "
                              f"Kronecker sketch); set preconditioner: none")
        self.sampler_correction = sampler_correction(o, self.name)
        self.micro = int(o.get("microbatch_size", cfg.train.microbatch_size))
        self.save = bool(o.get("save", True))
        self.cfg, self.world = cfg, ctx.world
        self.names = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
        self._shapes = {n: p.shape for n, p in ctx.model.named_parameters() if p.requires_grad}
        self._device = next(p.device for p in ctx.model.parameters() if p.requires_grad)
        self.capture = LinearCapture(ctx.model, set(self.names), on_rows=self._on_rows, rows_out=self._rows_out) \
            if self.mode == "exact" else LinearCapture(ctx.model, set(self.names), on_tokens=self._on_tokens)
        self._kron: F.KroneckerSketch | None = None  # mode sketch: the sketch of the pass under way
        self.stop_rule = ctx.ebatches.stop_rule(ctx.model)
        params = dict(ctx.model.named_parameters())
        # Summed between the last backward and the update, in two rounds: the per-position totals of
        # the E rows' baseline (every rank's rows make it, as at one process), then F over every
        # rank's E rows, built with that baseline. F is declared on the meta device (its size, no
        # storage): a due step sets it where it is computed, and a host default would hold 592 MB
        # (twice, with the reset's copy) at the user's shape.
        self.add_stat("E_totals", torch.zeros(3, cfg.rollout.max_new_tokens, dtype=torch.float64), reduce="exchange")
        self.add_stat("F", torch.zeros(sum(params[n].numel() for n in self.names), dtype=torch.float64,
                                       device="meta"), reduce="exchange", round=1)
        for key in ("local", "sketch", "meta", "texts", "contrib"):
            self.add_stat(key, reduce="cat")
        self.add_stat("pred")
        self.add_stat("preconditioned", reduce="min")
        self.add_stat("sketched", reduce="max")  # mode sketch: same-rank blocks are sketched too
        for key in ("time_grad_s", "time_kernel_s"):
            self.add_stat(key, reduce="max")
        self._stacked: F.StackedRows | None = None  # the rows (mode sketch: their sketches), written in place
        self._count: dict[str, int] = {}  # rows written per parameter
        self._row0 = 0  # the first row of the microbatch under capture
        self._F_all: dict[str, torch.Tensor] | None = None  # mode sketch, during the U pass: F of all ranks
        self._dots = torch.zeros(0, dtype=torch.float64)  # mode sketch: the microbatch's ⟨F, ∇S_j⟩
        self._e: dict | None = None  # the E half's result, from the last backward to the U half
        self._held: dict | None = None

    # -------------------------------------------------------------------------- hooks
    def on_after_backward(self, ctx: StepContext) -> None:
        """After the step's last training backward: the E half's first part, whose baseline
        totals the manager then sums over the ranks (exchange round 0)."""
        if ctx.epoch > 0 or not is_last_microbatch(ctx):
            return
        self._e = self.e_begin(ctx.model, self.ebatches.get(ctx.model, ctx.step, self.spec), len(ctx.batch), ctx.step)

    def on_exchanged(self, ctx: StepContext, round: int) -> None:
        """Round 0's totals summed: the E half's second part, whose F the manager then sums
        (round 1) before ``on_before_optimizer_step``."""
        if round == 0 and self._e is not None:
            self._e = self.e_end(ctx.model, self._e)

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.epoch > 0 or self._e is None:
            return
        e, self._e = self._e, None
        self._held = self.u_half(ctx.model, e, ctx.batch)
        norm = float(ctx.flat_grad()[1].pow(2).sum(dtype=torch.float64).sqrt())
        self._held["clip"] = F.clip_coefficient(norm, ctx.cfg.train.grad_clip)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.epoch > 0 or self._held is None:
            return
        held, self._held = self._held, None
        D = F.adam_preconditioner(ctx.optimizer, ctx.trainable()) if self.precondition == "adam" else None
        scale = ctx.lr * held["clip"] / (ctx.cfg.train.buffer_size * ctx.cfg.rollout.max_new_tokens)
        self.accumulate(held, D, ctx.delta_theta(), scale, ctx.step)

    def on_step_dropped(self) -> None:
        self._e = self._held = self._stacked = self._kron = None  # the E rows' graph and the rows held for the kernel

    # -------------------------------------------------------------------------- the three parts
    def e_begin(self, model, ebatch, n_u: int, step: int) -> dict:
        """Before the update, at θ_k: rows held for the E rows and the ``n_u`` training rows to
        come, the E rows' forward (``_e_forward``), and this rank's share of the baseline totals
        in ``stats["E_totals"]``, to be summed."""
        t0 = time.perf_counter()
        sketch = F.KroneckerSketch(stable_seed(self.cfg.seed, "fisher-sketch", step), *self.factors) \
            if self.mode == "sketch" else None
        self._begin_rows(sketch, len(ebatch) + n_u, model)
        held, self.stats["E_totals"] = self._e_forward(model, ebatch if len(ebatch) else None)
        self.stats["time_grad_s"] += time.perf_counter() - t0
        return dict(ebatch=ebatch, held=held)

    def e_end(self, model, e: dict) -> dict:
        """After ``e_begin``, with ``stats["E_totals"]`` summed over the ranks: this rank's
        F = Σ_t w_t ∇f_t (the E rows' per-sequence gradients, or their sketches, are in the held
        rows by then), also flat in ``stats["F"]`` to be summed."""
        t0 = time.perf_counter()
        ebatch = e["ebatch"]
        F_flat = self._e_backward(model, ebatch if len(ebatch) else None, e["held"], self.stats["E_totals"],
                                  self._pool_weights(ebatch.prompt))
        self.stats["F"] = F_flat.double()  # where it was computed: the exchange sums it there
        self.stats["time_grad_s"] += time.perf_counter() - t0
        return dict(ebatch=ebatch, F=F_flat)  # the E rows wait in the capture's rows for the U half

    def u_half(self, model, e: dict, batch) -> dict:
        """Still at θ_k, after ``e_end``: the training batch's rows; mode sketch: also each row's
        ⟨F, ∇S_j⟩ with ``stats["F"]`` (by now summed over the ranks), from the hooks' x and δ.
        -> everything ``accumulate`` needs."""
        t0 = time.perf_counter()
        F_all = self._unflatten(self.stats["F"]) if self.mode == "sketch" else None
        dots = self._u_pass(model, batch.tensors, len(e["ebatch"]), F_all)
        rows = self._end_rows(len(e["ebatch"]) + len(batch))
        self.stats["time_grad_s"] += time.perf_counter() - t0
        return dict(rows=rows, F=e["F"], dots=dots, meta=self._meta(e["ebatch"], batch), texts=self._texts(batch))

    def gradients(self, model, ebatch, batch, step: int) -> dict:
        """Both halves at one process (offline; nothing to sum over ranks)."""
        return self.u_half(model, self.e_end(model, self.e_begin(model, ebatch, len(batch), step)), batch)

    def accumulate(self, held: dict, D: dict | None, delta: dict, scale: float, step: int) -> None:
        """After the update: this rank's exact block, its sketch (several ranks), ⟨F, Δθ⟩, and
        its training sequences' c_j against the F of all ranks (``stats["F"]``, summed before the
        update); ``scale`` = η·c/(N·L) of the update's loss (N sequences over all ranks, L the
        token budget, c the gradient clipping factor of the update)."""
        t0 = time.perf_counter()
        local, sketch = self.kernel(held["rows"], D, step)
        self.stats["contrib"].append(self.contributions(held, D, scale))
        self.stats["pred"] += float(held["F"].double() @ torch.cat([delta[n].reshape(-1) for n in self.names]).double())
        self.stats["preconditioned"] = float(D is not None)
        self.stats["sketched"] = float(self.mode == "sketch")
        self.stats["local"].append(local)
        if sketch is not None:
            self.stats["sketch"].append(sketch)
        self.stats["meta"].append(held["meta"])
        self.stats["texts"].extend(held["texts"])
        self.stats["time_kernel_s"] += time.perf_counter() - t0

    # -------------------------------------------------------------------------- gradients
    def sequence_gradients(self, model, ebatch: EBatch | None, u_tokens: policy.TokenBatch, e_weights: torch.Tensor,
                           sketch: F.KroneckerSketch | None = None, F_all: dict[str, torch.Tensor] | None = None):
        """Both passes at one process: per-row ∇S [n_E + n_U, *shape] per parameter (E rows, then
        U rows), this rank's F = Σ_t w_t ∇f_t (flat over ``self.names``), and the U rows' ⟨F_all, ∇S_j⟩ from the
        hooks (mode sketch, given ``F_all``; else None), at the model's current parameters; mode
        sketch: the rows' ``sketch`` [n_E + n_U, columns] (required there)."""
        n_e = len(ebatch) if ebatch is not None else 0
        self._begin_rows(sketch, n_e + len(u_tokens.prompt_ids), model)
        F_flat = self._e_backward(model, ebatch, *self._e_forward(model, ebatch), e_weights)
        dots = self._u_pass(model, u_tokens, n_e, F_all)
        return self._end_rows(n_e + len(u_tokens.prompt_ids)), F_flat, dots

    def _begin_rows(self, sketch: F.KroneckerSketch | None, n_rows: int, model) -> None:
        """The rows for all ``n_rows`` (E rows, then U rows), allocated once: each parameter's
        gradient (mode sketch: its sketch, ``sketch.dim`` columns) a row."""
        if (sketch is None) != (self.mode == "exact"):
            raise ValueError(f"probe '{self.name}': mode {self.mode} takes {'no' if self.mode == 'exact' else 'a'} sketch")
        self._kron, self._count = sketch, dict.fromkeys(self.names, 0)
        params = dict(model.named_parameters())
        device = params[self.names[0]].device
        if sketch is not None:
            sketch.prepare({n: params[n].shape for n in self.names}, device)
        shapes = {n: params[n].shape if sketch is None else (sketch.dim(params[n].shape),) for n in self.names}
        self._stacked = F.StackedRows(shapes, n_rows, device)

    def _end_rows(self, n_rows: int) -> F.StackedRows:
        for n in self.names:
            if self._count[n] != n_rows:
                raise RuntimeError(f"captured {self._count[n]} of {n_rows} per-sequence gradients of {n}")
        rows, self._kron, self._stacked = self._stacked, None, None
        return rows

    def _e_forward(self, model, ebatch: EBatch | None) -> tuple[tuple | None, torch.Tensor]:
        """-> (held, totals): this rank's share of the baseline totals [3, L_budget]
        (``DH.baseline_totals``: the leave-one-out baseline is over every rank's E rows, as at one
        process) and, when one microbatch holds every E row of the rank (B_E ≤ microbatch, the
        default), that microbatch's forward with its rows captured, held with its graph for the
        surrogate's backward (else a no-grad pass gives the totals and ``_e_backward`` the rest)."""
        totals = torch.zeros(3, self.cfg.rollout.max_new_tokens, dtype=torch.float64, device=self._device)
        if ebatch is None:
            return None, totals
        parts = list(policy.microbatches(ebatch.tensors, self.micro))
        held = None
        with probe_model(model), torch.enable_grad() if len(parts) == 1 else torch.no_grad():
            for rows, mb in parts:
                if len(parts) == 1:
                    held = self._captured_forward(model, rows, mb)
                    terms, _, mask = held
                else:
                    terms, _, mask = self._terms(model, mb)
                totals += DH.baseline_totals(terms["h"].detach(), terms["ps"].detach(), mask, totals.shape[1])
        return held, totals

    def _e_backward(self, model, ebatch: EBatch | None, held: tuple | None, totals: torch.Tensor,
                    e_weights: torch.Tensor) -> torch.Tensor:
        """The E rows into the captured rows (those ``_e_forward`` did not hold) and F, float32 and
        flat over ``self.names``, with the baseline of ``totals`` (every rank's E rows)."""
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
        if ebatch is None:
            return flat
        with probe_model(model), torch.enable_grad():
            for rows, mb in policy.microbatches(ebatch.tensors, self.micro):
                terms, stops, mask = held if held is not None else self._captured_forward(model, rows, mb)
                cont, _, _ = DH.stop_split(mb.completion_ids.to(mask.device), mask, *stops)
                ls = ebatch.sampler_log_ratios(rows, terms["lp"]) if self.sampler_correction == "per_decision" else None
                b = DH.value_baseline(terms["h"].detach().double() * mask, terms["ps"].detach().double() * mask, mask,
                                      totals.to(mask.device))
                f = DH.rb_surrogate(terms, cont, mask, b, ls)
                w = e_weights[rows].to(f.device, f.dtype)
                grads = torch.autograd.grad((w * f).sum(), params, materialize_grads=True)
                flat += torch.cat([g.reshape(-1) for g in grads])  # one add, not one a parameter
        return flat

    def _captured_forward(self, model, rows: slice, mb: policy.TokenBatch):
        """A microbatch's terms (``_terms``) with its rows' ∇S captured by one backward of Σ_i S_i;
        the graph is kept for the surrogate's backward."""
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        with self._capturing(rows.start):
            terms, stops, mask = self._terms(model, mb)
            torch.autograd.grad((terms["lp"] * mask).sum(), params, retain_graph=True, allow_unused=True)
        return terms, stops, mask

    def _u_pass(self, model, u_tokens: policy.TokenBatch, first_row: int, F_all: dict[str, torch.Tensor] | None = None):
        """The training rows into the captured rows (from ``first_row`` on); with ``F_all`` (mode
        sketch) -> each row's ⟨F_all, ∇S_j⟩ [n_U] float64, contracted in the hooks (the gradient
        is never formed)."""
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        dots = []
        self._F_all = F_all
        try:
            with probe_model(model), torch.enable_grad():
                for rows, mb in policy.microbatches(u_tokens, self.micro):
                    self._dots = torch.zeros(len(mb.prompt_ids), dtype=torch.float64, device=params[0].device)
                    with self._capturing(first_row + rows.start):
                        logits = policy.completion_logits(model, *mb, self.cfg.rollout.temperature)
                        lp = policy.token_logprobs(logits, mb.completion_ids)
                        torch.autograd.grad((lp * mb.completion_mask.to(lp.device)).sum(), params, allow_unused=True)
                    dots.append(self._dots)
        finally:
            self._F_all = None
        return torch.cat(dots).cpu() if F_all is not None else None  # one read-back, not one a microbatch

    def _unflatten(self, flat: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """A flat vector over ``self.names`` (``stats["F"]``) as views shaped like the parameters,
        of ``dtype`` on their device: one copy, not one a parameter (each would wait on a GPU)."""
        parts = flat.to(self._device, dtype).split([math.prod(shape) for shape in self._shapes.values()])
        return {n: part.view(shape) for (n, shape), part in zip(self._shapes.items(), parts)}

    def _terms(self, model, mb: policy.TokenBatch):
        """Per-token h, ℓ, P_S (differentiable), the stop sets and the mask of a microbatch; in
        float32 (gradients only, accumulated in float32 rows) unless the model is float64."""
        logits = policy.completion_logits(model, *mb, self.cfg.rollout.temperature)
        dev = logits.device
        extra, extra_mask = self.stop_rule.stop_sets(mb.completion_ids, mb.completion_mask)
        stops = (torch.tensor(self.stop_rule.always, dtype=torch.long, device=dev), extra.to(dev), extra_mask.to(dev))
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        terms = DH.token_terms(logits, mb.completion_ids.to(dev), *stops, dtype=dtype)
        return terms, stops, mb.completion_mask.to(dev).double()

    @contextlib.contextmanager
    def _capturing(self, first_row: int):
        """Capture hooks on the forward (they register the backward's) and one backward, for the
        rows from ``first_row`` on."""
        self._row0 = first_row
        self.capture.attach()
        try:
            yield
        finally:
            self.capture.detach()
        if self.capture.error is not None:
            raise self.capture.error

    def _rows_out(self, name: str, rows: int) -> torch.Tensor:
        return self._stacked.destination(name, self._row0, rows)

    def _on_rows(self, name: str, rows: torch.Tensor) -> None:
        self._count[name] += len(rows)  # already in place (``_rows_out``)

    def _on_tokens(self, attrs: dict[str, str], x: torch.Tensor, delta: torch.Tensor) -> None:
        """Mode sketch: each row's gradient sketched from the hook's x and δ, never formed, into
        its place in the rows; with F at hand, also ⟨F, Σ_t δ_t x_tᵀ⟩ = Σ_t δ_t·(F x_t) per row
        (and ⟨F_b, Σ_t δ_t⟩)."""
        rows = x.shape[0]
        for attr, name in attrs.items():
            out = self._stacked.destination(name, self._row0, rows)
            if attr == "weight":
                self._kron.project_tokens(name, x, delta, out=out)
            else:
                self._kron.project(name, delta.sum(1), out=out)
            self._count[name] += rows
            if self._F_all is not None:
                f = self._F_all[name]
                # Σ_t δ_t·(F x_t): [rows, 1, T·out] @ [rows, T·out, 1], one batched matmul
                dot = torch.bmm((x @ f.T).reshape(rows, 1, -1), delta.reshape(rows, -1, 1)).reshape(rows) \
                    if attr == "weight" else delta.sum(1) @ f
                self._dots += dot  # float32 into the float64 sums, one kernel

    def _pool_weights(self, prompt: torch.Tensor) -> torch.Tensor:
        """w_t = 1/(n·k_p): the weights of the δH pool mean (whole prompts sit on one rank)."""
        if not len(prompt):
            return torch.zeros(0, dtype=torch.float64)
        n = min(len(self.ebatches.pool(self.spec)), max(1, self.spec.batch_size // self.spec.per_prompt))
        _, inv, counts = prompt.unique(return_inverse=True, return_counts=True)
        return 1.0 / (n * counts[inv].double())

    # -------------------------------------------------------------------------- blocks
    def kernel(self, rows: dict[str, torch.Tensor], D: dict[str, torch.Tensor] | None, step: int):
        """(exact local Gram [n, n], sketch [n, k] or None at one rank) of the rows, with D once."""
        local = rows.gram(D).cpu()  # summed where the rows are: one copy to the host
        if self.world.world_size == 1:
            return local, None
        if self.mode == "sketch":  # rows are Kronecker sketches already; D is refused in setup
            return local, torch.cat([rows[name] for name in self.names], dim=1).double().cpu()
        sketcher = F.GaussianSketch(stable_seed(self.cfg.seed, "fisher-sketch", step), self.k)
        sketch = torch.zeros(local.shape[0], self.k, dtype=torch.float64, device=self._device)
        for name in self.names:  # ⟨D a, b⟩ = ⟨√D a, √D b⟩: sketch √D-scaled rows, where they are
            G = rows[name]
            sketch += sketcher.project(name, G if D is None else G * D[name].sqrt().to(G.device, G.dtype))
        return local, sketch.cpu()

    def contributions(self, held: dict, D: dict | None, scale: float) -> torch.Tensor:
        """c_j = scale·A_j·⟨F, D∇S_j⟩ [n_U] float64 of this rank's training sequences, with F the
        sum over every rank's E rows: exact at any number of ranks and in either mode (F itself
        meets the rows, not a sketch of it; mode sketch contracted it in the hooks)."""
        meta = held["meta"]
        U = (meta[:, 1] == U_ROW).nonzero().flatten()
        if held["dots"] is not None:
            return scale * meta[U, 4] * held["dots"]
        rows: F.StackedRows = held["rows"]
        if len(U) and int(U[0]) + len(U) != len(meta):
            raise RuntimeError("the training rows must follow the E rows")
        dots = rows.dot(self._unflatten(self.stats["F"], torch.float64), slice(len(meta) - len(U), None), D)
        return scale * meta[U, 4] * dots.cpu()

    def _meta(self, ebatch, batch) -> torch.Tensor:
        r, nE, nU = self.world.rank, len(ebatch), len(batch)
        e_len = ebatch.tensors.completion_mask.sum(-1).double() if nE else torch.zeros(0, dtype=torch.float64)
        nan = torch.full((nE,), float("nan"), dtype=torch.float64)
        e = torch.stack([torch.full((nE,), float(r)), torch.full((nE,), float(E_ROW)), ebatch.prompt.double(),
                         nan, nan, e_len], dim=1) if nE else torch.zeros(0, len(META), dtype=torch.float64)
        # U prompts: the rank's group index, made global (groups never span ranks).
        u = torch.stack([torch.full((nU,), float(r)), torch.full((nU,), float(U_ROW)),
                         (batch.group_index + r * nU).double(), batch.rewards.double(), batch.advantages.double(),
                         batch.completion_mask.sum(-1).double()], dim=1)
        return torch.cat([e.double(), u])

    @staticmethod
    def _texts(batch) -> list[torch.Tensor]:
        """Each U row's record id and completion text, as bytes (cat-stats travel as tensors)."""
        return [torch.tensor(list(f"{rid}\t{text}".encode()), dtype=torch.uint8)
                for rid, text in zip(batch.record_ids, batch.texts)]

    # -------------------------------------------------------------------------- results
    def assemble(self) -> dict:
        """The global kernel over every rank's rows (rank order), with its exactness mask."""
        s = self.stats
        meta = torch.cat(s["meta"])
        sizes = [m.shape[0] for m in s["meta"]]
        K = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
        exact = torch.zeros_like(K, dtype=torch.bool)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for a, (sa, na) in enumerate(zip(starts, sizes)):
            for b, (sb, nb) in enumerate(zip(starts, sizes)):
                if a == b:
                    K[sa:sa + na, sb:sb + nb] = s["local"][a]
                    exact[sa:sa + na, sb:sb + nb] = not s["sketched"]
                else:
                    K[sa:sa + na, sb:sb + nb] = s["sketch"][a] @ s["sketch"][b].T
        return {"K": K, "exact": exact, "meta": meta}

    def compute(self) -> dict[str, float]:
        if not self.stats["meta"]:
            return {}
        res = self.results()
        if self.save and self.world.is_main and self.output_dir is not None:
            folder = self.output_dir / "fisher"
            write_results(folder, f"step_{self.step}", res)
            self._log_image(res)
        return res["values"]

    def results(self) -> dict:
        """Logged values and the arrays behind them, from the reduced stats."""
        s = self.stats
        g = self.assemble()
        K, exact, meta = g["K"], g["exact"], g["meta"]
        kind = meta[:, 1].long()
        E, U = (kind == E_ROW).nonzero().flatten(), (kind == U_ROW).nonzero().flatten()
        contrib = torch.cat(s["contrib"])  # rank order, as U
        EU = torch.cat([E, U])
        out = {"n_E": float(len(E)), "n_U": float(len(U)), "preconditioned": s["preconditioned"],
               "exact_frac": float(exact[EU][:, EU].double().mean()),
               "pred": s["pred"], "contrib_sum": float(contrib.sum()), "contrib_up": float(contrib.clamp(min=0).sum()),
               "contrib_down": float(contrib.clamp(max=0).sum()),
               "time_grad_s": s["time_grad_s"], "time_kernel_s": s["time_kernel_s"]}
        out["contrib_ratio"] = out["contrib_sum"] / s["pred"] if s["pred"] else float("nan")
        for tag, idx in (("uu", U), ("ee", E)):
            if len(idx) < 2:
                continue
            block = K[idx][:, idx]
            out.update({f"{tag}_{k}": v for k, v in F.kernel_summary(block, meta[idx, 2].long()).items()})
            spec = F.spectrum(block, self.top)
            out.update({f"{tag}_eig_{i + 1}": v for i, v in enumerate(spec["top"])})
            out[f"{tag}_effective_rank"], out[f"{tag}_participation_ratio"] = spec["effective_rank"], spec["participation_ratio"]
        if len(E) and len(U):
            cross = F.cross_summary(K[E][:, U])
            out.update(eu_mean=cross["mean"], eu_abs_mean=cross["abs_mean"])
        texts = [bytes(t.tolist()).decode(errors="replace") for t in s["texts"]]
        return {"values": {k: v for k, v in out.items() if v == v}, "K": K, "exact": exact, "meta": meta,
                "E": E, "U": U, "contrib": contrib, "texts": texts}

    def _log_image(self, res: dict) -> None:
        """The heatmap to TensorBoard, in the run's event folder (a second event file there)."""
        from torch.utils.tensorboard import SummaryWriter

        if getattr(self, "_writer", None) is None:
            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), filename_suffix=".fisher")
        self._writer.add_image(f"probe/{self.name}/kernel_cosine", heatmap(res), self.step, dataformats="HWC")
        self._writer.flush()

