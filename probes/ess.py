"""ESS probe (kind ``ess``): how many sequences really drive the update.

The Dr-GRPO gradient at ratio 1 is Σ_i A_i Σ_t ∇log π(y_t) / (N·L): sequence i enters with
weight w_i = |A_i|·|y_i|, or |A_i|·Σ_t s_t with the sampler correction's token weights s_t
(``train.sampler_correction``). Kish's ESS = (Σw)²/Σw² over the step's N sequences (all ranks)
says how many equally weighted sequences the update is worth. Zero-advantage sequences
(groups topped up when filtering ran out of rounds) count in N with weight 0.

| key | meaning |
|---|---|
| `probe/<name>/loss_ess` | Kish ESS of w_i = |A_i|·tokens_i (·the sampler weights, when on) |
| `probe/<name>/loss_ess_frac` | loss_ess / N |
| `probe/<name>/max_weight_share` | max_i w_i / Σw: the share of the largest single sequence |
| `probe/<name>/sequences` | N, sequences in the optimizer step |
| `probe/<name>/ratio_ess_frac_tok` | with ppo_epochs > 1: Kish ESS / count of the PPO ratios ρ_t = π_θ(y_t)/π_old(y_t) over tokens, at the last epoch |
| `probe/<name>/ratio_ess_frac_seq` | the same for sequence weights Π_t ρ_t: how far the policy has moved from the one that sampled |

The ratios are read at the last PPO epoch's forward, before its update: the furthest the
policy gets from the behaviour policy within the step.
"""

from __future__ import annotations

from probes.base import Probe, StepContext
from probes.functional.ess import dr_grpo_weights, kish_ess, kish_sums
from probes.manager import register


@register
class EssProbe(Probe):
    kind = "ess"

    def setup(self, ctx) -> None:
        self.add_stat("sum_w")
        self.add_stat("sum_w2")
        self.add_stat("n")
        self.add_stat("max_w", reduce="max")
        for unit in ("tok", "seq"):  # PPO ratios (stay 0 with ppo_epochs = 1)
            for k in ("sum_w", "sum_w2", "n"):
                self.add_stat(f"ratio_{unit}_{k}")

    def on_after_backward(self, ctx: StepContext) -> None:
        mb = ctx.microbatch
        if ctx.epoch == 0:  # the batch is the same in every PPO epoch: count it once
            w = dr_grpo_weights(mb.advantages, mb.completion_mask, ctx.token_weight)
            sw, sw2 = kish_sums(w)
            self.stats["sum_w"] += sw
            self.stats["sum_w2"] += sw2
            self.stats["n"] += w.numel()
            self.stats["max_w"] = max(self.stats["max_w"], float(w.max()) if w.numel() else 0.0)
        last = ctx.cfg.train.ppo_epochs - 1
        if last == 0 or ctx.epoch != last:
            return
        mask = mb.completion_mask.to(ctx.token_logp.device).bool()
        log_ratio = (ctx.token_logp.double() - mb.old_logp.to(ctx.token_logp.device).double()) * mask
        for unit, w in (("tok", log_ratio.exp()[mask]), ("seq", log_ratio.sum(-1).exp())):
            sw, sw2 = kish_sums(w)
            self.stats[f"ratio_{unit}_sum_w"] += sw
            self.stats[f"ratio_{unit}_sum_w2"] += sw2
            self.stats[f"ratio_{unit}_n"] += w.numel()

    def compute(self) -> dict[str, float]:
        s = self.stats
        ess = kish_ess(s["sum_w"], s["sum_w2"])
        return {
            "loss_ess": ess,
            "loss_ess_frac": ess / s["n"] if s["n"] else float("nan"),
            "max_weight_share": s["max_w"] / s["sum_w"] if s["sum_w"] > 0 else float("nan"),
            "sequences": s["n"],
            **{f"ratio_ess_frac_{u}": kish_ess(s[f"ratio_{u}_sum_w"], s[f"ratio_{u}_sum_w2"]) / s[f"ratio_{u}_n"]
               for u in ("tok", "seq") if s[f"ratio_{u}_n"] > 0},
        }
