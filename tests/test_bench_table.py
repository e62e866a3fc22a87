"""bench/run_all.py: the table from the benches' JSON, and its place in the README."""

import importlib.util

import pytest

from tests.helpers.runs import REPO

spec = importlib.util.spec_from_file_location("run_all", REPO / "bench" / "run_all.py")
run_all = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_all)

RESULTS = {
    "step_vs_trl": {"summary": {"ratio_ours_over_trl_s_per_step": 0.787, "ratio_ours_over_trl_tokens_per_s": 1.08}},
    "probe_cost": {"be": 8, "overhead_ratio": 1.104},
    "gns_cost": {"overhead_ratio": 0.0042},
    "gns_kernels": {"probe_over_bare": 0.0125, "kernels_probe": 205, "kernels_bare_step": 16400, "modules": 120},
    "fisher_cost": {"sequences": 16, "kernel_over_plain": 1.17, "loop_over_kernel": 0.85},
}
INFO = {"device": "cpu", "cpus": 2, "processor": "x86_64", "torch": "2.13.0", "date": "2026-11-30"}


def test_table_has_one_row_per_ratio():
    text = run_all.table(RESULTS, INFO)
    assert "| time per step, ours / TRL GRPOTrainer (dr_grpo) | 0.787 |" in text
    assert "| δH probe (B_E 8), extra time / bare step | 1.10 |" in text
    assert "| gns + ess probes, extra time / bare step | +0.004 |" in text
    assert "| per-sequence loop / exact kernel | 0.85 |" in text
    assert "| gns probe, device kernels / the bare step's (outside the rollout), SmolLM2 | 0.013 |" in text
    assert text.count("\n| ") == 1 + 7 and "on cpu (2 CPUs" in text
    counted = {"sequences": 16, "kernels_kernel_over_plain": 1.083, "captured_modules": 392,
               "kernels": {"kernel": 12386, "gram": 149, "plain": 11434, "contributions": 160, "sketch": 17717}}
    text = run_all.table({**RESULTS, "fisher_kernels_qwen": counted}, INFO)
    assert ("| exact Fisher kernel (16 seq.), device kernels / the plain pass's, Qwen2.5-1.5B shape | 1.08 | counted; "
            "12386 kernels (Gram 149) against 11434, c_j 160 more, 392 LoRA modules; mode sketch 17717 (1.55) |") in text
    stops = {"vocab": 49152, "build_s_median": 0.47, "settings": {"demo": {
        "rows": 16, "new_tokens": 64, "per_call_over_once": 1.038, "per_call_extra_s_median": 0.45,
        "once_s_median": 11.8, "seconds": {"once": [11.8] * 5, "per_call": [12.3] * 5}}}}
    assert ("| rollout call, HF's stop matcher built every call / built once (demo: 16 rows × 64 tokens) | 1.038 | "
            "5 alternated pairs, median difference (+0.45 s on 11.8 s); the build alone 0.47 s at vocab 49,152 |"
            ) in run_all.table({"stop_matcher": stops}, INFO)
    prec = {"be": 8, "steps": [{"model": {"tangent_rel_err": {"dh": 0.05, "dlp": 0.04, "dps": 0.12}}}],
            "pred_err_over_se_max": {"model": 0.0131, "float32": 2e-6},
            "pred_err_over_second_order_max": {"model": 0.61}}
    assert ("| δH₁ from bf16 derivatives, error / δH₁'s SE (float64 derivatives the reference) | 0.013 | demo's "
            "SmolLM2 in bf16, 1 steps, B_E 8, worst step; per-token errors up to 0.12; 0.6× the second-order term δH₁ − ΔH_true; "
            "float32 derivatives 2.0e-06 SE |") in run_all.table({"derivative_precision": prec}, INFO)
    mm = {"bfloat16": {"rows": 16, "microbatch": 8, "sampler_vs_trainer": {"mean": 0.0438, "max": 0.315, "tokens": 702}},
          "float32": {"sampler_vs_trainer": {"mean": 9.3e-6}}, "batch_shape_over_logged": 0.991,
          "logit_rounding_over_logged": 0.536, "float32_logits_over_logged": 0.658, "float32_model_over_logged": 2.12e-4}
    text = run_all.table({"bf16_mismatch": mm}, INFO)
    assert ("| rollout–training mismatch in bf16 (sampler vs trainer, logged: 0.0438 nats/token), the trainer's forward "
            "vs itself at another batch shape / logged | 0.99 | demo's SmolLM2 + LoRA, 16 completions, 702 tokens; "
            "microbatch 8 against one row at a time; logged max 0.32 |") in text
    assert "| bf16 mismatch with float32 logits on both sides / logged | 0.66 |" in text
    assert "| float32 model's mismatch / bf16's | 2.1e-04 | same prompts and seeds; 9.3e-06 nats/token |" in text
    assert "float16 model" not in text  # results from before it was measured
    mm.update(float16={"sampler_vs_trainer": {"mean": 0.0048}, "trainer_vs_trainer_one_row": {"mean": 0.0007}},
              float16_model_over_logged=0.109)
    assert ("| float16 model's mismatch / bf16's | 0.11 | the float32 model cast to float16, sampling and scoring "
            "only; 0.0048 nats/token, the trainer vs itself one row at a time 0.0007 |") in run_all.table({"bf16_mismatch": mm}, INFO)
    mm["bfloat16"]["sampler_correction"] = {
        "sequence_weight_ess_frac": 0.853, "sequence_log_ratio_std": 0.473, "sequence_log_ratio_max_abs": 0.967,
        "token_truncate_clip2": {"outside_frac": 0.0, "weight_mean": 0.9993}}
    assert ("| bf16 mismatch: Kish ESS of the sequence-level sampler weights / completions | 0.85 | "
            "train.sampler_correction=sequence_*: sequence log-ratio std 0.47, largest 0.97 in absolute value; token "
            "weights outside [0, 2] 0.000, mean 0.9993 |") in run_all.table({"bf16_mismatch": mm}, INFO)
    f16 = {"steps": 3, "grad_err_float16_over_bfloat16": 0.12, "mismatch_float16_over_bfloat16": 0.11,
           "step_time_float16_over_bfloat16": 1.05,
           "gradient": {"sequences": 16, "bfloat16": {"rel_err": 5e-3}, "float16_scaled": {"rel_err": 6e-4},
                        "float16_unscaled": {"rel_err": 2e-3, "zeroed_frac": 0.012}},
           "runs": {"float16": {"mismatch_tok": [0.004, 0.006], "step_s": [10.0, 12.0], "updates_skipped": 0.0},
                    "bfloat16": {"mismatch_tok": [0.04, 0.05], "step_s": [10.0, 11.0]}}}
    text = run_all.table({"float16_training": f16}, INFO)
    assert ("| float16 / bf16 training: loss-gradient error against float32 arithmetic | 0.12 | demo's SmolLM2 + LoRA, "
            "one step's 16 sequences, the same rounded weights in float32 the reference; relative errors bf16 5.0e-03, "
            "float16 with its loss scale 6.0e-04, without one 2.0e-03 (1.20% of entries underflow to 0) |") in text
    assert ("| float16 / bf16 training: logged rollout–training mismatch | 0.11 | 3 steps each, alternating; 0.0050 "
            "against 0.0450 nats/token; float16 updates skipped 0 |") in text
    assert "| float16 / bf16 training: s/step | 1.05 | 11.0 against 10.5 s (these CPU cores; no GPU measurement) |" in text
    f16["gradient"].update(single_sequences=4, float16_single_sequence={"rel_err": 1e-3, "zeroed_frac": 0.0},
                           bfloat16_single_sequence={"rel_err": 8e-3})
    assert ("| float16 / bf16: one sequence's ∇log π error (unscaled: Fisher's own backward) | 0.12 | mean over 4 "
            "completions; relative errors float16 1.0e-03 (0.00% of entries underflow to 0), bf16 8.0e-03 |"
            ) in run_all.table({"float16_training": f16}, INFO)
    assert run_all.rows({}) == []


