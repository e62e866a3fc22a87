"""Offline entropy experiments on a saved checkpoint (driven by runners/entropy_runner.py).

An ``EntropyExperiment`` restores a checkpoint exactly as a resumed run would (weights,
optimizer, LR scheduler, data scheduler) and offers the three pieces every experiment
combines:

- ``update(lr, key)``: Δθ of one REAL training step from the checkpoint — the trainer's own
  rollout (a filtered U-batch), loss, clipping and the checkpoint's optimizer (Adam moments
  included) at learning rate ``lr`` — after which everything is restored;
- ``ebatch(b_e, key)``: an unfiltered E-batch of held-out prompts × k completions at θ;
- ``delta_h(delta, ebatch)`` / ``true_change(theta_new, ebatch)``: δH₁ along Δθ and ΔH_true,
  with the in-loop probe's code (probes/delta_h.py); ``fisher_probe`` for the Fisher kernel
  between an E-batch and the last update's U-batch (probes/fisher.py).

Keys make every random draw reproducible: the same key gives the same U- or E-batch.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from probes.base import SetupContext
from probes.delta_h import DeltaHProbe
from probes.fisher import FisherProbe
from probes.functional.fisher import adam_preconditioner, clip_coefficient
from rl_training import checkpoint
from rl_training.config import config_from_dict, grad_accum, parse_overrides, validate
from rl_training.dist import DistInfo
from rl_training.errors import ConfigError
from rl_training.session import build_session

log = logging.getLogger(__name__)


def resolve_checkpoint(path: Path, need_optimizer: bool) -> Path:
    """A checkpoints/step_N folder (verified) from it, its checkpoints/ folder or a run directory."""
    path = Path(path)
    if not path.exists():
        raise checkpoint.CheckpointError(f"checkpoint not found: {path}")
    if (path / "checkpoints").is_dir():
        path = checkpoint.resolve(path / "checkpoints", verified=False)
    elif (path / checkpoint.LATEST_FILE).is_file():
        path = checkpoint.resolve(path, verified=False)
    elif not (path / checkpoint.MANIFEST_FILE).is_file():
        raise checkpoint.CheckpointError(
            f"{path} is not a checkpoint (no {checkpoint.MANIFEST_FILE}); pass runs/<run>/checkpoints/step_N or a run directory"
        )
    if need_optimizer and not (path / checkpoint.OPTIMIZER_FILE).is_file():
        raise checkpoint.CheckpointError(
            f"{path} has no optimizer state ({checkpoint.OPTIMIZER_FILE}): the update direction needs the "
            "checkpoint's optimizer; use a full training checkpoint"
        )
    checkpoint.verify(path)
    return path


class EntropyExperiment:
    def __init__(self, ckpt: Path, overrides: list[str] = (), *, need_optimizer: bool = True,
                 runtime_dtype: str | None = None, microbatch_size: int | None = None,
                 per_prompt: int = 2):
        self.path = resolve_checkpoint(ckpt, need_optimizer)
        state = checkpoint.load_trainer_state(self.path)
        tree = state[checkpoint.CONFIG_KEY]
        tree["probes"] = {"strict": True, "probes": []}  # offline: no in-loop probes
        tree.setdefault("logging", {})["progress_bar"] = False
        for key, value in parse_overrides(list(overrides)):
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        if runtime_dtype:
            tree["model"]["dtype"] = runtime_dtype
        self.cfg = config_from_dict(tree, where=f"{self.path} config")
        self.world = DistInfo()
        self.session = build_session(self.cfg, self.world)
        self.trainer = self.session.trainer
        self.trainer.load_checkpoint(self.path)
        self.model = self.trainer.policy
        self.theta = {n: p.detach().clone() for n, p in self.trainer.trainable.items()}
        self.probe = DeltaHProbe("offline", 1, {"batch_size": 2 * per_prompt, "completions_per_prompt": per_prompt,
                                                **({"microbatch_size": microbatch_size} if microbatch_size else {})})
        self.setup_ctx = SetupContext(self.cfg, self.world, self.model, self.trainer.tokenizer, {},
                                      eval_records=self.session.eval_records, train_records=self.session.train_records,
                                      prompt_fn=self.trainer.prompt_fn)
        self.probe.setup(dataclasses.replace(self.setup_ctx, options=self.probe.options))
        self.last_batch = None  # the U-batch of the last ``update``
        self.last_preconditioner = None  # Adam's D = 1/(√v̂ + ε) of the last ``update``
        log.info("loaded %s (step %d)", self.path, self.trainer.step)

    # ------------------------------------------------------------------------ U side
    def update(self, lr: float, key: int, bu: int | None = None) -> dict[str, torch.Tensor]:
        """Δθ of one real training step at learning rate ``lr`` on U-batch ``key``; state restored."""
        tr = self.trainer
        saved = (copy.deepcopy(tr.optimizer.state_dict()), copy.deepcopy(tr.lr_scheduler.state_dict()),
                 copy.deepcopy(tr.scheduler.state_dict()), tr.step, tr.cfg.train.buffer_size)
        if bu is not None:
            trial = copy.deepcopy(self.cfg)
            trial.train.buffer_size = bu
            try:  # the trainer's own batch rules (whole groups, rounds that can fill the buffer)
                validate(trial, self.world.world_size)
            except ConfigError as e:
                raise ConfigError(f"--bu {bu}: {e}") from None
            tr.cfg.train.buffer_size = bu
            tr.accum = grad_accum(tr.cfg, self.world.world_size)
        try:
            while True:  # float16: an overflowed update again on the same U-batch at half the loss scale
                for group in tr.optimizer.param_groups:  # (the scaler stops the run once S <= 1 overflows)
                    group["lr"] = lr
                tr.step = 10_000_000 + key  # rollout seeds are keyed by step: a fresh U-batch per key
                out = tr.train_step()
                if not out.metrics.get("train/updates_skipped"):
                    break
                self._restore(saved)
            self.last_batch = out.batch
            self.last_clip = clip_coefficient(out.metrics["train/grad_norm"], tr.cfg.train.grad_clip)
            self.last_preconditioner = adam_preconditioner(tr.optimizer, tr.trainable)
            return {n: p.detach() - self.theta[n] for n, p in tr.trainable.items()}
        finally:
            self._restore(saved)
            tr.cfg.train.buffer_size = saved[4]
            tr.accum = grad_accum(tr.cfg, self.world.world_size)

    def _restore(self, saved: tuple) -> None:
        """θ, optimizer, schedulers and step as before ``update`` (the loss scale is kept)."""
        tr = self.trainer
        with torch.no_grad():
            for n, p in tr.trainable.items():
                p.copy_(self.theta[n])
        tr.optimizer.load_state_dict(saved[0])
        tr.lr_scheduler.load_state_dict(saved[1])
        tr.scheduler.load_state_dict(saved[2])
        tr.step = saved[3]

    def fisher_probe(self, b_e: int, preconditioner: str) -> FisherProbe:
        probe = FisherProbe("offline", 1, {"batch_size": b_e, "completions_per_prompt": self.probe.spec.per_prompt,
                                           "microbatch_size": self.probe.micro, "preconditioner": preconditioner})
        probe.setup(dataclasses.replace(self.setup_ctx, options=probe.options))
        probe.reset_stats()
        return probe

    # ------------------------------------------------------------------------ E side
    def ebatch(self, b_e: int, key: int):
        spec = self.probe.spec_at(b_e)
        return self.probe.ebatches.sample(self.model, step=20_000_000 + key, spec=spec)

    def delta_h(self, delta: dict, ebatch, scale: float = 1.0) -> dict[str, float]:
        """δH₁ = ⟨∇H, scale·Δθ⟩ and ΔH_true at θ + scale·Δθ (per sequence), with SEs."""
        step = {n: scale * d for n, d in delta.items()}
        theta_new = {n: self.theta[n] + step[n] for n in step}
        self.probe.reset_stats()
        self.probe.measure(self.model, self.theta, step, ebatch, theta_new=theta_new)
        return self.probe.estimates(self.probe.stats["tables"], self.probe.stats["rows"])

    def true_change(self, theta_new: dict, ebatch, cache: dict | None = None) -> dict[str, float]:
        """ΔH_true at ``theta_new`` on ``ebatch`` (θ-side evaluations cached per E-batch in ``cache``)."""
        parts = list(self.probe.tables(self.model, self.theta, ebatch, theta_new=theta_new, cache=cache))
        out = self.probe.estimates([t for t, _ in parts], [r for _, r in parts])
        return {k: v for k, v in out.items() if not k.startswith(("pred", "ratio"))}
