"""Our probes inside TRL's ``GRPOTrainer`` (TRL 1.16, ``loss_type="dr_grpo"``).

    trainer = GRPOTrainer(model=peft_model, args=GRPOConfig(..., loss_type="dr_grpo"), ...)
    ProbeCallback(trainer, [{"name": "delta_h", "kind": "delta_h", "options": {"batch_size": 8}},
                            {"name": "ess", "kind": "ess"}, {"name": "gns", "kind": "gns"}],
                  eval_prompts=held_out_prompt_texts)
    trainer.train()          # logs probe/<name>/<key> next to TRL's own metrics

The probes run unchanged, with the hooks of our trainer (``rl_training/trainer.py``) fired at
the same moments of TRL's step. transformers callbacks give only the optimizer step, so five
methods of the trainer instance are wrapped, each calling the original:

| wrapped | why | fires |
|---|---|---|
| ``_generate_and_score_completions`` | TRL shuffles the generation batch before splitting it into microbatches: a group id must travel with the rows (GNS) | nothing; adds ``GROUP_KEY`` |
| ``compute_loss`` | the microbatch and its forward (captures attach before it) | ``on_before_microbatch``; the first microbatch of a step begins it |
| ``_get_per_token_logps_and_entropies`` | TRL's per-token log-probs of the microbatch, from its forward | nothing; keeps them for ``on_after_backward`` (``token_logp``) |
| ``training_step`` | the backward is inside it; after the window's last one the gradient is synced and not yet clipped | ``on_after_backward``; after the last microbatch the exchange rounds (``on_exchanged``), ``on_before_optimizer_step`` and θ_k's snapshot |
| ``_load_optimizer_and_scheduler`` | called with the checkpoint's folder when a run resumes (callbacks are not told it) | nothing; loads the probes' state saved there |

and the callback's ``on_optimizer_step`` (after ``optimizer.step``, before ``zero_grad``) fires
``on_after_optimizer_step``, reduces the stats across ranks (our ``ProbeManager``, on the process
group accelerate set up) and hands the values to TRL's metric buffer, so they are logged, averaged
over ``logging_steps`` like TRL's own, to its loggers (TensorBoard, ``state.log_history``). Its
``on_save`` writes the probes' state (GNS EMAs, disabled probes) into each checkpoint folder
(``probe_state.pt``, rank 0), and a run resumed from that checkpoint continues it.

What carries over, and the limits, probe by probe:
- all: one optimizer step per generation batch (``num_iterations`` = 1 and ``steps_per_generation``
  = ``gradient_accumulation_steps``, TRL's defaults); refused otherwise. Δθ is read from the
  parameters, so TRL's optimizer, schedule and clipping are included exactly. Every completion
  token in the loss: ``top_entropy_quantile`` < 1 and an entropy bonus (``entropy_coef``,
  ``use_adaptive_entropy``) change the loss's weights, and are refused. With vLLM, TRL's
  importance-sampling correction weights each token's loss by π_θ/π_vLLM: the figures that take
  the loss's weights to be Dr-GRPO's (``probes.base.LOSS_WEIGHTED``) leave them out, and a
  warning says so.
  Gradient checkpointing and ``bf16=True`` (TRL's defaults) are fine: the probes' passes take
  off the input-gradient hook and accelerate's autocast wrapper of ``forward``
  (``probes/evaluation.py``). ``fp16=True`` is refused: its gradients are loss-scaled until
  accelerate unscales them inside its clipping, after the probes read them. A checkpoint
  without ``probe_state.pt`` (from a run without this callback) resumes with fresh probe state,
  and says so in a warning. Several processes reduce over accelerate's process group through
  ``DistInfo`` (tested: two processes log what one does on the same generation batch).
- ``delta_h``, ``fisher``: the E-batch comes from ``eval_prompts`` (prompt texts as TRL's
  generation sees them, chat template applied), sampled by our exact full-vocabulary sampler from
  π_T, stopping at EOS like TRL's ``generate`` (``stop_strings`` to match other stopping). TRL's
  truncating sampling options (top_p < 1, top_k, min_p) change what TRL samples, not π_T that its
  loss scores: the probes measure π_T. ``cov_pred`` uses TRL's own per-token log-probs. Fisher
  reads TRL's AdamW state for D and ``max_grad_norm`` for the clipping factor; its files go to
  ``<output_dir>/fisher/``.
- ``ess``: loss weights |A_i|·|y_i| are Dr-GRPO's, so ``loss_type="dr_grpo"`` is required; the
  PPO-ratio ESS needs ``num_iterations`` > 1 and is not logged.
- ``gns``: an example is a prompt group with some nonzero advantage; TRL keeps zero-advantage
  groups in the batch, where they count as generated groups (``q``). Each process must hold whole
  groups (its generation batch a multiple of ``num_generations``), else refused. The scale of
  TRL's loss differs from ours by a constant, which cancels in B_simple.
"""

