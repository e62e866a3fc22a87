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


def run_torchrun(tmp_path: Path, nproc: int, *overrides: str, cfg: Path = TINY, timeout: int = 600) -> Path:
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        str(REPO / "runners" / "rl_runner.py"), "--cfg", str(cfg), f"output_dir={out}", "run_name=run", *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out / "run"


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final_adapter" / "adapter_model.safetensors"))


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
