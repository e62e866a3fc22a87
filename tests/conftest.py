import fcntl
import os
import tempfile
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    # One intra-op thread per pytest-xdist worker: `make test` runs 2 workers on 2 cores, and two
    # workers with two threads each would oversubscribe them.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torchrun_at_a_time(request):
    """Tests marked ``ports`` launch torchrun, which binds TCP ports: they hold a file lock, so
    that under pytest-xdist (or two pytest sessions) two rendezvous never race for a port."""
    if request.node.get_closest_marker("ports") is None:
        yield
        return
    with open(Path(tempfile.gettempdir()) / "rl-training-tests-torchrun.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def gsm8k_path() -> Path:
    """The shared GSM8K train jsonl next to the repo; skips the test if it is missing."""
    path = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path