from __future__ import annotations

import logging
import math
import types
from pathlib import Path

import torch
import torch.distributed as tdist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from probes.base import SetupContext, StepContext, loss_weighted_figures
from probes.ebatch import EBatchSource
from probes.manager import ProbeManager
from rl_training.config import config_from_dict
from rl_training.dist import DistInfo
from rl_training.errors import ConfigError
from rl_training.rollout import RolloutBatch, RolloutStats

log = logging.getLogger(__name__)

GROUP_KEY = "probe_group_index"  # added to TRL's batch dict: the prompt group of each row
STATE_FILE = "probe_state.pt"  # the probes' state, in each of TRL's checkpoint folders


def is_correction_warning(args, probes: list[dict]) -> str | None:
    """With vLLM generation, TRL's importance-sampling correction (its default) multiplies each
    token's loss by π_θ/π_vLLM, truncated or masked (whole sequences in the default mode): the
    figures of ``LOSS_WEIGHTED`` then leave those weights out. None where nothing is affected.
    (Not supported instead: no vLLM here to test TRL's ratios against.)"""
    if not (getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False)):
        return None
    hit = loss_weighted_figures({p.get("kind") for p in probes})
    if not hit:
        return None
    return (f"ProbeCallback: TRL's vLLM importance-sampling correction (mode "
            f"{getattr(args, 'vllm_importance_sampling_mode', '?')}) weights each token's loss by π_θ/π_vLLM; "
            f"{', '.join(hit)} take those weights as 1 (δH₁, ΔH, GNS and the Fisher kernel do not use them). "
            f"vllm_importance_sampling_correction=False makes them exact")


