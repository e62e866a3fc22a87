"""Metric loggers: ``log_dict(payload, step)`` to TensorBoard and logs/train_log.jsonl.

Only rank 0 writes metrics (they are already reduced across ranks); every rank writes its
own sample of completions to logs/rollouts[.rank<r>].jsonl[.gz].
"""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path
from typing import Protocol


TRAIN_LOG = "train_log.jsonl"


class MetricLogger(Protocol):
    def log_dict(self, payload: dict[str, float], step: int) -> None: ...
    def log_text(self, tag: str, text: str, step: int) -> None: ...
    def close(self) -> None: ...


def _finite_or_none(v: float):
    v = float(v)
    return v if math.isfinite(v) else None


class JsonlLogger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1)

    def log_dict(self, payload: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: _finite_or_none(v) for k, v in payload.items()}}
        self._f.write(json.dumps(row) + "\n")

    def log_text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        self._f.close()


class TensorBoardLogger:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run logged past the checkpoint we resume from.
        self._w = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_dict(self, payload: dict[str, float], step: int) -> None:
        for k, v in payload.items():
            self._w.add_scalar(k, float(v), global_step=step)
        self._w.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._w.add_text(tag, text, global_step=step)

    def close(self) -> None:
        self._w.close()


class MultiLogger:
    def __init__(self, loggers: list):
        self.loggers = loggers

    def log_dict(self, payload: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_dict(payload, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for lg in self.loggers:
            lg.log_text(tag, text, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def build_logger(run_dir: Path, is_main: bool, purge_step: int | None = None) -> MultiLogger:
    if not is_main:
        return MultiLogger([])
    tb = TensorBoardLogger(run_dir / "tensorboard", purge_step if purge_step and purge_step > 1 else None)
    return MultiLogger([JsonlLogger(run_dir / "logs" / TRAIN_LOG), tb])


def truncate_logs(run_dir: Path, after_step: int) -> None:
    """Drop JSONL rows of steps > ``after_step`` (a crashed run may have logged past its
    last checkpoint), so that a resumed run's logs read as one continuous run."""
    for path in list((run_dir / "logs").glob("*.jsonl")) + list((run_dir / "logs").glob("*.jsonl.gz")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= after_step]
        tmp = path.with_name(path.name + ".tmp")
        with opener(tmp, "wt") as f:
            f.writelines(rows)
        tmp.replace(path)


class RolloutWriter:
    """A seeded fraction of each rank's completions, with prompt, reward breakdown, advantage."""

    def __init__(self, run_dir: Path, rank: int, fraction: float, use_gzip: bool, seed: int):
        name = "rollouts.jsonl" if rank == 0 else f"rollouts.rank{rank}.jsonl"
        path = run_dir / "logs" / (name + (".gz" if use_gzip else ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = gzip.open(path, "at") if use_gzip else open(path, "a")
        self.fraction = fraction
        self.rank = rank
        self.seed = seed

    def write(self, batch, step: int) -> None:
        rng = random.Random(f"{self.seed}/rollout-log/{self.rank}/{step}")  # same rows after a resume
        for i in range(len(batch)):
            if self.fraction < 1.0 and rng.random() >= self.fraction:
                continue
            row = {
                "step": step,
                "rank": self.rank,
                "record_id": batch.record_ids[i],
                "group": int(batch.group_index[i]),
                "prompt": batch.prompts[i],
                "completion": batch.texts[i],
                "tokens": int(batch.completion_mask[i].sum()),
                "advantage": float(batch.advantages[i]),
                **batch.breakdowns[i],
            }
            self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
