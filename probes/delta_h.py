"""δH probe (kind ``delta_h``): predicted vs measured entropy change of one optimizer step.

At a due step, before the update, an E-batch of B_E held-out prompts × 1 completion is
sampled from π_θk (unfiltered; prompts and seeds keyed by (seed, step), independent of the
training batch and of the number of ranks). After the real optimizer step, with
Δθ = θ_{k+1} − θ_k taken from the parameters (Adam moments, bias correction, weight decay and
clipping included):

- δH₁ = ⟨∇H(θ_k), Δθ⟩, per sequence i from ONE forward+backward at θ_k on the E-batch
  (``probes/directional.py``): Rao–Blackwellised (default; baseline b_t = the previous due
  step's mean of G_{t+1} at position t, independent of this E-batch, so contributions are
  iid) or score-function (leave-one-out baseline);
- ΔH_true by self-normalised importance sampling on the same E-batch with one forward at
  θ_{k+1}: w_i = exp(S_i(θ_{k+1}) − S_i(θ_k));
- cov_pred = −η·Cov_tokens(log π, A) on the training batch (Cui et al. 2505.22617), the
  naive prediction, for comparison.

Only the first PPO epoch's optimizer step is probed. Options: ``batch_size`` (B_E, total
over ranks, default 16), ``estimator`` (rb | sf | both, default rb), ``microbatch_size``
(default train.microbatch_size), ``pool`` (eval | train prompts, default eval).

| key | meaning |
|---|---|
| `pred`, `pred_se` | δH₁ per sequence (nats) and its standard error (chosen estimator) |
| `pred_rb`, `pred_rb_se`, `pred_sf`, `pred_sf_se` | each estimator (sf only with estimator sf/both) |
| `true`, `true_se` | ΔH_true per sequence (SNIS) and its delta-method standard error |
| `ess_frac` | Kish ESS of the SNIS weights / B_E |
| `ratio` | pred / true |
| `H` | H(θ_k) per sequence, E-batch mean of Σ_t h_t |
| `pred_tok`, `true_tok`, `H_tok` | the same divided by L_budget = max_new_tokens |
| `cov_pred` | −lr·Cov(log π(y_t), A) over training tokens (a per-token entropy change) |
| `dir_check` | max relative gap between Σ_i d_i and ⟨∇Σf, Δθ⟩ (numerical health, ≈ 1e-6) |
| `n` | B_E |
| `time_gen_s`, `time_grad_s`, `time_snis_s` | cost: E-batch generation, the gradient pass at θ_k, the SNIS forward at θ_{k+1} (slowest rank) |
"""

from __future__ import annotations

import random
import time

import torch
from torch.func import functional_call

from probes.base import Probe, SetupContext, StepContext
from probes.directional import eval_mode, per_row_directional
from probes.functional import delta_h as F
from probes.manager import register
from rl_training import policy
from rl_training.data.prompts import STOP_STRINGS
from rl_training.errors import ConfigError
from rl_training.sampling import sample, stable_seed

OPTIONS = {"batch_size", "estimator", "microbatch_size", "pool"}


def token_stats(model, tensors, T: float, forward=None):
    """(h, log π(y_t)) [B, L] in float64 from one forward (``forward``: e.g. a functional call)."""
    logits = policy.completion_logits(model, *tensors, T, forward=forward)
    return F.token_entropy_logprob(logits, tensors[2].to(logits.device))


def completion_tensors(comp):
    return comp.prompt_ids, comp.prompt_mask, comp.completion_ids, comp.completion_mask


@torch.no_grad()
def sequence_stats(model, tensors, T: float, params: dict | None = None):
    """(S_i, H_i = Σ_t h_t, G [B, L]) per sequence, at ``params`` (default: the model's own)."""
    forward = None
    if params is not None:
        forward = lambda **kw: functional_call(model, params, args=(), kwargs=kw, strict=False)  # noqa: E731
    h, logp = token_stats(model, tensors, T, forward=forward)
    mask = tensors[3].to(h.device).double()
    return (logp * mask).sum(-1).cpu(), (h * mask).sum(-1).cpu(), F.future_entropy(h, mask).cpu()