class ProbeCallback(TrainerCallback):
    def __init__(self, trainer, probes: list[dict], *, eval_prompts: list[str] = (), train_prompts: list[str] = (),
                 stop_strings: tuple[str, ...] = (), strict: bool = False):
        args = trainer.args
        self._check(args)
        warning = is_correction_warning(args, probes)
        if warning:
            log.warning(warning)
        self.trainer = trainer
        acc = trainer.accelerator
        self.world = DistInfo(rank=acc.process_index, world_size=acc.num_processes, local_rank=acc.local_process_index,
                              device=acc.device, backend=str(tdist.get_backend()) if tdist.is_initialized() else "gloo")
        tokenizer = trainer.processing_class
        self.G = args.num_generations
        self.accum = args.gradient_accumulation_steps
        longest = max([len(tokenizer(p, add_special_tokens=False).input_ids) for p in [*eval_prompts, *train_prompts]]
                      or [1])
        self.cfg = config_from_dict({
            "seed": args.seed,
            "data": {"max_prompt_tokens": longest},
            "rollout": {"group_size": self.G, "max_new_tokens": args.max_completion_length,
                        "temperature": args.temperature, "filter_groups": False},
            "train": {"microbatch_size": args.per_device_train_batch_size, "ppo_epochs": 1,
                      "grad_clip": float(args.max_grad_norm or 0.0),
                      "buffer_size": args.per_device_train_batch_size * self.accum * self.world.world_size},
            "probes": {"strict": strict, "probes": list(probes)},
        }, where="ProbeCallback")
        self.probes = ProbeManager.from_config(self.cfg.probes)
        record = lambda text: types.SimpleNamespace(question=text)  # noqa: E731
        pools = {"eval": [record(p) for p in eval_prompts], "train": [record(p) for p in train_prompts]}
        ebatches = EBatchSource(self.cfg, self.world, tokenizer, lambda text: text, pools, stop_strings=stop_strings)
        self.model = trainer.model  # the PeftModel; trainer.model_wrapped is what DDP wraps
        self.probes.setup(SetupContext(self.cfg, self.world, self.model, tokenizer, {}, ebatches=ebatches))
        self.probes.set_output_dir(Path(args.output_dir))  # Fisher's files: <output_dir>/fisher/
        self._ctx: StepContext | None = None
        self._mb: StepContext | None = None
        self._snapshot = None
        self._logp: torch.Tensor | None = None
        self._wrap(trainer)
        trainer.add_callback(self)

    @staticmethod
    def _check(args) -> None:
        if args.loss_type != "dr_grpo":
            raise ConfigError(f"ProbeCallback: loss_type must be 'dr_grpo' (the probes' loss weights), got {args.loss_type!r}")
        if args.num_iterations != 1 or args.steps_per_generation != args.gradient_accumulation_steps:
            raise ConfigError("ProbeCallback: needs one optimizer step per generation batch (num_iterations = 1, "
                              f"steps_per_generation = gradient_accumulation_steps); got {args.num_iterations}, "
                              f"{args.steps_per_generation} vs {args.gradient_accumulation_steps}")
        # Options that change which tokens and terms enter TRL's loss: the ESS weights, Fisher's
        # contributions and δH's covariance prediction are Dr-GRPO's over every completion token.
        neutral = {"top_entropy_quantile": 1.0, "entropy_coef": 0.0, "use_adaptive_entropy": False}
        changed = [f"{k}={getattr(args, k)!r}" for k, v in neutral.items() if getattr(args, k, v) != v]
        if changed:
            raise ConfigError(f"ProbeCallback: the probes take the loss to be Dr-GRPO's over every completion token; "
                              f"{', '.join(changed)} changes it (the neutral values: "
                              f"{', '.join(f'{k}={v!r}' for k, v in neutral.items())})")
        if getattr(args, "fp16", False):
            # accelerate unscales the gradients inside clip_grad_norm_, after our last backward
            # hook, and may skip the update: GNS and Fisher would read S-scaled gradients.
            raise ConfigError("ProbeCallback: fp16=True (loss-scaled gradients) is not supported; use bf16=True, or "
                              "our trainer's model.dtype=float16, whose probes know the loss scale")
        local = args.per_device_train_batch_size * args.steps_per_generation
        if local % args.num_generations:
            raise ConfigError(f"ProbeCallback: each process's generation batch ({local} rows) must hold whole groups "
                              f"of num_generations = {args.num_generations}")

    # ------------------------------------------------------------------------- wrapping
    def _wrap(self, trainer) -> None:
        generate, compute_loss, training_step = (trainer._generate_and_score_completions, trainer.compute_loss,
                                                 trainer.training_step)
        load_optimizer = trainer._load_optimizer_and_scheduler
        logps = trainer._get_per_token_logps_and_entropies

        def generate_with_groups(inputs):
            out = generate(inputs)
            n = len(out["advantages"])
            first = self.world.rank * n  # this process's rows of the global generation batch, in order
            out[GROUP_KEY] = torch.arange(first, first + n, device=out["advantages"].device) // self.G
            return out

        def compute_loss_probed(model, inputs, *a, **kw):
            if self.model.training:
                self._before_microbatch(inputs)
            return compute_loss(model, inputs, *a, **kw)

        def training_step_probed(model, inputs, *a, **kw):
            out = training_step(model, inputs, *a, **kw)
            if self._mb is not None:
                self._after_backward()
            return out

        def logps_kept(*a, **kw):
            result = logps(*a, **kw)
            if self._mb is not None:
                self._logp = result[0].detach()
            return result

        def load_optimizer_and_probes(checkpoint, *a, **kw):
            out = load_optimizer(checkpoint, *a, **kw)
            if checkpoint is not None:
                self._load_state(Path(checkpoint))
            return out

        trainer._generate_and_score_completions = generate_with_groups
        trainer._load_optimizer_and_scheduler = load_optimizer_and_probes
        trainer.compute_loss = compute_loss_probed
        trainer.training_step = training_step_probed
        trainer._get_per_token_logps_and_entropies = logps_kept

    # ------------------------------------------------------------------------- the step
    def _before_microbatch(self, inputs: dict) -> None:
        tr = self.trainer
        i = tr._step % self.accum
        if i == 0:
            step = tr.state.global_step + 1
            self.probes.begin_step(step)
            batch = step_batch(tr._buffered_inputs, self.G)
            optimizer = getattr(tr.optimizer, "optimizer", tr.optimizer)  # accelerate wraps it
            self._ctx = StepContext(step, self.model, optimizer, float("nan"), batch, self.world, self.cfg)
        self._mb = self._ctx.replace(microbatch=rollout_batch(inputs, self._ctx.batch.stats), microbatch_index=i,
                                     num_microbatches=self.accum)
        self._logp = None
        self.probes.on_before_microbatch(self._mb)

    def _after_backward(self) -> None:
        mb, self._mb = self._mb, None
        self.probes.on_after_backward(mb.replace(token_logp=self._logp))
        if mb.microbatch_index == self.accum - 1:  # synced gradient, before TRL clips it
            lr = self._ctx.optimizer.param_groups[0]["lr"]
            self._ctx = self._ctx.replace(lr=lr)
            self.probes.on_before_optimizer_step(self._ctx)
            trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            self._snapshot = self.probes.param_snapshot(trainable)

    # ------------------------------------------------------------------------- checkpoints
    def on_save(self, args, state, control, **kwargs):
        """After TRL wrote checkpoint-<step>: the probes' state next to it (the same on every rank)."""
        if not self.world.is_main:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        tmp = folder / f"{STATE_FILE}.tmp"
        torch.save(self.probes.state_dict(), tmp)
        tmp.replace(folder / STATE_FILE)  # a checkpoint never holds half a state file

    def _load_state(self, checkpoint: Path) -> None:
        path = checkpoint / STATE_FILE
        if not path.is_file():
            log.warning("ProbeCallback: %s has no %s; the probes start afresh (GNS EMAs restart)", checkpoint, STATE_FILE)
            return
        self.probes.load_state_dict(torch.load(path, weights_only=True))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._ctx is None:
            return
        ctx, self._ctx = self._ctx, None
        self.probes.on_after_optimizer_step(ctx.replace(params_before=self._snapshot))
        self._snapshot = None
        metrics = self.probes.reduce(self.world)
        buffer = self.trainer._metrics["train"]
        for key, value in metrics.items():
            if math.isfinite(value):
                buffer[key].append(value)


