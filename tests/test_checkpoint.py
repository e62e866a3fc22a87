"""Checkpoints: exact resume, atomic writes under SIGKILL, corruption detection, SIGTERM."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from rl_training import checkpoint
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
