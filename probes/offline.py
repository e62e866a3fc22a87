"""Offline entropy experiments on a saved checkpoint (driven by runners/entropy_runner.py).

An ``EntropyExperiment`` restores a checkpoint exactly as a resumed run would (weights,
optimizer, LR scheduler, data scheduler) and offers the three pieces every experiment
combines:

- ``update(lr, key)``: Δθ of one REAL training step from the checkpoint — the trainer's own
  rollout (a filtered U-batch), loss, clipping and the checkpoint's optimizer (Adam moments
  included) at learning rate ``lr`` — after which everything is restored;
- ``ebatch(b_e, key)``: an unfiltered E-batch of held-out prompts × 1 completion at θ;
- ``delta_h(delta, ebatch)`` / ``snis(theta_new, ebatch)``: δH₁ along Δθ and ΔH_true by
  SNIS, with the in-loop probe's code (probes/delta_h.py).

Keys make every random draw reproducible: the same key gives the same U- or E-batch.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from probes.base import SetupContext
from probes.delta_h import DeltaHProbe, completion_tensors, sequence_stats
from probes.functional import delta_h as F
from rl_training import checkpoint, policy
from rl_training.config import config_from_dict, grad_accum, parse_overrides
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
                 runtime_dtype: str | None = None, estimator: str = "rb", microbatch_size: int | None = None):
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
        self.T = self.cfg.rollout.temperature
        self.probe = DeltaHProbe("offline", 1, {"estimator": estimator, "batch_size": 2,
                                                **({"microbatch_size": microbatch_size} if microbatch_size else {})})
        tokenizer, prompt_fn = self.trainer.tokenizer, self.trainer.prompt_fn
        self.probe.setup(SetupContext(self.cfg, self.world, self.model, tokenizer, self.probe.options,
                                      eval_records=self.session.eval_records, train_records=self.session.train_records,
                                      prompt_fn=prompt_fn))
        log.info("loaded %s (step %d)", self.path, self.trainer.step)

    # ------------------------------------------------------------------------ U side
    def update(self, lr: float, key: int, bu: int | None = None) -> dict[str, torch.Tensor]:
        """Δθ of one real training step at learning rate ``lr`` on U-batch ``key``; state restored."""
        tr = self.trainer
        saved = (copy.deepcopy(tr.optimizer.state_dict()), copy.deepcopy(tr.lr_scheduler.state_dict()),
                 copy.deepcopy(tr.scheduler.state_dict()), tr.step, tr.cfg.train.buffer_size)
        if bu is not None:
            if bu % self.cfg.rollout.group_size:
                raise ConfigError(f"--bu {bu} must be a multiple of rollout.group_size ({self.cfg.rollout.group_size})")
            tr.cfg.train.buffer_size = bu
            tr.accum = grad_accum(tr.cfg, self.world.world_size)
        try:
            for group in tr.optimizer.param_groups:
                group["lr"] = lr
            tr.step = 10_000_000 + key  # rollout seeds are keyed by step: a fresh U-batch per key
            tr.train_step()
            return {n: p.detach() - self.theta[n] for n, p in tr.trainable.items()}
        finally:
            with torch.no_grad():
                for n, p in tr.trainable.items():
                    p.copy_(self.theta[n])
            tr.optimizer.load_state_dict(saved[0])
            tr.lr_scheduler.load_state_dict(saved[1])
            tr.scheduler.load_state_dict(saved[2])
            tr.step, tr.cfg.train.buffer_size = saved[3], saved[4]
            tr.accum = grad_accum(tr.cfg, self.world.world_size)

    # ------------------------------------------------------------------------ E side
    def ebatch(self, b_e: int, key: int):
        self.probe.batch_size = b_e
        return self.probe.sample_ebatch(self.model, step=20_000_000 + key)

    def set_baseline_from(self, ebatch) -> None:
        """RB baseline b_t from an E-batch independent of the ones it will be used on."""
        G_sum = torch.zeros(self.probe.l_budget, dtype=torch.float64)
        cnt = torch.zeros_like(G_sum)
        for tensors in self._chunks(ebatch):
            _, _, G = sequence_stats(self.model, tensors, self.T)
            mask = tensors[3].double()
            w = min(G.shape[1], len(G_sum))
            G_sum[:w] += (G * mask)[:, :w].sum(0)
            cnt[:w] += mask[:, :w].sum(0)
        self.probe.baseline = torch.where(cnt > 0, G_sum / cnt.clamp(min=1), torch.zeros_like(cnt))

    def _chunks(self, comp):
        for _, tensors in policy.microbatches(completion_tensors(comp), self.probe.micro):
            yield tensors

    def delta_h(self, delta: dict, ebatch, scale: float = 1.0) -> dict[str, float]:
        """δH₁ = ⟨∇H, scale·Δθ⟩ and ΔH_true at θ + scale·Δθ (per sequence), with SEs."""
        step = {n: scale * d for n, d in delta.items()}
        theta_new = {n: self.theta[n] + step[n] for n in step}
        baseline = self.probe.baseline
        self.probe.reset_stats()
        self.probe.measure(self.model, self.theta, step, ebatch, theta_new=theta_new)
        out = self.probe.compute()
        self.probe.baseline = baseline  # compute() moves it; offline it stays fixed
        return out

    def snis(self, theta_new: dict, ebatch, cache: dict | None = None) -> dict[str, float]:
        """ΔH_true at ``theta_new`` on ``ebatch`` (θ-side stats cached per E-batch in ``cache``)."""
        sums = dict.fromkeys(F.SNIS_SUMS, 0.0)
        n = 0
        for i, tensors in enumerate(self._chunks(ebatch)):
            if cache is not None and i in cache:
                S_old, H_old = cache[i]
            else:
                S_old, H_old, _ = sequence_stats(self.model, tensors, self.T)
                if cache is not None:
                    cache[i] = (S_old, H_old)
            S_new, H_new, _ = sequence_stats(self.model, tensors, self.T, params=theta_new)
            for k, v in F.snis_sums(S_old, S_new, H_old, H_new).items():
                sums[k] += v
            n += S_old.numel()
        return {**F.snis_estimate(sums, n), "H": sums["H"] / n, "n": n}
