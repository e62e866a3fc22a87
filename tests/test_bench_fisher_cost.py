"""bench/fisher_cost.py --shape runs end to end on the CPU's small shape (its GPU figures need a
GPU): every ratio it reports is a finite positive number, the exact kernel matches the loop, and
the Gram and the c_j contraction launch under two kernels a LoRA module (a shape at a time; a
parameter at a time they cost six or seven a parameter, one each a module)."""

from __future__ import annotations


import pytest

from tests.helpers.runs import run_bench


@pytest.mark.slow
def test_fisher_cost_bench_smoke_on_the_tiny_shape(tmp_path):
    proc, r = run_bench("fisher_cost.py", tmp_path / "fisher_cost.json", "--shape", "tiny", "--rounds", "1")
    assert r["shape"] == "tiny" and r["sequences"] == 16
    for key in ("kernel_over_plain", "loop_over_kernel", "sketch_over_plain", "sketch_z2_mean"):
        assert 0 < r[key] < float("inf"), key
    assert r["kernel_vs_loop_max_rel_err"] < 1e-4  # fp32
    k = r["kernels"]
    assert k["kernel"] == k["rows_pass"] + k["gram"] and k["rows_pass"] > k["plain"] > 0
    assert 0 < k["gram"] < 2 * r["captured_modules"] and 0 < k["contributions"] < 2 * r["captured_modules"], k
    assert r["kernels_kernel_over_plain"] == k["kernel"] / k["plain"]
