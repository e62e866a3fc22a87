"""The table printed at the end of a run: its numbers come from the run's log."""

import json

import pytest

from rl_training.summary_text import format_summary
from tests.helpers.runs import run_in_process, train_log


def test_the_end_of_a_run_prints_a_readable_table(tmp_path, capsys):
    run = run_in_process(tmp_path, "train.total_steps=2")
    out = " ".join(capsys.readouterr().out.split())  # spacing is layout
    rows = train_log(run)
    summary = json.loads((run / "summary.json").read_text())
    assert "{" not in out, "a table, not the JSON"
    assert f"reward {rows[0]['rollout/reward_mean']:.3g} → {rows[-1]['rollout/reward_mean']:.3g}" in out
    assert f"δH₁ (step 2) {rows[-1]['probe/delta_h/pred']:.3g} ± {rows[-1]['probe/delta_h/pred_se']:.2g}" in out
    assert f"measured ΔH {rows[-1]['probe/delta_h/true']:.3g}" in out
    assert f"SEs with {rows[-1]['probe/delta_h/pred_df']:.0f} df" in out
    assert "GNS B_simple" in out and "ESS of the loss" in out and "Fisher Σc_j/δH₁" in out
    step_s = sum(r["time/step_s"] for r in rows) / 2
    assert f"time / step {step_s:.1f} s" in out
    assert f"run directory: {run}" in out and f"rl-eval --run-dir {run}" in out and f"rl-report --run-dir {run}" in out
    mismatch = sum(r["rollout/logp_mismatch_tok"] for r in rows) / 2
    assert f"rollout mismatch {mismatch:.2g} nats/token" in out and "updates skipped" not in out
    assert summary["probes_last_step"]["probe/delta_h/pred"] == 2
    assert summary["time_mean_s"]["probes"] > 0


def test_without_probes_the_table_has_no_probe_lines():
    summary = {"steps": 3, "steps_this_run": 3, "seconds": 90.0, "reward_first": 0.1, "reward_last": 0.5,
               "pass_rate_mean": 0.2, "entropy_first": 1.5, "entropy_last": 1.25, "probes_last": {}, "probes_last_step": {},
               "time_mean_s": {"step": 30.0, "rollout": 10.0, "probes": 0.0}}
    text = format_summary(summary, None)
    assert "δH₁" not in text and "GNS" not in text and "run directory" not in text
    assert "0.1 → 0.5" in text and "1.5 → 1.25" in text and "rollout 10.0, probes 0.0, training and the rest 20.0" in text
    assert text.splitlines()[0] == "Dr-GRPO: 3 steps (3 in this run), 1.5 min"


def test_float16_overflows_are_counted():
    summary = {"steps": 3, "steps_this_run": 3, "seconds": 60.0, "probes_last": {}, "probes_last_step": {},
               "time_mean_s": {}, "logp_mismatch_mean": 0.005, "updates_skipped": 2.0}
    text = " ".join(format_summary(summary, None).split())
    assert "rollout mismatch 0.005 nats/token (sampler vs trainer, mean over steps); 2 updates skipped (float16 overflow)" in text


@pytest.mark.parametrize("resolved, line", [(0.0, "not resolved yet"), (1.0, "12.5 prompts = 50 sequences (step 7)")])
def test_gns_line(resolved, line):
    last = {"probe/gns/b_resolved": resolved}
    if resolved:
        last.update({"probe/gns/b_simple": 12.5, "probe/gns/b_simple_seq": 50.0})
    summary = {"steps": 7, "steps_this_run": 7, "seconds": 60.0, "probes_last": last,
               "probes_last_step": {k: 7 for k in last}, "time_mean_s": {}}
    assert line in format_summary(summary, None)
