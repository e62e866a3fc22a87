"""bench/bf16_mismatch.py runs end to end on tiny-random (its figures need the demo's SmolLM2):
each mismatch is measured on real completion tokens and is finite."""

from __future__ import annotations

import math

import pytest

from tests.helpers.runs import run_bench


@pytest.mark.slow
def test_bf16_mismatch_bench_smoke(tmp_path):
    proc, r = run_bench("bf16_mismatch.py", tmp_path / "bf16_mismatch.json", "--rows", "4",
                        "--set", "model.name_or_path=tiny-random", "rollout.max_new_tokens=8", "data.reward=length_parity")
    assert r["model"] == "tiny-random" and r["bfloat16"]["rows"] == 4
    for key in ("sampler_vs_trainer", "trainer_vs_trainer_one_row", "trainer_bf16_vs_float32_logits",
                "sampler_vs_trainer_float32_logits"):
        m = r["bfloat16"][key]
        assert m["tokens"] > 0 and 0 <= m["mean"] <= m["max"] and math.isfinite(m["max"]), key
    assert r["bfloat16"]["trainer_bf16_vs_float32_logits"]["mean"] > 0  # bf16 logits are rounded
    # (no ordering asserted: on a random-init model's near-uniform logits bf16 rounds most differences
    # away, and its mismatch read 3e-8 against float32's 1.5e-7; the SmolLM2 figures are the bench's)
    assert math.isfinite(r["float32"]["sampler_vs_trainer"]["mean"])
    assert r["float16"]["sampler_vs_trainer"]["tokens"] > 0 and math.isfinite(r["float16_model_over_logged"])
    assert "sampler vs trainer, float32 model" in proc.stdout
    corr = r["bfloat16"]["sampler_correction"]
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        for clip in ("2", "3"):
            c = corr[f"{mode}_clip{clip}"]
            assert 0 <= c["outside_frac"] <= 1 and 0 <= c["weight_mean"] <= float(clip), (mode, clip)
    assert math.isfinite(corr["sequence_log_ratio_std"]) and 0 < corr["sequence_weight_ess_frac"] <= 1 + 1e-12
    assert "sequence_mask" in proc.stdout
