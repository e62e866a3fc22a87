"""bench/gpu_step.py runs end to end on the CPU's small shape (its GPU figures need a GPU): every
figure it reports is a finite number, and what it measures is what it names."""

from __future__ import annotations

import math
import os

import pytest

from tests.helpers.runs import run_bench

pytest.importorskip("trl")


@pytest.mark.slow
def test_gpu_step_bench_smoke_on_the_tiny_shape(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # --budget-s 0: one timed round of the 3 asked for, then TRL, as a run at a device's time limit
    proc, r = run_bench("gpu_step.py", tmp_path / "gpu_step.json", "--shape", "tiny", "--steps", "3", "--budget-s", "0",
                        "--decode-reps", "1", "--trl", "--compile-backend", "eager", "--vocab", "50000",
                        env={**os.environ, "TMPDIR": str(scratch)})
    assert not list(scratch.glob("gpu_step_*")), "the saved model and runs are removed at exit"
    assert "| decode, LoRA merged |" in proc.stdout and "| ours / TRL, s per step |" in proc.stdout
    assert r["rows"] == 8 and r["new_tokens"] == 16 and r["engine_merge_lora"] is False  # CPU: exact path
    assert r["vocab"] == 50000  # past the tokenizer's 49,152, as the real Qwen2.5's lm_head is past its tokenizer
    assert r["decode"]["merged, compiled"]["compiled"] is True and r["decode"]["merged, compiled"]["compile_s"] > 0
    for kind in ("merged", "unmerged", "merged, compiled"):
        d = r["decode"][kind]
        assert d["tokens"] == [8 * 16] or all(0 < t <= 8 * 16 for t in d["tokens"])
        assert d["tokens_per_s"] > 0 and d["ms_per_decode_step"] > 0
    assert r["bound_ms_per_decode_step"] > 0
    for name in ("bare", "delta_h", "delta_h_fp32", "gns_ess", "fisher_sketch", "compiled", "float32_logits", "float16"):
        assert math.isfinite(r["steps"][name]["overhead_of_bare_step"])
    assert r["steps"]["bare"]["overhead_of_bare_step"] == 0.0
    assert "--budget-s reached: 1 timed steps per trainer, not 3" in proc.stdout and r["done"] == "trl"
    assert all(row["timed_steps"] == 1 for row in r["steps"].values())
    assert r["steps"]["delta_h"]["probe_time_s"] and r["steps"]["gns_ess"]["probe_time_s"]
    assert r["steps"]["fisher_sketch"]["probe_time_s"]["probe/fisher/time_grad_s"] > 0
    assert "| fisher_sketch probe(s), extra / bare step |" in proc.stdout
    assert r["steps"]["delta_h"]["theta_k_own_forward"] == 0  # CPU: the forward-mode pass gives θ_k's values
    # split bf16 GEMMs only over a bf16 model on a GPU: the tiny shape is float32 on a CPU
    assert r["steps"]["delta_h"]["split_matmul"] == r["steps"]["delta_h_fp32"]["split_matmul"] == 0
    assert "| delta_h_fp32 probe(s), float32 GEMMs, extra / bare step |" in proc.stdout
    assert "| our step, no probes, float32 logits |" in proc.stdout
    assert "| delta_h: forward-mode pass / forward at θ_k+1 / E-batch generation |" in proc.stdout
    for name in ("bare", "compiled"):
        assert 0 <= r["steps"][name]["logp_mismatch_tok"] < 1e-3  # fp32: rounding only
    assert math.isfinite(r["trl"]["ratio_ours_over_trl_s_per_step"])
