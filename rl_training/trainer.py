"""The Dr-GRPO training loop. One step, top to bottom:

    records = scheduler.sample(rank)              # disjoint prompts per rank, EMA pass-rate buckets
    rollout = collect(engine, records)            # G samples/prompt, rewards, A = r − mean_group(r),
                                                  # drop groups with all-equal rewards, refill to buffer;
                                                  # the due probes' E-batches ride in its first decode call
    for epoch in ppo_epochs:
      for i, mb in enumerate(microbatches(rollout)):      # grad_accum = buffer / (world × micro)
          probes.on_before_microbatch(ctx)        # captures attach (per-sequence gradients)
          with no_sync unless last: (S · loss(mb)).backward()   # S: the loss scale, 1 but in float16
          probes.on_after_backward(ctx)           # local, per-microbatch gradients (GNS small batch); after
                                                  # the last of epoch 0: exchange-stats summed over the ranks,
                                                  # a round at a time, each followed by probes.on_exchanged
      unscale gradients; norm = |g|               # float16: ÷ the loss scale; |g| inf/nan: the update
                                                  # is skipped and the due probes drop this step
      probes.on_before_optimizer_step(ctx)        # synced gradient (GNS big batch)
      if epoch == 0: snapshot θ_k                 # once per step, only if a due probe asks
      clip with norm; optimizer.step() if finite
      probes.on_after_optimizer_step(ctx)         # Δθ = θ_now − θ_k (exact, any optimizer)
      optimizer.zero_grad()                       # only after the probes ran
    lr_scheduler.step()                           # counts trainer steps, not PPO epochs
    stats = probes.reduce(train_stats)            # ONE all_reduce for all sum-stats: probes' and the trainer's
    logger.log_dict(stats | train_stats, step)    # rank 0: TensorBoard + logs/train_log.jsonl

Randomness is keyed by (seed, step, ...) rather than drawn from a running stream, so a step
is a function of the parameters and the step number alone: one process and N ranks draw the
same global batch, and a resumed run repeats what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from probes.base import SetupContext, StepContext, loss_weighted_figures
from probes.manager import ProbeManager
from probes.stats import StatSet
from rl_training import checkpoint, policy, rollout
from rl_training.algs.dr_grpo import SamplerWeights, dr_grpo_loss, sampler_weights
from rl_training.config import RunConfig, grad_accum, to_dict
from rl_training.dist import DistInfo
from rl_training.engine import build_engine
from rl_training.loss_scale import LossScaler
from rl_training.sampling import stable_seed

log = logging.getLogger("rl_training")


def build_optimizer(model, cfg: RunConfig):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, t.total_steps - t.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' total 2-norm (a 0-d tensor); parameters without a gradient (trainable but
    outside this step's graph) count as zero."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def clip_grads(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """clip_grad_norm_ with the norm already taken (``total_grad_norm``); max_norm <= 0: no clip."""
    grads = [p for p in params if p.grad is not None]
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total_norm)


# The trainer's own per-step statistics, (name, reduce): reduced across ranks together with the
# probes' stats, in one collective per reduction.
TRAIN_STATS = (
    ("loss", "sum"), ("tokens", "sum"), ("entropy_sum", "sum"), ("surprisal_sum", "sum"),
    ("clipped", "sum"), ("ppo_tokens", "sum"), ("kl_sum", "sum"),
    ("sequences", "sum"), ("reward_sum", "sum"), ("pass_sum", "sum"), ("format_sum", "sum"),
    ("completion_tokens", "sum"), ("groups", "sum"), ("groups_rejected", "sum"),
    ("underfilled_groups", "sum"), ("rounds", "max"), ("completion_len_max", "max"),
    ("rollout_seconds", "max"), ("mismatch_sum", "sum"), ("mismatch_tokens", "sum"), ("mismatch_max", "max"),
    ("sampler_weight_sum", "sum"), ("sampler_outside", "sum"), ("updates_skipped", "max"),
)


@dataclass
class StepOutput:
    step: int
    metrics: dict[str, float]
    batch: rollout.RolloutBatch


class Trainer:
    def __init__(self, cfg: RunConfig, world: DistInfo, model, tokenizer, scheduler, prompt_fn, reward_fn,
                 probes: ProbeManager, eval_records: list = ()):
        self.cfg, self.world = cfg, world
        self.policy = model  # PeftModel; generation and probes use it unwrapped
        self.tokenizer = tokenizer
        self.engine = build_engine(cfg, model, tokenizer)  # rollouts; probes sample their E-batches exactly
        self.scheduler, self.prompt_fn, self.reward_fn = scheduler, prompt_fn, reward_fn
        self.probes = probes
        self.accum = grad_accum(cfg, world.world_size)
        self.ddp = DDP(model, device_ids=None) if world.enabled else None
        self.optimizer, self.lr_scheduler = build_optimizer(model, cfg)
        self.loss_scaler = LossScaler(cfg.model.dtype == "float16", cfg.train.loss_scale_init)
        self.step = 0  # optimizer steps done
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        setup = SetupContext(cfg, world, model, tokenizer, {}, eval_records=list(eval_records),
                             train_records=list(scheduler.records), prompt_fn=prompt_fn)
        self.ebatches = setup.ebatches  # the probes' E-batches, generated with the step's rollouts
        probes.setup(setup)
        if cfg.train.sampler_correction != "none" and world.is_main:
            # the ESS probe reads the loss's weights (StepContext.token_weight); these do not
            hit = loss_weighted_figures({p.kind for p in probes.probes}, exclude={"ess"})
            if hit:
                log.warning("train.sampler_correction=%s weights each token's loss by π_trainer/π_sampler; %s take "
                            "those weights as 1", cfg.train.sampler_correction, ", ".join(hit))

    # ------------------------------------------------------------------------------ step
    def train_step(self) -> StepOutput:
        cfg, world, step = self.cfg, self.world, self.step + 1
        t_step = time.perf_counter()
        self.probes.begin_step(step)

        self.policy.eval()  # no dropout in rollouts
        with self.ebatches.riding(self.engine, step, self.probes.ebatch_specs()) as engine:  # one decode pass
            batch = rollout.collect(engine, self.scheduler, self.prompt_fn, self.reward_fn, cfg, step=step, world=world)
        rollout.add_logprobs(self.policy, batch, cfg)
        self.policy.train()
        torch.manual_seed(stable_seed(cfg.seed, "train", step, world.rank))  # LoRA dropout

        train_stats = StatSet(TRAIN_STATS)
        train_stats.reset()
        sums = train_stats.values
        lr = self.lr_scheduler.get_last_lr()[0]  # the lr of every PPO epoch of this step
        ctx = StepContext(step, self.policy, self.optimizer, lr, batch, world, cfg)
        micro = cfg.train.microbatch_size
        grad_norm = 0.0
        snapshot = None
        params = list(self.trainable.values())
        for epoch in range(cfg.train.ppo_epochs):
            ctx = ctx.replace(epoch=epoch, loss_scale=self.loss_scaler.scale)
            for i in range(self.accum):
                mb = batch.select(slice(i * micro, (i + 1) * micro))
                mb_ctx = ctx.replace(microbatch=mb, microbatch_index=i, num_microbatches=self.accum)
                self.probes.on_before_microbatch(mb_ctx)  # captures attach to the forward+backward
                with self._no_sync(i < self.accum - 1):
                    terms, ent, surprisal, logp, sw = self._microbatch_loss(mb)
                    self.loss_scaler.scale_loss(terms.loss).backward()
                self._accumulate(sums, terms, ent, surprisal, first_epoch=epoch == 0)
                if epoch == 0:
                    self._add_mismatch(sums, mb, logp, sw)
                self.probes.on_after_backward(mb_ctx.replace(token_logp=logp, token_weight=sw.weight if sw else None))
            self.loss_scaler.unscale_(params)
            norm = total_grad_norm(params)  # once a step: the overflow check and the clip
            finite = self.loss_scaler.finite(norm)
            if not finite:  # the same on every rank: the gradients are synced
                sums["updates_skipped"] += 1.0
                self.probes.drop_step()
            self.probes.on_before_optimizer_step(ctx)
            if epoch == 0:  # θ_k, before the first update of the step; later epochs see it too
                snapshot = self.probes.param_snapshot(self.trainable)
            clip_grads(params, cfg.train.grad_clip, norm)
            grad_norm = float(norm)
            if finite:
                self.optimizer.step()
            self.loss_scaler.update(finite)
            self.probes.on_after_optimizer_step(ctx.replace(params_before=snapshot))
            self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped (float16 overflow) first update: the schedule counts steps anyway
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.lr_scheduler.step()

        self.step = step
        self._add_rollout_stats(sums, batch.stats)
        probe_metrics = self.probes.reduce(world, shared=train_stats)  # reduces sums in place too
        metrics = self._metrics(sums)
        metrics.update(probe_metrics)
        # The scheduler's state is the same on every rank (it sees the gathered pass rates).
        metrics.update({f"scheduler/{b}": float(n) for b, n in self.scheduler.bucket_counts().items()})
        metrics.update({"train/grad_norm": grad_norm, "train/lr": lr, "time/step_s": time.perf_counter() - t_step})
        if self.loss_scaler.enabled:  # the scale the next step starts with; epochs whose update overflowed
            metrics.update({"train/loss_scale": self.loss_scaler.scale, "train/updates_skipped": sums["updates_skipped"]})
        return StepOutput(step, metrics, batch)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a checkpoint needs beyond weights, optimizer and LR scheduler (rank-independent)."""
        return {
            checkpoint.STEP_KEY: self.step,
            checkpoint.DATA_KEY: self.scheduler.state_dict(),
            checkpoint.PROBES_KEY: self.probes.state_dict(),
            checkpoint.LOSS_SCALE_KEY: self.loss_scaler.state_dict(),
        }

    def close(self) -> None:
        """Free DDP; call it before ``dist.shutdown()``. DDP's reducer holds the process group:
        freed after ``destroy_process_group`` it destroys the group itself while holding the GIL,
        and gloo's worker threads, freeing the tensors of the last collectives, wait for the GIL:
        a hang at exit (seen in CI; pytorch/pytorch#56297). ``destroy_process_group`` releases
        the GIL."""
        self.ddp = None

    def save_checkpoint(self, ckpt_root) -> None:
        """Every rank calls this; rank 0 writes, with the RNG states of all ranks."""
        rng = self.world.all_gather_object(checkpoint.rng_state())
        if self.world.is_main:
            state = {
                **self.state_dict(),
                checkpoint.RNG_KEY: rng,
                checkpoint.WORLD_SIZE_KEY: self.world.world_size,
                checkpoint.CONFIG_KEY: to_dict(self.cfg),
            }
            checkpoint.save(
                ckpt_root, self.step, model=self.policy, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                trainer_state=state, keep_last_n=self.cfg.checkpoint.keep_last_n,
            )
        self.world.barrier()

    def load_checkpoint(self, path) -> None:
        state = checkpoint.load_into(path, model=self.policy, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler)
        self.step = int(state[checkpoint.STEP_KEY])
        self.scheduler.load_state_dict(state[checkpoint.DATA_KEY])
        self.probes.load_state_dict(state[checkpoint.PROBES_KEY])
        if checkpoint.LOSS_SCALE_KEY in state:  # absent from checkpoints older than float16 training
            self.loss_scaler.load_state_dict(state[checkpoint.LOSS_SCALE_KEY])
        rngs = state[checkpoint.RNG_KEY]
        # Sampling and dropout are keyed by (seed, step), so the restored streams matter only
        # to code outside the trainer; a different world size restores rank 0's.
        checkpoint.set_rng_state(rngs[self.world.rank] if len(rngs) == self.world.world_size else rngs[0])

    # ------------------------------------------------------------------------------ pieces
    def _microbatch_loss(self, mb: rollout.RolloutBatch):
        cfg = self.cfg
        model = self.ddp if self.ddp is not None else self.policy
        logits = policy.completion_logits(model, *mb.tensors, cfg.rollout.temperature)
        logp = policy.token_logprobs(logits, mb.completion_ids)
        mask = mb.completion_mask.to(logp.device)
        with torch.no_grad():
            ent = (policy.token_entropy(logits) * mask).sum()
            surprisal = -(logp * mask).sum()
        old = mb.old_logp.to(logp.device) if mb.old_logp is not None else logp.detach()
        ref = mb.ref_logp.to(logp.device) if mb.ref_logp is not None else None
        t = cfg.train
        sw = None if mb.sampler_logp is None else sampler_weights(
            old, mb.sampler_logp, mask, mode=t.sampler_correction, clip_min=t.sampler_clip_min,
            clip_max=t.sampler_clip_max)
        # DDP averages gradients over ranks; the loss divides by N·L over the whole step, so
        # each rank divides by N/world to make the average the global sum / (N·L).
        terms = dr_grpo_loss(
            logp, old, mb.advantages.to(logp.device), mask,
            num_sequences=cfg.train.buffer_size / self.world.world_size,
            l_budget=cfg.rollout.max_new_tokens,
            eps_low=cfg.train.eps_low, eps_high=cfg.train.eps_high,
            ref_logp=ref, kl_beta=cfg.train.kl_beta, token_weight=sw.weight if sw else None,
        )
        return terms, ent, surprisal, logp.detach(), sw

    def _accumulate(self, sums, terms, ent, surprisal, first_epoch: bool) -> None:
        # Report the loss of the global step (undo the per-rank ×world) averaged over epochs.
        sums["loss"] += float(terms.loss.detach()) / self.world.world_size / self.cfg.train.ppo_epochs
        sums["clipped"] += float(terms.clipped_tokens)
        sums["ppo_tokens"] += float(terms.tokens)
        if first_epoch:
            sums["tokens"] += float(terms.tokens)
            sums["entropy_sum"] += float(ent)
            sums["surprisal_sum"] += float(surprisal)
            sums["kl_sum"] += float(terms.kl_sum)

    @staticmethod
    def _add_mismatch(sums, mb: rollout.RolloutBatch, logp: torch.Tensor, sw: SamplerWeights | None) -> None:
        """|log π as the sampler computed it − log π as the loss scores it| per token: rounding
        (batch shapes, KV cache, merged or bf16 generation weights) and LoRA dropout, if any;
        and the importance weights that correct the loss for it, when they do."""
        if mb.sampler_logp is None:
            return
        if sw is not None:
            sums["sampler_weight_sum"] += float(sw.weight.double().sum())
            sums["sampler_outside"] += float(sw.outside.sum())
        mask = mb.completion_mask.to(logp.device).bool()
        gap = (logp.double() - mb.sampler_logp.to(logp.device).double()).abs()[mask]
        sums["mismatch_sum"] += float(gap.sum())
        sums["mismatch_tokens"] += float(gap.numel())
        sums["mismatch_max"] = max(sums["mismatch_max"], float(gap.max()) if gap.numel() else 0.0)

    def _add_rollout_stats(self, sums, st: rollout.RolloutStats) -> None:
        for name in ("sequences", "reward_sum", "pass_sum", "format_sum", "completion_tokens", "groups",
                     "groups_rejected", "underfilled_groups", "rounds", "completion_len_max"):
            sums[name] += float(getattr(st, name))
        sums["rollout_seconds"] = st.seconds

    def _metrics(self, s: dict[str, float]) -> dict[str, float]:
        """Logged values from the reduced TRAIN_STATS."""
        div = lambda a, b: a / b if b else float("nan")  # noqa: E731
        return {
            "train/loss": s["loss"],
            "train/entropy": div(s["entropy_sum"], s["tokens"]),
            "train/surprisal": div(s["surprisal_sum"], s["tokens"]),
            "train/clip_frac": div(s["clipped"], s["ppo_tokens"]),
            "train/kl": div(s["kl_sum"], s["tokens"]),
            "rollout/reward_mean": div(s["reward_sum"], s["sequences"]),
            "rollout/pass_rate": div(s["pass_sum"], s["sequences"]),
            "rollout/format_rate": div(s["format_sum"], s["sequences"]),
            "rollout/completion_len_mean": div(s["completion_tokens"], s["sequences"]),
            "rollout/completion_len_max": s["completion_len_max"],
            "rollout/groups_rejected_frac": div(s["groups_rejected"], s["groups"]),
            "rollout/underfilled_groups": s["underfilled_groups"],
            "rollout/rounds": s["rounds"],
            "rollout/logp_mismatch_tok": div(s["mismatch_sum"], s["mismatch_tokens"]),
            "rollout/logp_mismatch_max": s["mismatch_max"],
            **({"train/sampler_weight_mean": div(s["sampler_weight_sum"], s["mismatch_tokens"]),
                "train/sampler_outside_frac": div(s["sampler_outside"], s["mismatch_tokens"])}
               if self.cfg.train.sampler_correction != "none" else {}),
            "time/rollout_s": s["rollout_seconds"],
            "time/tokens_per_s": div(s["completion_tokens"], s["rollout_seconds"]),
        }

    def _no_sync(self, skip_sync: bool):
        if self.ddp is not None and skip_sync:
            return self.ddp.no_sync()
        return contextlib.nullcontext()
