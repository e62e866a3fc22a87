from pathlib import Path

import pytest


@pytest.fixture
def gsm8k_path() -> Path:
    """The shared GSM8K train jsonl next to the repo; skips the test if it is missing."""
    path = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path
