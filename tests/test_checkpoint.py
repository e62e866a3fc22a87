"""Checkpoints: exact resume, atomic writes under SIGKILL, corruption detection, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl_training import checkpoint, faults
from rl_training.faults import CHECKPOINT_ENV
from runners.resume_training import main as resume_main
from tests.helpers.runs import REPO, TINY, adapter, run_in_process, run_script, same_metrics, train_log


def test_rng_state_round_trip_survives_weights_only_load(tmp_path):
    import random

    import numpy as np

    state = checkpoint.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def test_resume_is_bit_identical_continuation(tmp_path):
    straight = run_in_process(tmp_path / "a", "train.total_steps=4")
    half = run_in_process(tmp_path / "b", "train.total_steps=2")
    assert resume_main(["--run-dir", str(half), "--additional-steps", "2"]) == 0
    a, b = adapter(straight), adapter(half)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = train_log(straight), train_log(half)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        assert same_metrics(ra, rb), (ra, rb)
    # The resumed run appended to the same logs and TensorBoard folder.
    assert json.loads((half / "summary.json").read_text())["steps"] == 4


def test_resume_into_new_run_dir_and_from_an_older_step(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=3", "checkpoint.save_every=1", "checkpoint.keep_last_n=0")
    assert checkpoint.available_steps(run / "checkpoints") == [1, 2, 3]
    assert resume_main(["--run-dir", str(run), "--from-step", "1", "--additional-steps", "2", "--new-run-dir"]) == 0
    new_dirs = [p for p in run.parent.iterdir() if p != run]
    assert len(new_dirs) == 1 and (new_dirs[0] / "final_adapter").exists()
    # From step 1, two more steps reproduce the original step 3.
    a, b = adapter(run), adapter(new_dirs[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last_n_prunes_old_checkpoints(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=3", "checkpoint.save_every=1", "checkpoint.keep_last_n=2")
    assert checkpoint.available_steps(run / "checkpoints") == [2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"


@pytest.mark.parametrize("point", ["after_optimizer", "before_latest"])
def test_sigkill_while_writing_leaves_previous_checkpoint_loadable(tmp_path, point):
    out = tmp_path / "runs"
    args = ("--cfg", str(TINY), f"output_dir={out}", "run_name=run", "train.total_steps=3", "checkpoint.save_every=1")
    proc = run_script("rl_runner.py", *args, env={CHECKPOINT_ENV: f"{point}:2"}, expect=None)
    assert proc.returncode == -signal.SIGKILL
    run = out / "run"
    assert checkpoint.resolve(run / "checkpoints").name == "step_1"
    run_script("resume_training.py", "--run-dir", str(run))
    assert train_log(run)[-1]["step"] == 3
    # The resumed run ends where an uninterrupted one does.
    clean = run_in_process(tmp_path / "clean", "train.total_steps=3")
    a, b = adapter(clean), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_checkpoint_names_file_and_previous_good_step(tmp_path, capsys):
    run = run_in_process(tmp_path, "train.total_steps=2", "checkpoint.save_every=1")
    opt = run / "checkpoints" / "step_2" / checkpoint.OPTIMIZER_FILE
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=r"step_2 is corrupt: optimizer.pt truncated.*previous good step: 1"):
        checkpoint.resolve(run / "checkpoints")
    assert resume_main(["--run-dir", str(run), "--additional-steps", "1"]) == 2
    assert "previous good step: 1" in capsys.readouterr().err
    assert resume_main(["--run-dir", str(run), "--from-step", "1", "--additional-steps", "1"]) == 0


def test_sigterm_checkpoints_finished_step_and_exits_zero(tmp_path):
    out = tmp_path / "runs"
    run = out / "run"
    cmd = [sys.executable, str(REPO / "runners" / "rl_runner.py"), "--cfg", str(TINY), f"output_dir={out}",
           "run_name=run", "train.total_steps=50"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "logs" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    done = train_log(run)[-1]["step"]
    assert 1 <= done < 50
    assert checkpoint.resolve(run / "checkpoints").name == f"step_{done}"
    assert json.loads((run / "summary.json").read_text())["stopped_by_signal"] is True
    assert not (run / "final_adapter").exists()
    run_script("resume_training.py", "--run-dir", str(run), "--additional-steps", "1")
    assert [r["step"] for r in train_log(run)] == list(range(1, done + 2))


# ---------------------------------------------------------------- re-saves and abandoned branches


class _Adapter:
    """Stands in for a peft model: save_pretrained writes one safetensors file."""

    def __init__(self, value: float):
        self.value = value

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True)
        save_file({"w": torch.full((4,), self.value)}, str(Path(path) / "adapter_model.safetensors"))


def _save(root, step: int, value: float):
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return checkpoint.save(root, step, model=_Adapter(value), optimizer=opt, lr_scheduler=sched,
                           trainer_state={"value": value}, keep_last_n=0)


def _saved_value(root, which="latest") -> float:
    return checkpoint.load_trainer_state(checkpoint.resolve(root, which))["value"]


def test_resave_failing_at_the_second_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp_step_"):  # the new folder into place
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _save(root, 1, 2.0)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _saved_value(root) == 1.0 and _saved_value(root, 1) == 1.0


class _Killed(BaseException):
    """A SIGKILL stand-in: nothing after it in the writer runs."""


def test_resave_killed_between_the_renames_is_recovered(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)

    def kill_at(point, step):
        if point == "between_renames":
            raise _Killed

    monkeypatch.setattr(faults, "checkpoint_point", kill_at)
    with pytest.raises(_Killed):
        _save(root, 1, 2.0)
    monkeypatch.undo()
    assert not (root / "step_1").exists()  # the moment the old folder is aside
    checkpoint.recover(root)
    assert _saved_value(root) == 1.0
    # The next save of that step completes and leaves nothing aside.
    _save(root, 1, 3.0)
    assert _saved_value(root) == 3.0 and sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]


def test_renames_are_followed_by_an_fsync_of_the_checkpoints_folder(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)
    events = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        events.append(("replace", Path(dst).parent.resolve()))
        real_replace(src, dst)

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).resolve()))
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    _save(root, 1, 2.0)
    replaces = [i for i, e in enumerate(events) if e == ("replace", root.resolve())]
    assert len(replaces) >= 3  # old folder aside, new folder in place, latest pointer
    for i in replaces:
        assert ("fsync", root.resolve()) in events[i + 1:], events
    assert _saved_value(root) == 2.0


def test_resume_from_an_older_step_into_the_same_run_dir_drops_the_abandoned_branch(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=3", "checkpoint.save_every=1")
    ckpts = run / "checkpoints"
    assert checkpoint.available_steps(ckpts) == [1, 2, 3]
    old_step_2 = (ckpts / "step_2" / checkpoint.MODEL_DIR / "adapter_model.safetensors").read_bytes()
    started = time.time_ns()
    assert resume_main(["--run-dir", str(run), "--from-step", "1", "--additional-steps", "1"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_1", "step_2"]
    assert (ckpts / "latest").read_text().strip() == "step_2"
    # step_2 was written by the new branch, and (resume being exact) equals the abandoned one.
    assert (ckpts / "step_2" / checkpoint.MANIFEST_FILE).stat().st_mtime_ns >= started
    assert (ckpts / "step_2" / checkpoint.MODEL_DIR / "adapter_model.safetensors").read_bytes() == old_step_2
    assert checkpoint.load_trainer_state(ckpts / "step_2")[checkpoint.STEP_KEY] == 2
    assert [r["step"] for r in train_log(run)] == [1, 2]


def test_abandoned_steps_do_not_make_keep_last_n_prune_the_new_branch(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=4", "checkpoint.save_every=2", "checkpoint.keep_last_n=2")
    ckpts = run / "checkpoints"
    assert checkpoint.available_steps(ckpts) == [2, 4]
    # Today's pruning kept the abandoned step 4 and deleted the new branch's step 2.
    assert resume_main(["--run-dir", str(run), "--from-step", "2", "--additional-steps", "1"]) == 0
    assert checkpoint.available_steps(ckpts) == [2, 3]
    assert checkpoint.resolve(ckpts).name == "step_3"
