"""δH probe (kind ``delta_h``): predicted vs measured entropy change of one optimizer step.

At a due step, before the update, an E-batch is sampled from π_θk: n prompts of the probe's
pool drawn without replacement (keyed by (seed, step), independent of the training batch and
of the number of ranks), k completions each, unfiltered. After the real optimizer step, with
Δθ = θ_{k+1} − θ_k taken from the parameters (Adam moments, bias correction, weight decay and
clipping included), two passes over the E-batch in the probe's precision
(``probes/evaluation.py``): per-token h, log π(y_t) and the stopping probability P_S at θ_k with
their derivatives along Δθ (one forward-mode pass), and the same at θ_{k+1} (one forward). From these
(``probes/functional/delta_h.py``, where the estimators are derived):

- δH₁ = ⟨∇H(θ_k), Δθ⟩, stop-aware Rao–Blackwellised;
- ΔH_true, the stop-aware doubly robust importance-sampling estimate on the same E-batch, of
  which δH₁ is exactly the first-order term;
- both with a leave-one-out baseline (no state carried between steps, the first due step
  included) and a two-stage standard error (prompts, then completions), the target being the
  mean over the prompt pool;
- cov_pred = −η·Cov_tokens(log π, A) on the training batch (Cui et al. 2505.22617), the naive
  prediction, for comparison.

Only the first PPO epoch's optimizer step is probed. Options: ``batch_size`` (B_E, sequences
over all ranks, default 16), ``completions_per_prompt`` (k, default 2), ``microbatch_size``
(default train.microbatch_size), ``pool`` (eval | train prompts, default eval), ``precision``
(auto | float32 | float64 | model, default auto: float32 over a bf16 model),
``sampler_correction`` (per_decision | none, default per_decision): the E-batch is drawn by the
rollout engine (bf16, LoRA-merged or compiled decoding), whose policy differs from the evaluated
π_θk by rounding; per_decision importance-weights every decision back to π_θk with the log-prob
the sampler reports for each token, so the estimates are unbiased for π_θk (none: estimates for
the sampler's policy, which the weights' ESS says how far off), ``split_matmul`` (auto | always | never,
default auto: on over a bf16 model on a GPU): the float32 passes' products with the frozen
weights as sums of bf16 GEMMs with float32 output, float32's accuracy at a fraction of its cost
(``probes/split_matmul.py``).

| key | meaning |
|---|---|
| `pred`, `pred_se`, `pred_df` | δH₁ per sequence (nats), its SE, and the SE's Satterthwaite df: the 95 % interval is pred ± t_{df, 0.975}·pred_se (the same `_df` for every `_se` below) |
| `pred_stop`, `pred_stop_se` | the part of `pred` due to changed stopping probabilities |
| `true`, `true_se` | ΔH_true per sequence (stop-aware, doubly robust) and its SE |
| `ess_frac` | Kish ESS of the sequence weights exp(S' − S) / B_E |
| `ratio` | pred / true |
| `H`, `H_se` | H(θ_k) per sequence: mean over the pool of E[Σ_t h_t] (the stop-aware value estimate V̂_0) |
| `pred_tok`, `true_tok`, `H_tok` | the same divided by L_budget = max_new_tokens |
| `cov_pred` | −lr·Cov(log π(y_t), A) over training tokens (a per-token entropy change) |
| `n`, `prompts`, `pool_frac` | B_E, prompts in the E-batch, their fraction of the pool (f) |
| `stop_frac` | fraction of E-batch completions that ended at a stop token (not the budget) |
| `stops_multi` | completions that ended with a multi-token stop string (decision seen only at its last token) |
| `logp_gap_tok` | mean per-token |log π in the probe's precision − log π as the trainer computes it (the model's dtype, under the trainer's autocast if it wraps forward)| (0 when they are the same) |
| `sampler_gap_tok`, `sampler_ess_frac` | how far the policy that sampled the E-batch (bf16, LoRA-merged or compiled decode) is from the evaluated π_θk: mean per-token |log π_θk − log π_sampler|, and Kish ESS / B_E of the sequence weights π_θk(y)/π_sampler(y) (1: the two are the same; ``sampler_correction`` per_decision weights each decision by its ratio) |
| `split_matmul` | 1: the float32 passes took their products with the bf16 frozen weights as split bf16 GEMMs (``split_matmul``), 0: as float32 GEMMs |
| `theta_k_own_forward` | 0: the values at θ_k came from the derivative pass (bit for bit a plain forward's, checked once per run); 1: on this device they differ, so θ_k gets a forward of its own (on any rank) |
| `time_gen_s`, `time_fwd_s`, `time_jvp_s` | cost: E-batch generation, the forward at θ_{k+1}, the derivative pass, which also gives the values at θ_k (slowest rank) |
"""

