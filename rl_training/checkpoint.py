"""Checkpoints: checkpoints/step_N/ with constant file names, written atomically.

Layout of one checkpoint (rank 0 writes; every rank contributes its RNG state):

    step_N/adapter/            LoRA adapter (safetensors, peft format)
    step_N/optimizer.pt        optimizer state_dict
    step_N/lr_scheduler.pt     LR scheduler state_dict
    step_N/trainer_state.pt    {STEP_KEY, RNG_KEY: [per rank], DATA_KEY, PROBES_KEY, CONFIG_KEY}
    step_N/manifest.json       sha256 and size of every file above, written last

A checkpoint is assembled in a temporary folder and renamed into place; ``latest`` (a small
text file naming the step folder) is replaced after that, and the checkpoints folder is
fsynced after every rename so that the renames themselves survive a power loss. A re-save of
an existing step moves the old folder aside (``.old_step_N``) before the new one is renamed
into place and deletes it only after; ``recover`` puts an aside folder back if a process died
between the two renames. A process killed at any moment therefore leaves a loadable
checkpoint and ``latest`` intact. Everything is loaded with ``torch.load(weights_only=True)``
and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rl_training import faults
from rl_training.errors import UserError

MODEL_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.pt"
LR_SCHEDULER_FILE = "lr_scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"

STEP_KEY = "step"
RNG_KEY = "rng"
DATA_KEY = "data_scheduler"
PROBES_KEY = "probes"
CONFIG_KEY = "config"
WORLD_SIZE_KEY = "world_size"
LOSS_SCALE_KEY = "loss_scale"


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or corrupt."""