@register
class DeltaHProbe(Probe):
    kind = "delta_h"
    needs_param_snapshot = True

    def setup(self, ctx: SetupContext) -> None:
        unknown = set(self.options) - OPTIONS
        if unknown:
            raise ConfigError(f"probe '{self.name}': unknown option(s) {sorted(unknown)} (valid: {sorted(OPTIONS)})")
        cfg, world = ctx.cfg, ctx.world
        self.batch_size = int(self.options.get("batch_size", 16))
        self.estimator = self.options.get("estimator", "rb")
        self.micro = int(self.options.get("microbatch_size", cfg.train.microbatch_size))
        pool = self.options.get("pool", "eval")
        if self.batch_size < 2:
            raise ConfigError(f"probe '{self.name}': batch_size (B_E) must be >= 2, got {self.batch_size}")
        if self.batch_size % world.world_size:
            raise ConfigError(f"probe '{self.name}': batch_size {self.batch_size} must be divisible by world_size {world.world_size}")
        if self.estimator not in ("rb", "sf", "both"):
            raise ConfigError(f"probe '{self.name}': estimator must be rb|sf|both, got {self.estimator!r}")
        if pool not in ("eval", "train"):
            raise ConfigError(f"probe '{self.name}': pool must be eval|train, got {pool!r}")
        self.pool = ctx.eval_records if pool == "eval" else ctx.train_records
        if not self.pool:
            raise ConfigError(f"probe '{self.name}': the {pool} prompt pool is empty (data.eval_fraction = 0?)")
        self.cfg, self.world, self.tokenizer, self.prompt_fn = cfg, world, ctx.tokenizer, ctx.prompt_fn
        self.l_budget = cfg.rollout.max_new_tokens
        self.baseline = torch.zeros(self.l_budget, dtype=torch.float64)  # b_t for RB, from the last due step
        self._ebatch = None
        self.add_stat("n")
        self.add_stat("rb_c")
        self.add_stat("rb_c2")
        for k in F.SF_SUMS:
            self.add_stat(f"sf_{k}")
        for k in F.SNIS_SUMS:
            self.add_stat(f"snis_{k}")
        self.add_stat("G_sum", torch.zeros(self.l_budget, dtype=torch.float64))
        self.add_stat("G_cnt", torch.zeros(self.l_budget, dtype=torch.float64))
        for k in ("tok_n", "tok_lp", "tok_a", "tok_lpa"):
            self.add_stat(k)
        self.add_stat("dir_check", reduce="max")
        for part in ("gen", "grad", "snis"):  # cost breakdown, slowest rank
            self.add_stat(f"time_{part}_s", reduce="max")
        self.lr = float("nan")

    # -------------------------------------------------------------------------- hooks
    def on_after_backward(self, ctx: StepContext) -> None:
        if ctx.epoch > 0:
            return
        mask = ctx.microbatch.completion_mask.to(ctx.token_logp.device).double()
        lp = ctx.token_logp.double() * mask
        adv = ctx.microbatch.advantages.to(lp.device).double().unsqueeze(1) * mask
        self.stats["tok_n"] += float(mask.sum())
        self.stats["tok_lp"] += float(lp.sum())
        self.stats["tok_a"] += float(adv.sum())
        self.stats["tok_lpa"] += float((lp * adv).sum())

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.epoch > 0:
            return
        self.lr = ctx.lr
        t0 = time.perf_counter()
        self._ebatch = self.sample_ebatch(ctx.model, ctx.step)
        self.stats["time_gen_s"] += time.perf_counter() - t0

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.epoch > 0 or self._ebatch is None:
            return
        comp, self._ebatch = self._ebatch, None
        self.measure(ctx.model, ctx.params_before, ctx.delta_theta(), comp)

    def measure(self, model, theta: dict, delta: dict, comp, theta_new: dict | None = None) -> None:
        """Accumulate δH₁ along ``delta`` at ``theta`` and SNIS ΔH at ``theta_new`` (default:
        the model's current parameters) over the E-batch ``comp``, microbatch by microbatch."""
        with eval_mode(model):
            for _, tensors in policy.microbatches(completion_tensors(comp), self.micro):
                self._accumulate(model, theta, delta, tensors, theta_new)

    def _accumulate(self, model, theta, delta, tensors, theta_new) -> None:
        T = self.cfg.rollout.temperature
        mask = tensors[3].double()
        seen = {}

        def objective(kind):
            def run(call):
                h, logp = token_stats(model, tensors, T, forward=call)
                m = mask.to(h.device)
                seen.update(S=(logp.detach() * m).sum(-1), H=(h.detach() * m).sum(-1), G=F.future_entropy(h.detach(), m))
                return F.rb_surrogate(h, logp, m, self.baseline) if kind == "rb" else (logp * m).sum(-1)
            return run

        checks = []
        t0 = time.perf_counter()
        if self.estimator in ("rb", "both"):
            _, d_rb, total = per_row_directional(model, theta, delta, objective("rb"))
            self.stats["rb_c"] += float(d_rb.sum())
            self.stats["rb_c2"] += float((d_rb * d_rb).sum())
            checks.append((float(d_rb.sum()), total))
        if self.estimator in ("sf", "both"):
            _, d_sf, total = per_row_directional(model, theta, delta, objective("sf"))
            for k, v in F.sf_sums(seen["S"], d_sf).items():
                self.stats[f"sf_{k}"] += v
            checks.append((float(d_sf.sum()), total))
        S_old, H_old, G = seen["S"].cpu(), seen["H"].cpu(), seen["G"].cpu()
        t1 = time.perf_counter()
        S_new, H_new, _ = sequence_stats(model, tensors, T, params=theta_new)
        self.stats["time_grad_s"] += t1 - t0
        self.stats["time_snis_s"] += time.perf_counter() - t1
        for k, v in F.snis_sums(S_old, S_new, H_old, H_new).items():
            self.stats[f"snis_{k}"] += v
        width = min(G.shape[1], self.l_budget)
        self.stats["G_sum"][:width] += (G * mask)[:, :width].sum(0)
        self.stats["G_cnt"][:width] += mask[:, :width].sum(0)
        self.stats["n"] += float(mask.shape[0])
        for got, want in checks:
            gap = abs(got - want) / max(abs(want), 1e-30)
            self.stats["dir_check"] = max(self.stats["dir_check"], gap)

    def sample_ebatch(self, model, step: int):
        """This rank's share of a global E-batch that depends only on (seed, step)."""
        seed = self.cfg.seed
        # iid prompts (with replacement): the SE formulas assume independent E-batch sequences.
        picks = random.Random(stable_seed(seed, "ebatch-prompts", step)).choices(range(len(self.pool)), k=self.batch_size)
        per_rank = self.batch_size // self.world.world_size
        mine = range(self.world.rank * per_rank, (self.world.rank + 1) * per_rank)
        return sample(
            model, self.tokenizer,
            [self.prompt_fn(self.pool[picks[i]].question) for i in mine],
            [stable_seed(seed, "ebatch", step, i) for i in mine],
            max_new_tokens=self.l_budget, temperature=self.cfg.rollout.temperature,
            stop_strings=STOP_STRINGS, max_prompt_tokens=self.cfg.data.max_prompt_tokens,
        )

    # -------------------------------------------------------------------------- results
    def compute(self) -> dict[str, float]:
        s, n, L = self.stats, self.stats["n"], float(self.l_budget)
        out = {"n": n, "dir_check": s["dir_check"], **{f"time_{p}_s": s[f"time_{p}_s"] for p in ("gen", "grad", "snis")}}
        if self.estimator in ("rb", "both"):
            out["pred_rb"], out["pred_rb_se"] = F.mean_se(s["rb_c"], s["rb_c2"], n)
        if self.estimator in ("sf", "both"):
            out["pred_sf"], out["pred_sf_se"] = F.sf_estimate({k: s[f"sf_{k}"] for k in F.SF_SUMS}, n)
        chosen = "sf" if self.estimator == "sf" else "rb"
        out["pred"], out["pred_se"] = out[f"pred_{chosen}"], out[f"pred_{chosen}_se"]
        out.update(F.snis_estimate({k: s[f"snis_{k}"] for k in F.SNIS_SUMS}, n))
        out["ratio"] = out["pred"] / out["true"] if out["true"] else float("nan")
        out["H"] = s["snis_H"] / n if n else float("nan")
        out.update(pred_tok=out["pred"] / L, true_tok=out["true"] / L, H_tok=out["H"] / L)
        out["cov_pred"] = F.cov_prediction(self.lr, s["tok_n"], s["tok_lp"], s["tok_a"], s["tok_lpa"])
        # Next due step's RB baseline: this E-batch's mean future entropy per position.
        cnt = s["G_cnt"]
        self.baseline = torch.where(cnt > 0, s["G_sum"] / cnt.clamp(min=1), torch.zeros_like(cnt))
        return out

    def state_dict(self) -> dict:
        return {"baseline": self.baseline.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.baseline = sd["baseline"].to(torch.float64).clone()