def rollout_batch(inputs: dict, stats: RolloutStats) -> RolloutBatch:
    """TRL's batch dict (or a microbatch of it) as our RolloutBatch; what TRL does not carry
    (rewards, texts) is left empty: no probe reads it."""
    n = len(inputs["advantages"])
    return RolloutBatch(
        inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"],
        rewards=torch.full((n,), float("nan")), advantages=inputs["advantages"].reshape(n).float(),
        group_index=inputs[GROUP_KEY].long().cpu(), record_ids=[""] * n, prompts=[""] * n, texts=[""] * n,
        breakdowns=[{}] * n, old_logp=inputs.get("old_per_token_logps"), ref_logp=inputs.get("ref_per_token_logps"),
        stats=stats,
    )


def step_batch(microbatches: list[dict], group_size: int) -> RolloutBatch:
    """The optimizer step's rows in the order its microbatches run (TRL pads the generation batch
    once, so they share widths). Groups with all-zero advantages count as rejected: they are in
    the batch but carry no gradient."""
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", GROUP_KEY)
    whole = {k: torch.cat([mb[k] for mb in microbatches]) for k in keys}
    for k in ("old_per_token_logps", "ref_per_token_logps"):
        if microbatches[0].get(k) is not None:
            whole[k] = torch.cat([mb[k] for mb in microbatches])
    gid, adv = whole[GROUP_KEY], whole["advantages"]
    groups = gid.unique()
    silent = sum(int(not bool((adv[gid == g] != 0).any())) for g in groups)
    lengths = whole["completion_mask"].sum(-1)
    stats = RolloutStats(rounds=1, sequences=len(gid), groups=len(groups), groups_rejected=silent,
                         completion_tokens=int(lengths.sum()), completion_len_max=int(lengths.max()))
    assert len(gid) == len(groups) * group_size, "a process holds part of a group"
    return rollout_batch(whole, stats)
