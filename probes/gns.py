"""GNS probe (kind ``gns``): gradient noise scale and critical batch size, in prompts and in
completions per prompt, from the step's own backward (no extra forward or backward).

What an example is: the prompt GROUP that enters the step's loss (an accepted group, with reward
variance). Its G completions share a prompt and the group-mean baseline, so they are not
independent; groups are. Groups added only to fill the buffer carry zero advantage and no
gradient (with kl_beta = 0; with a KL term they carry its gradient but still are not examples):
they are not counted in P. Estimators and the two-level split: ``probes/functional/gns.py``.

How: while each microbatch of PPO epoch 0 runs forward and backward, hooks on the LoRA Linear
layers (``probes/capture.py``) hand over each sequence's gradient of the rank's local loss,
module by module; the probe keeps Σ_i |∇ℓ_i|² and, per example group, the running sum of its
rows' gradients (a group may span microbatches), whose squared norm is added when the group's
last row has passed. In the backward a module costs one matmul (and the casts of a bf16 model):
its rows are only kept. After the microbatch's backward the rows of modules of one shape (the
same projection in every layer) are stacked and reduced together, about ten kernels a shape:
the group sums are one batched matmul with a 0/1 membership matrix planned once per step,
squares are summed in float64 from float32 rows, and nothing indexes, copies to the device or
reads a value back (each would stall a GPU's queue). Reducing module by module took about nine
kernels a module; on a GPU, launches are what these small reductions cost (SmolLM2 with LoRA
on q and v, 120 modules: 205 kernels a step instead of 1,494). The price is the microbatch's
per-row gradients held until its backward ends: rows × trainable parameters in float32
(Qwen2.5-1.5B, LoRA r64 on 7 projections, 4 rows: 1.2 GB), at most ``hold_rows_gb``: past it,
what is held is reduced at once, inside the backward (the budget counts every microbatch as a
full one, so that a shape's modules are grouped alike in every microbatch, which the partial
sums of groups spanning microbatches rely on). |g|² is the synced (all-reduced) gradient
before clipping.
Scale: rank r's loss is the global loss × world size W on its rows, so Γ_p = (P/W)·Σ_{i∈p}
∇ℓ_i^local and γ_i = (P·G/W)·∇ℓ_i^local; with these factors the estimates do not depend on W.

Options: ``ema_beta`` (default 0.9), ``group_sizes`` (G' at which to predict B, default
[2, 4, 8, 16]), ``adam_view`` (default false): the same sums with every squared norm weighted
by Adam's D = 1/(√v̂ + ε), the metric in which Adam's step is plain SGD (from the optimizer
state before this step's update, so from step 2 on; D moves slowly, and the EMAs mix steps
with slightly different D), ``hold_rows_gb`` (default 2): the per-row gradients held at once.

| key | meaning |
|---|---|
| `P` | example groups in the step (all ranks) |
| `q` | accepted / generated groups this step |
| `g2` | \\|g\\|² of the synced gradient before clipping |
| `sum_sq_groups` | Σ_p \\|Γ_p\\|² |
| `trS`, `g2_true` | this step's unbiased tr Σ̂ and \\|ḡ̂\\|² (often negative: B is many steps' P) |
| `s_w` | this step's within-group scatter of the sequences' gradients |
| `trS_ema`, `g2_ema`, `g2_ema_se`, `s_w_ema` | bias-corrected EMAs (and the SE of the signal's) |
| `trS_between`, `trS_intra` | split of trS_ema: tr Σ_between and s_w/G (approximate: the group baseline couples a group's sequences) |
| `b_resolved` | 1 when g2_ema > 2·g2_ema_se, else 0: the keys below are logged only then |
| `b_simple`, `b_simple_seq`, `b_simple_gen` | B_simple = trS_ema / g2_ema in example prompts, in sequences (× G), in generated prompts ((B + 1 − q)/q, exact with kl_beta = 0) |
| `b_seq_G<k>` | predicted B_simple in sequences at group size k: k·(tr Σ_between + s_w/k) / g2_ema |
| `adam`, `trS_adam_ema`, `g2_adam_ema`, `b_simple_adam` | with ``adam_view``: 1 when D was available this step, the D-weighted EMAs, and B_simple in prompts in Adam's metric (once resolved) |
| `time_capture_s` | host time in the capture hooks, inside the training backward (slowest rank; `time_s` excludes it; on a GPU the kernels run later, so this is their launch cost) |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.base import Probe, SetupContext, StepContext
from probes.capture import LinearCapture
from probes.functional import fisher as F_fisher
from probes.functional import gns as F
from probes.manager import register
from rl_training.errors import ConfigError

OPTIONS = {"ema_beta", "group_sizes", "adam_view", "hold_rows_gb"}


@dataclass
class _Microbatch:
    """The example groups with rows in one microbatch, those whose last row is here first."""

    groups: list[tuple[int, bool]]  # (group id, completed in this microbatch)
    members: torch.Tensor | None = None  # [groups, rows] 0/1, on the rows' device
    row_is_member: torch.Tensor | None = None  # [rows] float64: the row belongs to an example group

    @property
    def completed(self) -> int:
        return sum(done for _, done in self.groups)


@register
class GnsProbe(Probe):
    kind = "gns"

    def __init__(self, name: str, every_n_steps: int = 1, options: dict | None = None):
        super().__init__(name, every_n_steps, options)
        # State exists before setup (resume); the Adam-view EMAs are unused without adam_view.
        self.ema = {k: F.Ema(0.9) for k in ("trS", "g2", "s_w", "trS_adam", "g2_adam")}

    def setup(self, ctx: SetupContext) -> None:
        self.check_options(OPTIONS)
        beta = float(self.options.get("ema_beta", 0.9))
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"probe '{self.name}': ema_beta must be in [0, 1), got {beta}")
        self.group_sizes = [int(k) for k in self.options.get("group_sizes", [2, 4, 8, 16])]
        if any(k < 1 for k in self.group_sizes):
            raise ConfigError(f"probe '{self.name}': group_sizes must be >= 1, got {self.group_sizes}")
        self.G = ctx.cfg.rollout.group_size
        self.world_size = ctx.world.world_size
        names = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
        self.capture = LinearCapture(ctx.model, names, self._on_rows)
        for e in self.ema.values():
            e.beta = beta
        self.adam_view = bool(self.options.get("adam_view", False))
        self.hold_bytes = float(self.options.get("hold_rows_gb", 2.0)) * 2**30
        if not self.hold_bytes > 0:
            raise ConfigError(f"probe '{self.name}': hold_rows_gb must be > 0, got {self.options['hold_rows_gb']}")
        for k in ("P", "sq_groups", "sq_members", "groups", "groups_accepted", "sq_groups_adam"):
            self.add_stat(k)
        self.add_stat("g2", reduce="max")  # the synced gradient: the same on every rank
        self.add_stat("g2_adam", reduce="max")
        self.add_stat("adam", reduce="min")  # 1 when every rank had Adam's D this step
        self.add_stat("time_capture_s", reduce="max")  # spent inside the training backward (not in time_s)
        self._plans: list[_Microbatch] = []
        self._mb = _Microbatch([])
        self._open: dict[tuple[int, tuple], torch.Tensor] = {}  # partial sums of groups spanning microbatches
        self._rows: dict[tuple, list[tuple[str, torch.Tensor]]] = {}  # this microbatch's rows by shape
        self._held = 0  # bytes of self._rows, counted as if the microbatch were full
        self._full_rows = 0
        self._D_stacked: dict[tuple[str, ...], torch.Tensor] = {}
        self._sq_members = self._sq_groups = self._sq_groups_adam = torch.zeros((), dtype=torch.float64)
        self._D: dict[str, torch.Tensor] | None = None  # Adam's D, flat float32 (adam_view)

    # -------------------------------------------------------------------------- hooks
    def on_before_microbatch(self, ctx: StepContext) -> None:
        if ctx.epoch > 0:
            return
        if ctx.microbatch_index == 0:
            device = next(iter(ctx.trainable().values())).device
            self._plan_step(ctx.batch, ctx.cfg.train.microbatch_size, device)
            D = F_fisher.adam_preconditioner(ctx.optimizer, ctx.trainable()) if self.adam_view else None
            self._D = None if D is None else {n: d.float().reshape(-1) for n, d in D.items()}
            self._D_stacked = {}
        self._mb = self._plans[ctx.microbatch_index]
        self._rows, self._held = {}, 0
        if self._mb.groups:  # a microbatch of filler groups only has nothing to capture
            self.capture.attach()

    def on_after_backward(self, ctx: StepContext) -> None:
        if ctx.epoch > 0 or not self._mb.groups:
            return
        self.capture.detach()
        self.stats["time_capture_s"] += self.capture.seconds
        if self.capture.error is not None:
            raise self.capture.error
        wanted = {n for attrs in self.capture.owners.values() for n in attrs.values()}
        if wanted - self.capture.seen:
            raise RuntimeError(f"no per-row gradient for {sorted(wanted - self.capture.seen)[:3]}")
        self._reduce_held()

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.epoch > 0:
            return
        assert not self._open, "a group's rows did not all pass through the backward"
        names, flat = ctx.flat_grad()  # unscaled; the captured rows carry the loss scale S
        unscale = 1.0 / ctx.loss_scale**2  # S is a power of two: exact
        self.stats["g2"] = float(flat.pow(2).sum(dtype=torch.float64))
        self.stats["sq_members"] += float(self._sq_members) * unscale
        self.stats["sq_groups"] += float(self._sq_groups) * unscale
        self.stats["adam"] = float(self._D is not None)
        if self._D is not None:
            self.stats["sq_groups_adam"] += float(self._sq_groups_adam) * unscale
            D = torch.cat([self._D[n] for n in names]) if names else flat
            self.stats["g2_adam"] = float((flat.pow(2) * D).sum(dtype=torch.float64))
        st = ctx.batch.stats
        self.stats["groups"] += float(st.groups)
        self.stats["groups_accepted"] += float(st.groups - st.groups_rejected)

    def on_step_dropped(self) -> None:
        self._rows, self._open, self._held = {}, {}, 0

    def _plan_step(self, batch, microbatch_size: int, device: torch.device) -> None:
        """Which groups are examples (some nonzero advantage), and per microbatch the 0/1 matrix
        that sums its rows into their groups' partial gradients, built once per step on the
        rows' device: the backward's hooks then index nothing, copy nothing to the device and
        never wait for it, which on a GPU costs more than their arithmetic."""
        gid, adv = batch.group_index.cpu(), batch.advantages.cpu()
        groups = gid.unique().tolist()
        self._examples = {g for g in groups if bool((adv[gid == g] != 0).any())}
        last_row = {g: int((gid == g).nonzero().max()) for g in groups}
        self._plans, blocks = [], []
        for start in range(0, len(gid), microbatch_size):
            part = gid[start:start + microbatch_size]
            end = start + len(part)
            present = [g for g in part.unique().tolist() if g in self._examples]
            present.sort(key=lambda g: last_row[g] >= end)  # groups completed here first
            self._plans.append(_Microbatch([(g, last_row[g] < end) for g in present]))
            blocks.append((part[None, :] == torch.tensor(present, dtype=part.dtype)[:, None]).float())
        packed = torch.cat([b.reshape(-1) for b in blocks]).to(device)  # one host-to-device copy a step
        for plan, block, host in zip(self._plans, packed.split([b.numel() for b in blocks]), blocks):
            plan.members = block.view(host.shape)
            plan.row_is_member = plan.members.sum(0).double()
        self._open, self._full_rows = {}, microbatch_size
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self._sq_members = self._sq_groups = self._sq_groups_adam = zero
        self.stats["P"] += float(len(self._examples))

    def _on_rows(self, name: str, rows: torch.Tensor) -> None:
        """One parameter's per-row gradients [b, ...] of the current microbatch: kept, reduced
        after the backward with every parameter of the same shape (or at once past the budget)."""
        self._rows.setdefault(tuple(rows.shape[1:]), []).append((name, rows))
        self._held += self._full_rows * rows[0].numel() * rows.element_size()
        if self._held > self.hold_bytes:
            self._reduce_held()

    def _reduce_held(self) -> None:
        """The held rows into the step's sums, one stack and one reduction a shape."""
        rows, self._rows, self._held = self._rows, {}, 0
        for shape in sorted(rows):
            kept = sorted(rows.pop(shape), key=lambda item: item[0])
            names = tuple(n for n, _ in kept)
            self._reduce(names, torch.stack([r.reshape(r.shape[0], -1) for _, r in kept]))

    def _reduce(self, names: tuple[str, ...], flat: torch.Tensor) -> None:
        """The per-row gradients [m, b, numel] of m same-shape parameters into the step's sums."""
        plan = self._mb
        self._sq_members = self._sq_members + (flat.pow(2).sum(-1, dtype=torch.float64) @ plan.row_is_member).sum()
        partial = plan.members @ flat  # [m, groups here, numel]: this microbatch's share of each Γ_p
        for j, (g, _) in enumerate(plan.groups):
            if (g, names) in self._open:
                partial[:, j] += self._open.pop((g, names))
        for j in range(plan.completed, len(plan.groups)):
            self._open[(plan.groups[j][0], names)] = partial[:, j].clone()
        sq = partial[:, :plan.completed].pow(2)
        self._sq_groups = self._sq_groups + sq.sum(dtype=torch.float64)
        if self._D is not None:
            if names not in self._D_stacked:  # once a step
                self._D_stacked[names] = torch.stack([self._D[n] for n in names]).unsqueeze(1)
            self._sq_groups_adam = self._sq_groups_adam + (sq * self._D_stacked[names]).sum(dtype=torch.float64)

    # -------------------------------------------------------------------------- results
    def on_reduced(self) -> None:
        raw = self._raw()
        for k in ("trS", "g2", "s_w"):
            self.ema[k].update(raw[k])
        if self.adam_view and self.stats["adam"] > 0:
            for k in ("trS_adam", "g2_adam"):
                self.ema[k].update(raw[k])

    def _raw(self) -> dict[str, float]:
        s, W, G = self.stats, self.world_size, self.G
        P = s["P"]
        sq_groups = (P / W) ** 2 * s["sq_groups"]
        sq_members = (P * G / W) ** 2 * s["sq_members"]
        trS, g2_true = F.noise_and_signal(sq_groups, s["g2"], P)
        trS_adam, g2_adam = F.noise_and_signal((P / W) ** 2 * s["sq_groups_adam"], s["g2_adam"], P)
        return {"trS": trS, "g2": g2_true, "s_w": F.within_scatter(sq_members, sq_groups, P, G),
                "sq_groups": sq_groups, "trS_adam": trS_adam, "g2_adam": g2_adam}

    def compute(self) -> dict[str, float]:
        s, G = self.stats, self.G
        raw = self._raw()
        q = s["groups_accepted"] / s["groups"] if s["groups"] else float("nan")
        out = {"P": s["P"], "q": q, "g2": s["g2"], "time_capture_s": s["time_capture_s"], "sum_sq_groups": raw["sq_groups"], "trS": raw["trS"],
               "g2_true": raw["g2"], "s_w": raw["s_w"]}
        trS, g2, s_w = (self.ema[k].mean for k in ("trS", "g2", "s_w"))
        g2_se = self.ema["g2"].se
        out.update(trS_ema=trS, g2_ema=g2, g2_ema_se=g2_se, s_w_ema=s_w, trS_between=trS - s_w / G, trS_intra=s_w / G)
        b = F.b_simple(trS, g2, g2_se)
        out["b_resolved"] = float(b is not None)
        if b is not None:
            out.update(b_simple=b, b_simple_seq=b * G, b_simple_gen=F.generated_prompts(b, q))
            between = max(trS - s_w / G, 0.0)
            for k in self.group_sizes:
                out[f"b_seq_G{k}"] = k * (between + max(s_w, 0.0) / k) / g2
        if self.adam_view:
            out["adam"] = s["adam"]
            if self.ema["g2_adam"].steps:
                trS_a, g2_a = self.ema["trS_adam"].mean, self.ema["g2_adam"].mean
                out.update(trS_adam_ema=trS_a, g2_adam_ema=g2_a)
                b_a = F.b_simple(trS_a, g2_a, self.ema["g2_adam"].se)
                if b_a is not None:
                    out["b_simple_adam"] = b_a
        return {k: v for k, v in out.items() if v == v}  # nan: not measurable this step (P < 2)

    def state_dict(self) -> dict:
        return {k: e.state_dict() for k, e in self.ema.items()}

    def load_state_dict(self, sd: dict) -> None:
        for k, e in self.ema.items():
            if k in sd:
                e.load_state_dict(sd[k])
