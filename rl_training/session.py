"""Assemble a run from a config (data, model, LoRA, scheduler, probes, run directory) and
drive the trainer step by step with logging. Runners are thin wrappers around this.

Everything that can fail because of user input (config, data, model) is resolved before the
run directory is created, so a bad input never leaves a run directory behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from probes.manager import ProbeManager
from rl_training import checkpoint, faults, models
from rl_training.config import RunConfig, dump_yaml, load_config, validate
from rl_training.data.prompts import build_prompt
from rl_training.data.records import Record, load_task, split_records
from rl_training.data.scheduler import DifficultyScheduler
from rl_training.dist import DistInfo
from rl_training.errors import ConfigError, UserError
from rl_training.loggers import RolloutWriter, build_logger, truncate_logs
from rl_training.rewards import get_reward_fn
from rl_training.trainer import Trainer

log = logging.getLogger("rl_training")

@dataclass
class Session:
    cfg: RunConfig
    world: DistInfo
    trainer: Trainer
    train_records: list[Record]
    eval_records: list[Record]
    run_dir: Path | None = None


def load_records(cfg: RunConfig) -> tuple[list[Record], list[Record]]:
    d = cfg.data
    records = load_task(d.task, path=d.path, split=d.split, n=d.num_records, seed=cfg.seed, level=d.level)
    return split_records(records, d.eval_fraction, cfg.seed)


def load_policy(cfg: RunConfig):
    spec = models.ModelSpec(cfg.model.name_or_path, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir, seed=cfg.seed)
    tokenizer, base = models.load_tokenizer_and_model(spec)
    models.set_float32_logits(base, cfg.model.float32_logits)
    lora = cfg.model.lora
    model = models.apply_lora(base, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules, seed=cfg.seed)
    return tokenizer, model


def build_session(cfg: RunConfig, world: DistInfo) -> Session:
    validate(cfg, world.world_size)
    torch.manual_seed(cfg.seed)
    train_records, eval_records = load_records(cfg)
    tokenizer, model = load_policy(cfg)
    model.to(world.device)
    scheduler = DifficultyScheduler(
        train_records, seed=cfg.seed, ema_decay=cfg.scheduler.ema_decay,
        hard_threshold=cfg.scheduler.hard_threshold, easy_threshold=cfg.scheduler.easy_threshold,
        weights=tuple(cfg.scheduler.weights),
    )
    use_chat = cfg.data.use_chat_template
    prompt_fn = lambda q: build_prompt(q, tokenizer, use_chat)  # noqa: E731
    check_prompt_lengths(train_records + eval_records, prompt_fn, tokenizer, cfg.data.max_prompt_tokens)
    trainer = Trainer(cfg, world, model, tokenizer, scheduler, prompt_fn, get_reward_fn(cfg.data.reward),
                      ProbeManager.from_config(cfg.probes), eval_records)
    return Session(cfg, world, trainer, train_records, eval_records)


def resume_session(
    run_dir: Path, world: DistInfo, *, which: str | int = "latest", additional_steps: int | None = None,
    new_run_dir: bool = False, overrides: list[str] = (),
) -> tuple[Session, int]:
    """A session restored from run_dir/checkpoints/<which>; returns it and the step to stop at."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"not a run directory (no config.yaml): {run_dir}")
    ckpt_root = run_dir / "checkpoints"
    if world.is_main and ckpt_root.is_dir():
        checkpoint.recover(ckpt_root)  # a re-save killed between its renames
    world.barrier()
    ckpt = checkpoint.resolve(ckpt_root, which)
    cfg = load_config(cfg_path, list(overrides))
    session = build_session(cfg, world)
    session.trainer.load_checkpoint(ckpt)
    step = session.trainer.step
    last = step + additional_steps if additional_steps is not None else cfg.train.total_steps
    if cfg.train.schedule == "cosine" and last > cfg.train.total_steps:
        log.warning("cosine schedule ends at train.total_steps=%d; steps beyond it run at lr 0", cfg.train.total_steps)
    if new_run_dir:
        session.run_dir = create_run_dir(dataclasses.replace(cfg, run_name=None), world)
    else:
        session.run_dir = run_dir
        if world.is_main:
            truncate_logs(run_dir, step)
            abandon_later_steps(run_dir, step)
        world.barrier()
    log.info("resumed %s at step %d; training to step %d in %s", ckpt, step, last, session.run_dir)
    return session, last