def test_readme_table_is_replaced_between_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run_all.BEGIN}\nold table\n{run_all.END}\nafter\n")
    monkeypatch.setattr(run_all, "README", readme)
    run_all.update_readme("new table")
    assert readme.read_text() == f"intro\n{run_all.BEGIN}\nnew table\n{run_all.END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        run_all.update_readme("x")


def test_the_readme_has_the_markers():
    text = (REPO / "README.md").read_text()
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1


def test_a_bench_without_a_fresh_result_keeps_its_committed_figure_and_date(tmp_path):
    """A partial run on a fresh checkout (bench/results/ is not in git) must not drop the rows of
    the benches it did not run, nor claim today's date for them."""
    (tmp_path / "gns_cost.json").write_text('{"overhead_ratio": 0.01}')
    previous = {"results": {"gns_cost": {"overhead_ratio": 0.5}, "probe_cost": RESULTS["probe_cost"]},
                "dates": {"probe_cost": "2026-11-29"}, "machine": {"date": "2026-11-28 to 2026-11-30"}}
    results, dates = run_all.gather(tmp_path, previous)
    assert results == {"gns_cost": {"overhead_ratio": 0.01}, "probe_cost": RESULTS["probe_cost"]}
    assert dates["probe_cost"] == "2026-11-29" and dates["gns_cost"].startswith("20")
    del previous["dates"]  # a results.json written before dates were kept: the span it names
    assert run_all.gather(tmp_path, previous)[1]["probe_cost"] == "2026-11-28 to 2026-11-30"
    assert run_all.gather(tmp_path / "none", {}) == ({}, {})
