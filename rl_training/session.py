"""Assemble a run from a config (data, model, LoRA, scheduler, probes, run directory) and
drive the trainer step by step with logging. Runners are thin wrappers around this.

Everything that can fail because of user input (config, data, model) is resolved before the
run directory is created, so a bad input never leaves a run directory behind.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from probes.manager import ProbeManager
from rl_training import models
from rl_training.config import RunConfig, dump_yaml, validate
from rl_training.data.prompts import build_prompt
from rl_training.data.records import Record, load_task, split_records
from rl_training.data.scheduler import DifficultyScheduler
from rl_training.dist import DistInfo
from rl_training.loggers import RolloutWriter, build_logger
from rl_training.rewards import get_reward_fn
from rl_training.trainer import Trainer

log = logging.getLogger("rl_training")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
    trainer = Trainer(cfg, world, model, tokenizer, scheduler, prompt_fn, get_reward_fn(cfg.data.reward),
                      ProbeManager.from_config(cfg.probes))
    return Session(cfg, world, trainer, train_records, eval_records)


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


def fit(session: Session, num_steps: int | None = None) -> dict:
    """Run ``num_steps`` (default: up to train.total_steps) steps with logging; returns a summary."""
    cfg, world, trainer, run_dir = session.cfg, session.world, session.trainer, session.run_dir
    assert run_dir is not None
    logger = build_logger(run_dir, world.is_main)
    writer = RolloutWriter(run_dir, world.rank, cfg.logging.rollout_fraction, cfg.logging.rollout_gzip, cfg.seed)
    last = cfg.train.total_steps if num_steps is None else trainer.step + num_steps
    bar = None
    if world.is_main and cfg.logging.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=last, initial=trainer.step, desc="dr-grpo", unit="step", dynamic_ncols=True)
    history = []
    t0 = time.perf_counter()
    try:
        while trainer.step < last:
            out = trainer.train_step()
            writer.write(out.batch, out.step)
            logger.log_dict(out.metrics, out.step)
            for i in range(min(cfg.logging.text_samples, len(out.batch))):
                b = out.batch
                logger.log_text(
                    "rollouts",
                    f"**reward {b.rewards[i]:.2f}, advantage {b.advantages[i]:+.2f}**\n\n"
                    f"```\n{b.prompts[i][-300:]}\n```\n\n```\n{b.texts[i]}\n```",
                    out.step,
                )
            history.append(out.metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{out.metrics['rollout/reward_mean']:.3f}", loss=f"{out.metrics['train/loss']:.4f}")
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        logger.close()
    summary = summarize(history, time.perf_counter() - t0, trainer.step)
    summary["world_size"] = world.world_size
    summary["rank_param_max_abs_diff"] = rank_param_divergence(trainer.policy, world)
    if world.is_main:
        trainer.policy.save_pretrained(str(run_dir / "final_adapter"))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    world.barrier()
    return summary


def rank_param_divergence(model, world: DistInfo) -> float:
    """max |θ_rank − θ_rank0| over trainable parameters: DDP must keep it exactly 0."""
    flat = torch.cat([p.detach().flatten().cpu().double() for p in model.parameters() if p.requires_grad])
    copies = world.all_gather_object(flat)
    return max(float((c - copies[0]).abs().max()) for c in copies)


def summarize(history: list[dict], seconds: float, step: int) -> dict:
    def col(key):
        return [h[key] for h in history if key in h]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    rewards = col("rollout/reward_mean")
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
        "entropy_last": (col("train/entropy") or [None])[-1],
        "tokens_per_s_mean": mean(col("time/tokens_per_s")),
    }