def abandon_later_steps(run_dir: Path, step: int) -> None:
    """Resuming from an older step into the same run directory starts a new branch: the old
    branch's later checkpoints and final adapter go (kept, they would be taken for the new
    branch's, and keep_last_n would prune the new branch's checkpoints instead)."""
    dropped = checkpoint.drop_later_steps(run_dir / "checkpoints", step)
    if dropped:
        shutil.rmtree(run_dir / "final_adapter", ignore_errors=True)
        log.warning("resuming from step %d: deleted the abandoned branch's checkpoints of steps %s", step, dropped)


def elastic_marker(cfg: RunConfig) -> Path | None:
    """Under torchrun, a file naming this job's run directory, so a restarted job finds it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    key = "_".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    return Path(cfg.output_dir) / ".torchelastic" / key.replace("/", "_")


def start_or_restart(cfg: RunConfig, world: DistInfo) -> tuple[Session, int]:
    """A new run, or — when torchrun restarted the workers — the same run from its latest checkpoint."""
    marker = elastic_marker(cfg)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and marker is not None and marker.is_file():
        run_dir = Path(marker.read_text().strip())
        if (run_dir / "checkpoints" / checkpoint.LATEST_FILE).is_file():
            log.warning("torchrun restart: resuming %s from its latest checkpoint", run_dir)
            return resume_session(run_dir, world)
    session = build_session(cfg, world)
    session.run_dir = create_run_dir(cfg, world)
    if world.is_main and marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(session.run_dir.resolve()) + "\n")
    return session, cfg.train.total_steps


def check_prompt_lengths(records, prompt_fn, tokenizer, limit: int) -> None:
    """Refuse prompts longer than data.max_prompt_tokens rather than cut them silently
    (a cut prompt loses its end: the question and the assistant header)."""
    lengths = [len(ids) for ids in tokenizer([prompt_fn(r.question) for r in records], add_special_tokens=False)["input_ids"]]
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ConfigError(
            f"'data.max_prompt_tokens' ({limit}) is shorter than {len(too_long)} of {len(lengths)} prompts "
            f"(longest {max(too_long)} tokens); raise it"
        )


def create_run_dir(cfg: RunConfig, world: DistInfo) -> Path:
    """runs/run_<timestamp>/ chosen by rank 0 and shared with the other ranks."""
    name = cfg.run_name or f"run_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"
    name = world.all_gather_object(name)[0]
    run_dir = Path(cfg.output_dir) / name
    if world.is_main:
        if run_dir.exists():
            suffix = 1
            while (run_dir.parent / f"{name}_{suffix}").exists():
                suffix += 1
            run_dir = run_dir.parent / f"{name}_{suffix}"
        (run_dir / "logs").mkdir(parents=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return Path(world.all_gather_object(str(run_dir))[0])


class GracefulStop:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits 0."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: finishing the current step, then checkpointing", signal.Signals(signum).name)
        self.requested = True

    def agreed(self, world: DistInfo) -> bool:
        """Stop on every rank if any rank was signalled (ranks must stop at the same step)."""
        flag = torch.tensor([float(self.requested)])
        return bool(world.all_reduce_max(flag).item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fit(session: Session, last_step: int | None = None) -> dict:
    """Train until ``last_step`` (default train.total_steps) with logging and checkpoints."""
    cfg, world, trainer, run_dir = session.cfg, session.world, session.trainer, session.run_dir
    assert run_dir is not None
    last = cfg.train.total_steps if last_step is None else last_step
    ckpt_root = run_dir / "checkpoints"
    trainer.probes.set_output_dir(run_dir)
    logger = build_logger(run_dir, world.is_main, purge_step=trainer.step + 1)
    writer = RolloutWriter(run_dir, world.rank, cfg.logging.rollout_fraction, cfg.logging.rollout_gzip, cfg.seed)
    stop = GracefulStop()
    bar = None
    if world.is_main and cfg.logging.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=last, initial=trainer.step, desc="dr-grpo", unit="step", dynamic_ncols=True)
    history = []
    t0 = time.perf_counter()
    try:
        while trainer.step < last:
            faults.step_start(world.rank, trainer.step + 1)
            out = trainer.train_step()
            writer.write(out.batch, out.step)
            logger.log_dict(out.metrics, out.step)
            _log_samples(logger, out, cfg.logging.text_samples)
            history.append(out.metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{out.metrics['rollout/reward_mean']:.3f}", loss=f"{out.metrics['train/loss']:.4f}")
            stopping = stop.agreed(world)
            every = cfg.checkpoint.save_every
            if stopping or trainer.step == last or (every and trainer.step % every == 0):
                trainer.save_checkpoint(ckpt_root)
            if stopping:
                break
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        writer.close()
        logger.close()
    summary = summarize(history, time.perf_counter() - t0, trainer.step)
    summary["world_size"] = world.world_size
    summary["collectives"] = world.backend if world.enabled else "none"
    summary["rank_param_max_abs_diff"] = rank_param_divergence(trainer.policy, world)
    summary["stopped_by_signal"] = stop.requested
    if world.is_main:
        if trainer.step == last:
            trainer.policy.save_pretrained(str(run_dir / "final_adapter"))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    world.barrier()
    return summary


def _log_samples(logger, out, n: int) -> None:
    b = out.batch
    for i in range(min(n, len(b))):
        logger.log_text(
            "rollouts",
            f"**reward {b.rewards[i]:.2f}, advantage {b.advantages[i]:+.2f}**\n\n"
            f"```\n{b.prompts[i][-300:]}\n```\n\n```\n{b.texts[i]}\n```",
            out.step,
        )


def param_checksums(model) -> torch.Tensor:
    """[tensors, 2] float64: Σθ and Σθ² of each trainable tensor, summed on its device."""
    rows = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
            for p in model.parameters() if p.requires_grad]
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)


def rank_param_divergence(model, world: DistInfo) -> float:
    """max over trainable tensors of |checksum_rank − checksum_rank0|: DDP must keep it exactly 0
    (same values, same kernels, same sums). Two numbers per tensor cross the wire, not copies
    of the parameters (≈ 0.6 GB per rank in float64 for Qwen2.5-1.5B with LoRA r64)."""
    sums = world.all_gather(param_checksums(model))  # [world, tensors, 2]
    return float((sums - sums[0]).abs().max()) if sums.numel() else 0.0


def summarize(history: list[dict], seconds: float, step: int) -> dict:
    def col(key):
        return [h[key] for h in history if key in h]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    rewards = col("rollout/reward_mean")
    probe_times = [sum(v for k, v in h.items() if k.startswith("probe/") and k.endswith("/time_s")) for h in history]
    first_step = step - len(history) + 1
    return {
        "steps": step,
        "steps_this_run": len(history),
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, len(history)),
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "reward_mean": mean(rewards),
        "pass_rate_mean": mean(col("rollout/pass_rate")),
        "groups_rejected_frac_mean": mean(col("rollout/groups_rejected_frac")),
        "entropy_first": (col("train/entropy") or [None])[0],
        "entropy_last": (col("train/entropy") or [None])[-1],
        "tokens_per_s_mean": mean(col("time/tokens_per_s")),
        "logp_mismatch_mean": mean(col("rollout/logp_mismatch_tok")),
        "updates_skipped": sum(col("train/updates_skipped")),  # float16 overflows (0 in other dtypes)
        "time_mean_s": {"step": mean(col("time/step_s")), "rollout": mean(col("time/rollout_s")),
                        "probes": mean(probe_times)},
        # The last value each probe key had (probes are due every N steps, B_simple once resolved),
        # and the step it is from.
        "probes_last": {k: col(k)[-1] for k in sorted({k for h in history for k in h if _summary_key(k)})},
        "probes_last_step": {k: first_step + max(i for i, h in enumerate(history) if k in h)
                             for k in sorted({k for h in history for k in h if _summary_key(k)})},
    }


def _summary_key(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return key.startswith("probe/") and name in ("pred", "pred_se", "pred_df", "true", "true_se", "pred_stop", "b_simple",
                                                 "b_simple_seq", "b_resolved", "loss_ess_frac", "contrib_ratio")