from __future__ import annotations

import dataclasses
import time

import torch

from probes.base import Probe, SetupContext, StepContext
from probes.ebatch import EBatch, EBatchSpec, sampler_correction, spec_from_options
from probes.evaluation import PRECISIONS, SPLIT_MATMUL, PolicyEvaluator, trainer_wraps_forward
from probes.functional import delta_h as F
from probes.manager import register
from rl_training.errors import ConfigError
from rl_training.policy import microbatches


OPTIONS = {"batch_size", "completions_per_prompt", "microbatch_size", "pool", "precision", "sampler_correction",
           "split_matmul"}


@register
class DeltaHProbe(Probe):
    kind = "delta_h"
    needs_param_snapshot = True

    def setup(self, ctx: SetupContext) -> None:
        self.check_options(OPTIONS)
        cfg = ctx.cfg
        self.spec = self.ebatch_spec = spec_from_options(self.options, batch_size=16)
        self.micro = int(self.options.get("microbatch_size", cfg.train.microbatch_size))
        self.precision = self.options.get("precision", "auto")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"probe '{self.name}': precision must be {'|'.join(PRECISIONS)}, got {self.precision!r}")
        self.split_matmul = self.options.get("split_matmul", "auto")
        if self.split_matmul not in SPLIT_MATMUL:
            raise ConfigError(f"probe '{self.name}': split_matmul must be {'|'.join(SPLIT_MATMUL)}, "
                              f"got {self.split_matmul!r}")
        self.sampler_correction = sampler_correction(self.options, self.name)
        self.ebatches = ctx.ebatches
        self.ebatches.check(self.spec, f"probe '{self.name}'")
        self.pool_size = len(self.ebatches.pool(self.spec))
        self.cfg = cfg
        self.l_budget = cfg.rollout.max_new_tokens
        self.stop_rule = ctx.ebatches.stop_rule(ctx.model)
        self._evaluator = None
        self._ebatch = None
        self.add_stat("tables", reduce="cat")  # [B, F, L] TokenTable rows of each microbatch
        # [B, 3]: pool index, ended (0 budget, 1 stop, 2 multi-token stop), log π_θk(y)/π_sampler(y)
        self.add_stat("rows", reduce="cat")
        for k in ("tok_n", "tok_lp", "tok_a", "tok_lpa", "gap_sum", "gap_n", "sampler_gap_sum", "sampler_gap_n"):
            self.add_stat(k)
        for part in ("gen", "fwd", "jvp"):  # cost breakdown, slowest rank
            self.add_stat(f"time_{part}_s", reduce="max")
        self.add_stat("theta_k_own_forward", reduce="max")
        self.add_stat("split_matmul", reduce="max")
        self.lr = float("nan")

    def spec_at(self, batch_size: int) -> EBatchSpec:
        """The probe's spec at another B_E (offline experiments), checked."""
        spec = dataclasses.replace(self.spec, batch_size=batch_size)
        self.ebatches.check(spec, f"probe '{self.name}'")
        return spec

    def evaluator(self, model) -> PolicyEvaluator:
        if self._evaluator is None or self._evaluator.model is not model:
            self._evaluator = PolicyEvaluator(model, self.precision, self.cfg.rollout.temperature,
                                              split_matmul=self.split_matmul)
        return self._evaluator

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
        self._ebatch = self.ebatches.get(ctx.model, ctx.step, self.spec)  # shared with other probes
        self.stats["time_gen_s"] += time.perf_counter() - t0

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.epoch > 0 or self._ebatch is None:
            return
        ebatch, self._ebatch = self._ebatch, None
        self.measure(ctx.model, ctx.params_before, ctx.delta_theta(), ebatch)

    # -------------------------------------------------------------------------- measuring
    def tables(self, model, theta: dict, ebatch: EBatch, theta_new: dict | None = None, delta: dict | None = None,
               cache: dict | None = None, timer: dict | None = None):
        """(TokenTable [b, ·, L_budget], rows [b, 3]) per microbatch of ``ebatch``.

        ``theta_new`` defaults to the model's current trainable values; without ``delta`` the
        derivative columns are 0 (only ΔH_true is meaningful then). ``cache`` keeps the θ-side
        evaluation of each microbatch across calls with the same θ and E-batch. ``timer`` (e.g.
        the probe's stats) accumulates time_fwd_s, time_jvp_s, gap_sum and gap_n.
        """
        timer = {} if timer is None else timer
        if ebatch.completions is None:
            return
        ev = self.evaluator(model)
        if theta_new is None:
            theta_new = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        always = torch.tensor(self.stop_rule.always, dtype=torch.long)
        # the trainer scores the policy otherwise (its dtype, or its autocast): measure how far
        measure_gap = ev.dtype != next(p.dtype for p in model.parameters() if not p.requires_grad) \
            or trainer_wraps_forward(model)
        for i, (rows, tensors) in enumerate(microbatches(ebatch.tensors, self.micro)):
            extra, extra_mask = self.stop_rule.stop_sets(tensors.completion_ids, tensors.completion_mask)
            stops = (always, extra, extra_mask)
            t0 = time.perf_counter()
            old, d = (cache or {}).get(i), None
            if delta is not None:
                values, d = ev.terms_jvp(tensors, stops, theta, delta)  # θ_k's values come with the derivatives
                old = values if old is None else old
            t1 = time.perf_counter()
            if old is None:
                old = ev.terms(tensors, stops, theta)
            if cache is not None:
                cache[i] = old
            new = ev.terms(tensors, stops, theta_new)
            timer["time_jvp_s"] = timer.get("time_jvp_s", 0.0) + t1 - t0
            timer["time_fwd_s"] = timer.get("time_fwd_s", 0.0) + time.perf_counter() - t1
            if measure_gap:
                gap, count = self._precision_gap(model, tensors, stops, theta_new, new["lp"])
                timer["gap_sum"], timer["gap_n"] = timer.get("gap_sum", 0.0) + gap, timer.get("gap_n", 0.0) + count
            ls = ebatch.sampler_log_ratios(rows, old["lp"])
            if ls is not None:
                ls = ls.cpu()
                timer["sampler_gap_sum"] = timer.get("sampler_gap_sum", 0.0) + float(ls.abs().sum())
                timer["sampler_gap_n"] = timer.get("sampler_gap_n", 0.0) + float(tensors.completion_mask.sum())
            yield self._table(tensors, always, extra, extra_mask, old, new, d, ebatch.prompt[rows], ls)

    def _table(self, tensors, always, extra, extra_mask, old, new, d, prompt, ls):
        mask = tensors.completion_mask.double()
        cont, in_always, in_extra = F.stop_split(tensors.completion_ids, mask, always, extra, extra_mask)
        zero = torch.zeros_like(mask)
        cpu = {k: v.detach().double().cpu() for k, v in old.items()}
        cpu_new = {k: v.detach().double().cpu() for k, v in new.items()}
        cpu_d = {k: v.detach().double().cpu() for k, v in d.items()} if d is not None else {}
        table = F.TokenTable(
            mask=mask, cont=cont, h=cpu["h"] * mask, lp=cpu["lp"] * mask, ps=cpu["ps"] * mask,
            h_new=cpu_new["h"] * mask, lp_new=cpu_new["lp"] * mask, ps_new=cpu_new["ps"] * mask,
            dh=cpu_d.get("h", zero) * mask, dlp=cpu_d.get("lp", zero) * mask, dps=cpu_d.get("ps", zero) * mask,
            ls=ls if ls is not None and self.sampler_correction == "per_decision" else zero,
        )
        # Σ_t log π_θk/π_sampler per row, for sampler_ess_frac whether or not it is corrected for
        log_w = ls.sum(-1) if ls is not None else torch.full((mask.shape[0],), float("nan"), dtype=torch.float64)
        last = (mask.sum(-1).long() - 1).clamp(min=0).unsqueeze(1)
        ended = torch.where(in_always.gather(1, last), 1, torch.where(in_extra.gather(1, last), 2, 0)).squeeze(1)
        width = table.mask.shape[1]
        stacked = torch.nn.functional.pad(table.stack(), (0, self.l_budget - width))
        return stacked, torch.stack([prompt.double(), ended.double(), log_w], dim=1)

    def _precision_gap(self, model, tensors, stops, trainable, lp_probe) -> tuple[float, float]:
        """Σ|log π in the probe's precision − log π as the trainer computes it| and the token
        count: how far the evaluated policy is from the one the trainer scores (its dtype, and its
        autocast where a trainer wraps forward, as TRL's bf16=True does) and samples from."""
        native = PolicyEvaluator(model, "model", self.cfg.rollout.temperature, trainer_forward=True)
        lp_model = native.terms(tensors, stops, trainable)["lp"]
        mask = tensors.completion_mask.to(lp_model.device).double()
        return float(((lp_probe - lp_model).abs() * mask).sum()), float(mask.sum())

    def measure(self, model, theta: dict, delta: dict, ebatch: EBatch, theta_new: dict | None = None) -> None:
        """Accumulate this rank's E-batch tables: δH₁ along ``delta`` at ``theta`` and ΔH_true
        at ``theta_new`` (default: the model's current parameters)."""
        for table, rows in self.tables(model, theta, ebatch, theta_new=theta_new, delta=delta, timer=self.stats):
            self.stats["tables"].append(table)
            self.stats["rows"].append(rows)
        self.stats["theta_k_own_forward"] = float(self.evaluator(model).primal_is_plain is False)
        self.stats["split_matmul"] = float(self.evaluator(model).split)

    # -------------------------------------------------------------------------- results
    def compute(self) -> dict[str, float]:
        s = self.stats
        out = {f"time_{p}_s": s[f"time_{p}_s"] for p in ("gen", "fwd", "jvp")}
        out["theta_k_own_forward"] = s["theta_k_own_forward"]
        out["split_matmul"] = s["split_matmul"]
        out.update(self.estimates(s["tables"], s["rows"]))
        out["cov_pred"] = F.cov_prediction(self.lr, s["tok_n"], s["tok_lp"], s["tok_a"], s["tok_lpa"])
        out["logp_gap_tok"] = s["gap_sum"] / s["gap_n"] if s["gap_n"] else 0.0
        if s["sampler_gap_n"]:
            out["sampler_gap_tok"] = s["sampler_gap_sum"] / s["sampler_gap_n"]
        return out

    def estimates(self, tables: list, rows: list) -> dict[str, float]:
        """The δH keys from gathered tables (every rank's rows, in rank order)."""
        if not tables:
            return {}
        tab = F.TokenTable.unstack(torch.cat(tables))
        meta = torch.cat(rows)
        out = F.estimate(tab, meta[:, 0].long(), meta[:, 1].long(), self.pool_size)
        out["ratio"] = out["pred"] / out["true"] if out["true"] else float("nan")
        log_w = meta[:, 2]
        if bool(torch.isfinite(log_w).all()):
            out["sampler_ess_frac"] = F.kish_ess_frac(log_w)
        L = float(self.l_budget)
        out.update(pred_tok=out["pred"] / L, true_tok=out["true"] / L, H_tok=out["H"] / L)
        return out