# ---------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain Python values (weights_only-safe)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Files first, then every folder, deepest first: a folder's entries name synced files."""
    paths = sorted(root.rglob("*"))
    for p in paths:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted((p for p in paths if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)
    _fsync_dir(root)


def _aside(final: Path) -> Path:
    return final.with_name(f".old_{final.name}")


def save(ckpt_root: Path, step: int, *, model, optimizer, lr_scheduler, trainer_state: dict, keep_last_n: int) -> Path:
    """Write checkpoints/step_<step>/ atomically and point ``latest`` at it (rank 0 only)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    recover(ckpt_root)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp_step_{step}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(str(tmp / MODEL_DIR), safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    faults.checkpoint_point("after_optimizer", step)
    torch.save(lr_scheduler.state_dict(), tmp / LR_SCHEDULER_FILE)
    torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (tmp / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    _fsync_tree(tmp)
    _swap_into_place(tmp, final, step)
    faults.checkpoint_point("before_latest", step)
    point_latest(ckpt_root, final)
    shutil.rmtree(_aside(final), ignore_errors=True)  # the replaced checkpoint, if any
    _prune(ckpt_root, keep_last_n, protect=final)
    return final


def _swap_into_place(tmp: Path, final: Path, step: int) -> None:
    """Rename tmp to final. An existing final is renamed aside first, never deleted first, so
    at every moment either final or its aside folder is a complete checkpoint."""
    root = final.parent
    replacing = final.exists()
    if replacing:
        os.replace(final, _aside(final))
        _fsync_dir(root)
        faults.checkpoint_point("between_renames", step)
    try:
        os.replace(tmp, final)
    except BaseException:
        if replacing and not final.exists():  # put the old checkpoint back before failing
            os.replace(_aside(final), final)
        raise
    _fsync_dir(root)


def point_latest(ckpt_root: Path, folder: Path) -> None:
    """Atomically make ``latest`` name ``folder`` (a step folder in ckpt_root)."""
    latest_tmp = ckpt_root / f".{LATEST_FILE}.tmp"
    latest_tmp.write_text(folder.name + "\n")
    with open(latest_tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(latest_tmp, ckpt_root / LATEST_FILE)
    _fsync_dir(ckpt_root)


def recover(ckpt_root: Path) -> None:
    """Finish a re-save that a killed process left half done (rank 0 only): an aside folder
    whose step folder is missing goes back into place; one whose step folder exists (the new
    checkpoint was complete) is deleted, and so are half-written temporary folders."""
    for tmp in ckpt_root.glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for aside in ckpt_root.glob(".old_step_*"):
        final = ckpt_root / aside.name.removeprefix(".old_")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)
            _fsync_dir(ckpt_root)


def drop_later_steps(ckpt_root: Path, step: int) -> list[int]:
    """Make ``step`` the last checkpoint (rank 0 only): ``latest`` names it, then every later
    step folder — a branch abandoned by resuming from ``step`` — is deleted, so that it
    neither survives next to the new branch nor makes keep_last_n prune the new branch's
    checkpoints. Returns the deleted steps."""
    later = [s for s in available_steps(ckpt_root) if s > step]
    if later:
        point_latest(ckpt_root, ckpt_root / f"step_{step}")  # first: a kill in between stays consistent
    for s in later:
        shutil.rmtree(ckpt_root / f"step_{s}")
    if later:
        _fsync_dir(ckpt_root)
    return later


def _prune(ckpt_root: Path, keep_last_n: int, protect: Path) -> None:
    if keep_last_n <= 0:
        return
    steps = sorted(available_steps(ckpt_root))
    for s in steps[:-keep_last_n]:
        path = ckpt_root / f"step_{s}"
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- reading


def available_steps(ckpt_root: Path) -> list[int]:
    steps = []
    for p in ckpt_root.glob("step_*"):
        suffix = p.name.removeprefix("step_")
        if p.is_dir() and suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps)


def resolve(ckpt_root: Path, which: str | int = "latest", verified: bool = True) -> Path:
    """checkpoints/step_N for ``which`` = "latest" or a step number; verified unless told not to."""
    if not ckpt_root.is_dir():
        raise CheckpointError(f"no checkpoints folder: {ckpt_root}")
    if which == "latest":
        latest = ckpt_root / LATEST_FILE
        if not latest.is_file():
            raise CheckpointError(f"no '{LATEST_FILE}' pointer in {ckpt_root} (no checkpoint was completed)")
        path = ckpt_root / latest.read_text().strip()
    else:
        path = ckpt_root / f"step_{int(which)}"
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint {path} (available steps: {available_steps(ckpt_root) or 'none'})")
    if verified:
        verify(path)
    return path


def verify(path: Path) -> None:
    """Every file listed in the manifest exists with its size and hash, else CheckpointError."""
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        _corrupt(path, manifest_path, "manifest missing or unreadable")
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            _corrupt(path, f, "missing")
        if f.stat().st_size != meta["bytes"]:
            _corrupt(path, f, f"truncated ({f.stat().st_size} of {meta['bytes']} bytes)")
        if _sha256(f) != meta["sha256"]:
            _corrupt(path, f, "content does not match its checksum")


def _corrupt(path: Path, bad: Path, why: str):
    root = path.parent
    current = int(path.name.removeprefix("step_")) if path.name.removeprefix("step_").isdigit() else None
    good = []
    for s in reversed(available_steps(root)):
        if current is not None and s >= current:
            continue
        try:
            verify(root / f"step_{s}")
            good.append(s)
            break
        except CheckpointError:
            continue
    hint = f"previous good step: {good[0]}" if good else "no earlier good checkpoint"
    raise CheckpointError(f"checkpoint {path} is corrupt: {bad.name} {why}; {hint}")


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / TRAINER_STATE_FILE, weights_only=True)


def load_adapter(path: Path, model) -> None:
    """The checkpoint's LoRA weights into ``model`` (a PeftModel), in place."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / MODEL_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    assert not unexpected, f"adapter keys not in the model: {unexpected[:3]}"


def load_into(path: Path, *, model, optimizer, lr_scheduler) -> dict:
    """Load adapter weights, optimizer and LR scheduler in place; return the trainer state."""
    load_adapter(path, model)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / LR_SCHEDULER_FILE, weights_only=True))
    return load_trainer_state(path)
