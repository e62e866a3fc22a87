"""The probe interface: hooks named for the moment they fire, stats declared with a reduction.

A probe reads the training state and never writes it. Statistics are declared in ``setup``
with ``add_stat(name, default, reduce)``; the hooks accumulate into ``self.stats[name]``;
the manager reduces every declared stat of every due probe across ranks (all sum-stats in ONE
all_reduce), then calls ``compute`` which turns reduced sums into logged values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from probes.ebatch import EBatchSource, EBatchSpec
from probes.stats import StatSet
from rl_training.errors import ConfigError


# The figures that take every token's weight in the loss to be Dr-GRPO's (kind -> figures):
# importance weights on the loss (``train.sampler_correction``, TRL's vLLM correction) are left
# out of them. δH₁, ΔH, GNS and the Fisher kernel read the real update or ∇log π and are not.
LOSS_WEIGHTED = {"delta_h": "cov_pred", "ess": "the loss-weight ESS", "fisher": "the c_j and contrib_ratio"}


def loss_weighted_figures(kinds: set[str], exclude: set[str] = frozenset()) -> list[str]:
    """The figures, as "<kind>'s <figures>", of the probe kinds present that leave the loss's weights out."""
    return [f"{kind}'s {LOSS_WEIGHTED[kind]}" for kind in LOSS_WEIGHTED if kind in kinds and kind not in exclude]


@dataclass(frozen=True)
class StepContext:
    step: int
    model: torch.nn.Module  # unwrapped policy (PeftModel), never the DDP wrapper
    optimizer: torch.optim.Optimizer
    lr: float
    batch: Any  # RolloutBatch of this rank
    world: Any  # dist.DistInfo
    cfg: Any  # RunConfig
    epoch: int = 0  # PPO epoch (0 .. ppo_epochs − 1); the hooks below fire once per epoch
    microbatch: Any = None  # RolloutBatch slice, in on_before_microbatch and on_after_backward
    token_logp: torch.Tensor | None = None  # [b, L] detached log π of the microbatch's tokens
    token_weight: torch.Tensor | None = None  # [b, L] the loss's sampler importance weights (None: no correction)
    loss_scale: float = 1.0  # what this epoch's losses were multiplied by before their backward (float16); captured gradients carry it
    microbatch_index: int = -1
    num_microbatches: int = 0
    params_before: dict[str, torch.Tensor] | None = None  # θ_k: taken once per step, before the first optimizer.step
    helpers: dict[str, Callable] = field(default_factory=dict)

    def replace(self, **changes) -> StepContext:
        return dataclasses.replace(self, **changes)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def flat_grad(self) -> tuple[list[str], torch.Tensor]:
        """(names, float32 vector) of the trainable parameters' gradients, those without one left
        out, in one concatenation (a loop costs a few kernels a parameter): in
        ``on_before_optimizer_step``, the synced gradient before clipping."""
        named = [(n, p.grad) for n, p in self.trainable().items() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for _, g in named]).float() if named else torch.zeros(0)
        return [n for n, _ in named], flat

    def delta_theta(self) -> dict[str, torch.Tensor]:
        """θ_now − θ_k of the real optimizer step(s) (in on_after_optimizer_step only): with
        ppo_epochs > 1, epoch e sees the change of the e + 1 updates made so far in this step."""
        assert self.params_before is not None, "set needs_param_snapshot = True on the probe"
        return {n: p.detach() - self.params_before[n] for n, p in self.trainable().items()}


def is_last_microbatch(ctx) -> bool:
    """In ``on_after_backward``: the PPO epoch's last microbatch (its gradient is the synced one)."""
    return ctx.num_microbatches > 0 and ctx.microbatch_index == ctx.num_microbatches - 1


@dataclass
class SetupContext:
    cfg: Any
    world: Any
    model: torch.nn.Module
    tokenizer: Any
    options: dict
    eval_records: list = field(default_factory=list)  # held-out prompts (E-batches)
    train_records: list = field(default_factory=list)
    prompt_fn: Callable[[str], str] | None = None  # question -> prompt text, as in training
    ebatches: EBatchSource | None = None  # one per run: probes asking the same spec share the step's E-batch

    def __post_init__(self):
        if self.ebatches is None and self.cfg is not None:
            self.ebatches = EBatchSource(self.cfg, self.world, self.tokenizer, self.prompt_fn,
                                         {"eval": self.eval_records, "train": self.train_records})


class Probe:
    kind: str = ""
    needs_param_snapshot: bool = False  # manager snapshots θ before optimizer.step
    ebatch_spec: EBatchSpec | None = None  # set in setup by probes that use the step's E-batch (it rides with the rollouts)

    def __init__(self, name: str, every_n_steps: int = 1, options: dict | None = None):
        self.name = name
        self.every_n_steps = every_n_steps
        self.options = dict(options or {})
        self.statset = StatSet()
        self.stats: dict[str, Any] = self.statset.values  # what the hooks accumulate into
        self.step = 0  # the step being probed (set by the manager when the probe is due)
        self.output_dir: Path | None = None  # the run directory, for probes that write files (rank 0)

    # -- declaration ------------------------------------------------------------------
    def add_stat(self, name: str, default: float | torch.Tensor = 0.0, reduce: str = "sum", round: int = 0) -> None:
        """Declare a stat: a float or a fixed-shape tensor (sum/max/min elementwise), or a list
        of tensors for ``cat`` (concatenated over ranks, rank order); ``exchange``: summed before
        the update, in exchange round ``round`` (``on_exchanged``)."""
        self.statset.add(name, default, reduce, round)

    def reset_stats(self) -> None:
        self.statset.reset()

    def check_options(self, allowed: set[str]) -> None:
        unknown = set(self.options) - allowed
        if unknown:
            raise ConfigError(f"probe '{self.name}': unknown option(s) {sorted(unknown)} (valid: {sorted(allowed)})")

    def is_due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    # -- hooks (override what you need) -------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        pass

    def on_before_microbatch(self, ctx: StepContext) -> None:
        """Before each microbatch's forward (with ``ctx.microbatch``): attach captures here."""

    def on_after_backward(self, ctx: StepContext) -> None:
        pass

    def on_exchanged(self, ctx: StepContext, round: int) -> None:
        """At due steps of a probe with exchange-stats, after the manager summed their round
        ``round`` over the ranks (PPO epoch 0, after the last microbatch's ``on_after_backward``,
        before ``on_before_optimizer_step``): the sums are in ``stats``; the next round's values
        may be set here."""

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        pass

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        pass

    def on_step_dropped(self) -> None:
        """The step's update was skipped (a float16 gradient overflowed): no more hooks and no
        results this step; free what is held for it."""

    def on_reduced(self) -> None:
        """After the reduce, before ``compute``: update state (EMAs) from the reduced stats, so
        that ``compute`` stays a pure function of stats and state."""

    def compute(self) -> dict[str, float]:
        """Reduced stats -> logged values (keys without the probe/<name>/ prefix)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass
