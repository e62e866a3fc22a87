"""bench/float16_training.py runs end to end on tiny-random (its figures need the demo's SmolLM2):
every gradient comparison and run figure is finite and in range."""

from __future__ import annotations

import math

import pytest

from tests.helpers.runs import run_bench


@pytest.mark.slow
def test_float16_training_bench_smoke(tmp_path):
    proc, r = run_bench("float16_training.py", tmp_path / "float16_training.json", "--steps", "1",
                        "--set", "model.name_or_path=tiny-random", "rollout.max_new_tokens=8", "data.reward=length_parity")
    assert r["model"] == "tiny-random" and r["gradient"]["tokens"] > 0
    for name in ("bfloat16", "float16_scaled", "float16_unscaled", "bfloat16_single_sequence", "float16_single_sequence"):
        g = r["gradient"][name]
        assert 0 < g["rel_err"] < 0.1 and 0.99 < g["cosine"] <= 1 + 1e-12 and 0 <= g["zeroed_frac"] <= 1, name
    for d in ("float16", "bfloat16"):
        assert len(r["runs"][d]["step_s"]) == 1 and math.isfinite(r["runs"][d]["mismatch_tok"][0])
    assert r["runs"]["float16"]["loss_scale"] > 0 and math.isfinite(r["step_time_float16_over_bfloat16"])
    assert "float16 / bfloat16" in proc.stdout
