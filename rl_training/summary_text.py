"""The end of a run, for a person: a short table of what happened (summary.json is for machines)."""

from __future__ import annotations

import math
from pathlib import Path

from probes.functional.delta_h import t975


def _num(x, fmt: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _probe(summary: dict, kind: str, key: str):
    """The last logged value of probe key ``key`` of the first probe named like ``kind``, and its step."""
    last, steps = summary.get("probes_last", {}), summary.get("probes_last_step", {})
    for k in sorted(last):
        if k.endswith(f"/{key}") and k.split("/")[1].startswith(kind):
            return last[k], steps.get(k)
    return None, None


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the table; rows of probes the run did not have are left out."""
    t = summary.get("time_mean_s", {})
    step_s, rollout_s, probes_s = t.get("step"), t.get("rollout"), t.get("probes")
    rows = [("reward", f"{_num(summary.get('reward_first'))} → {_num(summary.get('reward_last'))}"
                       f"   (pass rate, mean over steps: {_num(summary.get('pass_rate_mean'))})"),
            ("entropy / token", f"{_num(summary.get('entropy_first'))} → {_num(summary.get('entropy_last'))}")]
    mismatch = summary.get("logp_mismatch_mean")
    if mismatch is not None and math.isfinite(mismatch):
        skipped = summary.get("updates_skipped") or 0
        rows.append(("rollout mismatch", f"{_num(mismatch, '.2g')} nats/token (sampler vs trainer, mean over steps)"
                                         + (f"; {skipped:g} updates skipped (float16 overflow)" if skipped else "")))
    pred, step = _probe(summary, "delta_h", "pred")
    if pred is not None:
        pred_se, _ = _probe(summary, "delta_h", "pred_se")
        true, _ = _probe(summary, "delta_h", "true")
        true_se, _ = _probe(summary, "delta_h", "true_se")
        df, _ = _probe(summary, "delta_h", "pred_df")
        dof = f", SEs with {_num(df, '.0f')} df: 95 % is ±{_num(t975(df), '.2f')} SE" if df is not None else ""
        rows.append((f"δH₁ (step {step})", f"{_num(pred)} ± {_num(pred_se, '.2g')}   measured ΔH {_num(true)} ± "
                                           f"{_num(true_se, '.2g')}   (nats per sequence{dof})"))
    b, step = _probe(summary, "gns", "b_simple")
    resolved, _ = _probe(summary, "gns", "b_resolved")
    if b is not None:
        b_seq, _ = _probe(summary, "gns", "b_simple_seq")
        rows.append(("GNS B_simple", f"{_num(b)} prompts = {_num(b_seq)} sequences (step {step})"))
    elif resolved is not None:
        rows.append(("GNS B_simple", "not resolved yet (the gradient signal is within 2 SE of 0)"))
    ess, _ = _probe(summary, "ess", "loss_ess_frac")
    if ess is not None:
        rows.append(("ESS of the loss", f"{_num(ess)} of the batch (last step)"))
    ratio, step = _probe(summary, "fisher", "contrib_ratio")
    if ratio is not None:
        rows.append(("Fisher Σc_j/δH₁", f"{_num(ratio)} (step {step}; fisher/step_{step}_top.json: the sequences that moved H)"))
    if step_s is not None and math.isfinite(step_s):
        rest = step_s - (rollout_s or 0) - (probes_s or 0)
        rows.append(("time / step", f"{_num(step_s, '.1f')} s: rollout {_num(rollout_s, '.1f')}, probes "
                                    f"{_num(probes_s, '.1f')}, training and the rest {_num(rest, '.1f')}"))
    return rows


def format_summary(summary: dict, run_dir: Path | None) -> str:
    lines = [f"Dr-GRPO: {summary['steps']} steps ({summary['steps_this_run']} in this run), "
             f"{_num(summary['seconds'] / 60, '.1f')} min"]
    lines += [f"  {label:<16}  {value}" for label, value in summary_rows(summary)]
    if run_dir is not None:
        lines += [f"run directory: {run_dir}  (summary.json, logs/train_log.jsonl)",
                  f"TensorBoard:   tensorboard --logdir {run_dir / 'tensorboard'}",
                  f"evaluate:      rl-eval --run-dir {run_dir}",
                  f"report:        rl-report --run-dir {run_dir}"]
    return "\n".join(lines)
