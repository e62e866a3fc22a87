"""Fault injection for crash-safety tests, driven by environment variables (never set in use).

RL_TRAINING_KILL_DURING_CHECKPOINT=<point>[:<step>]
    SIGKILL this process at <point> of a checkpoint write ("after_optimizer": files half
    written; "before_latest": folder renamed, pointer not yet updated; "between_renames": a
    re-save's old folder moved aside, the new one not yet in place), optionally only when
    saving <step>.
RL_TRAINING_KILL_RANK_AT_STEP=<rank>:<step>
    SIGKILL rank <rank> when it starts step <step>, on the first torchrun attempt only
    (TORCHELASTIC_RESTART_COUNT == 0), to exercise ``torchrun --max-restarts``.
"""

from __future__ import annotations

import os
import signal

CHECKPOINT_ENV = "RL_TRAINING_KILL_DURING_CHECKPOINT"
RANK_STEP_ENV = "RL_TRAINING_KILL_RANK_AT_STEP"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_point(point: str, step: int) -> None:
    spec = os.environ.get(CHECKPOINT_ENV)
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name == point and (not at or int(at) == step):
        _die()


def step_start(rank: int, step: int) -> None:
    spec = os.environ.get(RANK_STEP_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    r, _, s = spec.partition(":")
    if int(r) == rank and int(s) == step:
        _die()
