"""Every shell command in README.md's fenced bash blocks runs, as a user would run it: console
scripts of this environment on PATH, from a scratch working directory (so runs/ and results/
land there, not in the repo), nothing on PYTHONPATH.

The README keeps changing, so the commands are extracted, not copied. What the test changes
is listed below and nothing else: placeholders get a real value, a few long-running values get
a short one, and the demo config gets tiny-settings overrides appended. A command whose
program the test does not know fails with a request to teach it here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import REPO, free_port

README = REPO / "README.md"
BIN = Path(sys.executable).parent  # the environment's console scripts (rl-train, torchrun, ...)

# Placeholders the README uses -> what they stand for here.
PLACEHOLDERS = {
    "runs/run_X": "runs/run_X",  # the run the `trained_run` fixture creates under that name
    "--cfg ...": "--cfg cfg/tiny_test.yaml",
}
# Values shortened for time; each pair is (as in the README, as run here).
SHORTER = {
    "--additional-steps 50": "--additional-steps 1",
    "--from-step 20": "--from-step 2",  # the fixture run has steps 1 and 2
    "--repeats 5": "--repeats 2",
    "--runs 15": "--runs 3",
}
# key=value overrides appended to commands that name this config: one small step of the demo
# (one sampling round: with 8 new tokens every group would be rejected for equal rewards).
APPEND = {
    "cfg/smollm2_cpu_demo.yaml": ["train.total_steps=1", "rollout.max_new_tokens=8", "data.num_records=40",
                                  "train.buffer_size=8", "rollout.prompts_per_round=2", "rollout.filter_groups=false",
                                  "logging.progress_bar=false"],
}
RUNNABLE = {"rl-train", "rl-resume", "rl-entropy", "rl-eval", "rl-report", "torchrun"}
SLOW = ("torchrun", "smollm2")  # multi-process, or a real model


def readme_commands(text: str) -> list[list[str]]:
    """argv of every command in the ```bash / ```sh blocks: comments dropped, backslash
    continuations joined, a leading "$ " prompt removed."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)[^\n]*\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = pending + line, ""
            argv = shlex.split(line.strip().removeprefix("$ "), comments=True)
            if argv:
                commands.append(argv)
    return commands


def as_run_here(argv: list[str]) -> list[str]:
    """The README command with the substitutions above applied."""
    cmd = shlex.join(argv)
    for table in (PLACEHOLDERS, SHORTER):
        for old, new in table.items():
            cmd = re.sub(re.escape(old) + r"(?![\w.-])", new, cmd)
    assert "..." not in cmd and "…" not in cmd, f"README command with an unknown placeholder: {cmd}"
    out = shlex.split(cmd)
    for cfg, extra in APPEND.items():
        if cfg in out:
            out += extra
    return out


COMMANDS = readme_commands(README.read_text())


def _param(argv: list[str]):
    text = shlex.join(argv)
    marks = [pytest.mark.slow] if any(word in text for word in SLOW) else []
    if "torchrun" in text:
        marks.append(pytest.mark.ports)
    return pytest.param(argv, id=text[:90], marks=marks)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # PET_MASTER_PORT is torchrun's --master_port: tests running at the same time must not share 29500.
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "PET_MASTER_PORT": str(free_port())}


def _workdir(path: Path) -> Path:
    """A scratch working directory that sees the repo's configs and runner scripts."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("cfg", "runners"):
        (path / name).symlink_to(REPO / name)
    return path


def _run(argv: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """runs/run_X: a tiny run with a checkpoint at every step, made with the console script."""
    work = _workdir(tmp_path_factory.mktemp("readme_run"))
    _run(["rl-train", "--cfg", "cfg/tiny_test.yaml", "run_name=run_X", "train.total_steps=2",
          "checkpoint.save_every=1"], work, timeout=300)
    return work / "runs"


def test_readme_has_commands():
    programs = {argv[0] for argv in COMMANDS}
    assert {"make", "rl-train", "rl-resume", "rl-entropy", "rl-eval", "rl-report"} <= programs, programs


@pytest.mark.parametrize("argv", [_param(a) for a in COMMANDS])
def test_readme_command_runs(argv, tmp_path, request):
    if argv[0] == "make":  # `make demo` / `make test` are the whole job: check the targets exist
        _run(["make", "-n", "-C", str(REPO), *argv[1:]], REPO, timeout=60)
        return
    if argv[0] not in RUNNABLE:
        pytest.fail(f"README command {shlex.join(argv)!r}: teach tests/test_readme.py how to run {argv[0]!r}")
    work = _workdir(tmp_path / "work")
    if any("runs/run_X" in a for a in argv):
        shutil.copytree(request.getfixturevalue("trained_run"), work / "runs", symlinks=True)
    _run(as_run_here(argv), work, timeout=900)


def test_extractor_handles_comments_continuations_and_prompts():
    text = "x\n```bash\n# a comment\n$ rl-train --cfg a.yaml \\\n    k=1   # why\n\nmake demo\n```\n```yaml\nk: 1\n```\n"
    assert readme_commands(text) == [["rl-train", "--cfg", "a.yaml", "k=1"], ["make", "demo"]]
    assert as_run_here(["rl-resume", "--run-dir", "runs/run_X", "--additional-steps", "50"])[-1] == "1"
    assert as_run_here(["rl-train", "--cfg", "cfg/smollm2_cpu_demo.yaml"])[3] == "train.total_steps=1"
