"""Run the trainer from tests: in-process (one rank) or under torchrun (several ranks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "cfg" / "tiny_test.yaml"


def run_in_process(tmp_path: Path, *overrides: str, cfg: Path = TINY) -> Path:
    from runners.rl_runner import main

    out = tmp_path / "runs"
    assert main(["--cfg", str(cfg), f"output_dir={out}", "run_name=run", *overrides]) == 0
    return out / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, script: str, *args: str, torchrun_args: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        *torchrun_args, str(REPO / "runners" / script), *args,
    ]


def run_cmd(cmd: list[str], env: dict | None = None, timeout: int = 600, expect: int | None = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if expect is not None:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_torchrun(tmp_path: Path, nproc: int, *overrides: str, cfg: Path = TINY, env: dict | None = None,
                 torchrun_args: tuple[str, ...] = ()) -> Path:
    out = tmp_path / "runs"
    run_cmd(torchrun_cmd(nproc, "rl_runner.py", "--cfg", str(cfg), f"output_dir={out}", "run_name=run", *overrides,
                         torchrun_args=torchrun_args), env=env)
    return out / "run"


def run_bench(script: str, out: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """``bench/<script> *args --out out`` as its own process: (the process, the JSON it wrote)."""
    cmd = [sys.executable, f"bench/{script}", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def run_script(script: str, *args: str, env: dict | None = None, expect: int | None = 0):
    """A runner as its own process (so that it can be killed or signalled)."""
    return run_cmd([sys.executable, str(REPO / "runners" / script), *args], env=env, expect=expect)


def same_metrics(a: dict, b: dict) -> bool:
    """Logged metrics equal, ignoring wall-clock timings."""
    keys = {k for k in a if not k.startswith("time/") and "/time" not in k}
    return keys == {k for k in b if not k.startswith("time/") and "/time" not in k} and all(
        a[k] == b[k] for k in keys)


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final_adapter" / "adapter_model.safetensors"))


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
