"""Difficulty scheduler: sample prompts by how often the policy solves them.

Each prompt has an EMA of its observed pass rate and falls in a bucket: hard
(ema < hard_threshold), easy (ema > easy_threshold) or normal (including unseen prompts).
Prompts are drawn without replacement with probability proportional to their bucket weight.

Distributed contract: every rank builds the scheduler with the same records and seed, calls
``sample`` with the same arguments and ``update`` with the same (globally gathered) pass
rates, in the same order. The RNG then advances identically everywhere, all ranks hold the
same state, and ``sample`` hands each rank a disjoint slice of one global draw.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Sequence

from rl_training.data.records import Record
from rl_training.errors import ConfigError, DataError

BUCKETS = ("hard", "normal", "easy")


def ema_update(old: float | None, observed: float, decay: float) -> float:
    """decay*old + (1-decay)*observed; the first observation (old is None) is taken as is."""
    return observed if old is None else decay * old + (1.0 - decay) * observed


def _rng_state_to_json(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _rng_state_from_json(state: list) -> tuple:
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)


class DifficultyScheduler:
    """EMA pass-rate buckets over the train prompts; identical state on every rank."""

    def __init__(
        self,
        records: Sequence[Record],
        *,
        seed: int,
        ema_decay: float = 0.7,
        hard_threshold: float = 0.2,
        easy_threshold: float = 0.8,
        weights: Sequence[float] = (1.0, 1.0, 0.3),
    ) -> None:
        if not records:
            raise ConfigError("difficulty scheduler needs at least one train record")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"scheduler.ema_decay must be in [0, 1), got {ema_decay!r}")
        if not 0.0 <= hard_threshold <= easy_threshold <= 1.0:
            raise ConfigError(
                "scheduler thresholds need 0 <= hard_threshold <= easy_threshold <= 1, "
                f"got hard_threshold={hard_threshold!r}, easy_threshold={easy_threshold!r}"
            )
        try:
            ws = tuple(float(w) for w in weights)
        except (TypeError, ValueError):
            ws = ()  # reported by the check below
        if len(ws) != 3 or any(not math.isfinite(w) or w < 0 for w in ws) or not any(ws):
            raise ConfigError(
                "scheduler.weights must be three finite non-negative numbers (hard, normal, easy), "
                f"not all zero; got {weights!r}"
            )
        self.records = list(records)
        self._index = {rec.id: i for i, rec in enumerate(self.records)}
        if len(self._index) != len(self.records):
            raise DataError("difficulty scheduler got records with duplicate ids")
        self.ema_decay = ema_decay
        self.hard_threshold = hard_threshold
        self.easy_threshold = easy_threshold
        self.weights = dict(zip(BUCKETS, ws))
        self.ema: dict[str, float] = {}  # only prompts observed at least once
        self._rng = random.Random(seed)

    def bucket(self, prompt_id: str) -> str:
        """ "hard", "normal" or "easy"; unseen prompts are normal."""
        ema = self.ema.get(prompt_id)
        if ema is None:
            return "normal"
        if ema < self.hard_threshold:
            return "hard"
        if ema > self.easy_threshold:
            return "easy"
        return "normal"

    def sample(self, n_per_rank: int, rank: int, world_size: int) -> list[Record]:
        """This rank's ``n_per_rank`` prompts out of one global draw of n_per_rank*world_size.

        Weighted sampling without replacement by Efraimidis-Spirakis keys (u^(1/w), compared
        as log(u)/w). Exactly one RNG draw per record, whatever the rank, so the RNG stays in
        step across ranks. Zero-weight prompts are used only if the positive-weight ones
        run out, so a run whose prompts all become "easy" keeps going instead of crashing.
        """
        assert 0 <= rank < world_size, f"rank {rank} out of range for world_size {world_size}"
        total = n_per_rank * world_size
        if n_per_rank < 1 or total > len(self.records):
            raise ConfigError(
                f"cannot draw {n_per_rank} prompts per rank x {world_size} ranks from "
                f"{len(self.records)} train records"
            )
        keys = []
        for i, rec in enumerate(self.records):
            u = 1.0 - self._rng.random()  # in (0, 1], so log(u) is finite
            w = self.weights[self.bucket(rec.id)]
            keys.append(((1, math.log(u) / w) if w > 0 else (0, u), i))
        chosen = heapq.nlargest(total, keys)
        mine = chosen[rank * n_per_rank : (rank + 1) * n_per_rank]
        return [self.records[i] for _, i in mine]

    def update(self, pass_rates: dict[str, float]) -> None:
        """Fold in the latest observed pass rates (prompt id -> rate in [0, 1]).

        The trainer gathers rates from all ranks first, so every rank applies the same update.
        """
        for prompt_id, rate in pass_rates.items():
            assert prompt_id in self._index, f"unknown prompt id {prompt_id!r}"
            assert 0.0 <= rate <= 1.0, f"pass rate {rate!r} for {prompt_id!r} not in [0, 1]"
            self.ema[prompt_id] = ema_update(self.ema.get(prompt_id), float(rate), self.ema_decay)

    def bucket_counts(self) -> dict[str, int]:
        """Number of train prompts per bucket, for logging."""
        counts = dict.fromkeys(BUCKETS, 0)
        for rec in self.records:
            counts[self.bucket(rec.id)] += 1
        return counts

    def state_dict(self) -> dict:
        """JSON-serialisable state: EMAs and the RNG state."""
        return {"ema": dict(self.ema), "rng_state": _rng_state_to_json(self._rng.getstate())}

    def load_state_dict(self, sd: dict) -> None:
        unknown = [pid for pid in sd["ema"] if pid not in self._index]
        if unknown:
            raise ConfigError(
                f"scheduler state has {len(unknown)} prompt ids not in the current train records "
                f"(e.g. {unknown[0]!r}); did the data config change since the checkpoint?"
            )
        self.ema = {pid: float(v) for pid, v in sd["ema"].items()}
        self._rng.setstate(_rng_state_from_json(sd["rng_state"]))
