"""Every benchmark in one run (``make bench``): bench/results.json and one Markdown table.

Runs each bench script in turn as its own process (one at a time: they time the same cores),
reads the JSON each writes, and puts the ratios side by side with the machine they were
measured on. ``--readme`` replaces the table between the README's bench markers.

    python bench/run_all.py --readme            # ≈ 62 min on 2 CPU cores
    python bench/run_all.py --table-only        # rebuild the table from bench/results/*.json
                                                # (else the committed bench/results.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"

# name -> argv after the script (each writes RESULTS/<name>.json)
BENCHES = {
    "step_vs_trl": ["bench/step_vs_trl.py", "--rounds", "3"],
    "probe_cost": ["bench/probe_cost.py", "--steps", "3", "--be", "8"],
    "gns_cost": ["bench/probe_cost.py", "--probes", "gns,ess", "--steps", "12"],
    "gns_kernels": ["bench/gns_kernels.py"],
    # the user's model shape and LoRA (r64 on 7 projections, microbatch 4), a short rollout: ≈ 5 min
    "gns_kernels_qwen": ["bench/gns_kernels.py", "--shape", "qwen2.5-1.5b", "--set", "train.buffer_size=16",
                         "rollout.prompts_per_round=2", "rollout.generation_batch_size=16",
                         "rollout.max_new_tokens=16", "train.microbatch_size=4"],
    "fisher_cost": ["bench/fisher_cost.py", "--rounds", "3"],
    # the user's shape, kernels counted only (timing it on a CPU would take hours): ≈ 4 min
    "fisher_kernels_qwen": ["bench/fisher_cost.py", "--shape", "qwen2.5-1.5b", "--rounds", "0",
                            "--set", "rollout.max_new_tokens=16"],
    "sketch_rate": ["bench/sketch_rate.py"],
    "stop_matcher": ["bench/stop_matcher.py"],
    "derivative_precision": ["bench/derivative_precision.py"],
    "bf16_mismatch": ["bench/bf16_mismatch.py"],
    "float16_training": ["bench/float16_training.py", "--steps", "3"],
}


def gather(results_dir: Path, previous: dict) -> tuple[dict, dict]:
    """Each bench's result and the day it was measured: from its file in ``results_dir`` (this
    machine's runs; git ignores them) or else from the committed bench/results.json, so that a
    partial run on a fresh checkout keeps the other benches' figures and their dates."""
    results, dates = {}, {}
    for name in BENCHES:
        path = results_dir / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
            dates[name] = time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))
        elif name in previous.get("results", {}):
            results[name] = previous["results"][name]
            dates[name] = previous.get("dates", {}).get(name, previous.get("machine", {}).get("date", ""))
    return results, dates


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def rows(results: dict) -> list[tuple[str, str, str]]:
    """(what, ratio, how it is measured) for every bench that has a result."""
    out = []
    if "step_vs_trl" in results:
        s = results["step_vs_trl"]["summary"]
        out.append(("time per step, ours / TRL GRPOTrainer (dr_grpo)", f"{s['ratio_ours_over_trl_s_per_step']:.3f}",
                     "SmolLM2 + LoRA r16, 4 prompts × 4, alternated rounds"))
        out.append(("tokens per second, ours / TRL", f"{s['ratio_ours_over_trl_tokens_per_s']:.3f}", "same runs"))
    if "probe_cost" in results:
        r = results["probe_cost"]
        out.append((f"δH probe (B_E {r['be']}), extra time / bare step", f"{r['overhead_ratio']:.2f}",
                    "alternated steps, medians"))
    if "gns_cost" in results:
        r = results["gns_cost"]
        if "overhead_ratio_paired" in r:
            out.append(("gns + ess probes, extra time / bare step", f"{r['overhead_ratio_paired']:+.3f}",
                        f"{r['steps']} ABBA pairs, after-rollout phase, median of differences "
                        f"(whole-step medians: {r['overhead_ratio']:+.3f})"))
        else:
            out.append(("gns + ess probes, extra time / bare step", f"{r['overhead_ratio']:+.3f}", "ABBA steps, medians"))
    for name, model in (("gns_kernels", "SmolLM2"), ("gns_kernels_qwen", "Qwen2.5-1.5B shape")):
        if name in results:
            r = results[name]
            out.append((f"gns probe, device kernels / the bare step's (outside the rollout), {model}",
                        f"{r['probe_over_bare']:.3f}", f"one step each, counted; {r['kernels_probe']} kernels against "
                        f"{r['kernels_bare_step']}, {r['modules']} LoRA modules"))
    if "fisher_cost" in results:
        r = results["fisher_cost"]
        out.append((f"exact Fisher kernel ({r['sequences']} seq.) / one plain forward+backward",
                    f"{r['kernel_over_plain']:.2f}", "rotated rounds, medians"))
        out.append(("per-sequence loop / exact kernel", f"{r['loop_over_kernel']:.2f}", "same rounds"))
        if "sketch_over_plain" in r:
            out.append((f"Fisher mode sketch ({r['sketch_factors'][0]} × {r['sketch_factors'][1]} per weight) "
                        "/ one plain forward+backward", f"{r['sketch_over_plain']:.2f}",
                        f"same rounds; {r['sketch_columns']} columns a sequence, errors' mean z² "
                        f"{r['sketch_z2_mean']:.2f} (1 expected)"))
    for name, model in (("fisher_cost", "SmolLM2"), ("fisher_kernels_qwen", "Qwen2.5-1.5B shape")):
        if "kernels" in results.get(name, {}):
            r = results[name]
            k = r["kernels"]
            out.append((f"exact Fisher kernel ({r['sequences']} seq.), device kernels / the plain pass's, {model}",
                        f"{r['kernels_kernel_over_plain']:.2f}", f"counted; {k['kernel']} kernels (Gram {k['gram']}) "
                        f"against {k['plain']}, c_j {k['contributions']} more, {r['captured_modules']} LoRA modules"
                        + (f"; mode sketch {k['sketch']} ({k['sketch'] / k['plain']:.2f})" if "sketch" in k else "")))
    if "sketch_rate" in results:
        r = results["sketch_rate"]
        out.append((f"Fisher exact mode's cross-rank sketch, R by the counter generator / by torch's ({r['device']})",
                    f"{r['counter_over_torch']:.2f}", f"time, alternated, medians; {r['rows']} rows × {r['dim']:,} "
                    f"parameters, k {r['k']}; torch {r['normals_per_s']['torch'] / 1e9:.2f} G normals/s"))
    if "stop_matcher" in results:
        r = results["stop_matcher"]
        for name, s in r["settings"].items():
            out.append((f"rollout call, HF's stop matcher built every call / built once ({name}: {s['rows']} rows × "
                        f"{s['new_tokens']} tokens)", f"{s['per_call_over_once']:.3f}",
                        f"{len(s['seconds']['once'])} alternated pairs, median difference "
                        f"(+{s['per_call_extra_s_median']:.2f} s on {s['once_s_median']:.1f} s); the build alone "
                        f"{r['build_s_median']:.2f} s at vocab {r['vocab']:,}"))
    if "derivative_precision" in results:
        r = results["derivative_precision"]
        tok = max(max(s["model"]["tangent_rel_err"].values()) for s in r["steps"])
        out.append(("δH₁ from bf16 derivatives, error / δH₁'s SE (float64 derivatives the reference)",
                    f"{r['pred_err_over_se_max']['model']:.3f}",
                    f"demo's SmolLM2 in bf16, {len(r['steps'])} steps, B_E {r['be']}, worst step; per-token errors up "
                    f"to {tok:.2f}; {r['pred_err_over_second_order_max']['model']:.1f}× the second-order term δH₁ − ΔH_true; float32 "
                    f"derivatives {r['pred_err_over_se_max']['float32']:.1e} SE"))
    if "bf16_mismatch" in results:
        r = results["bf16_mismatch"]
        logged = r["bfloat16"]["sampler_vs_trainer"]
        what = "rollout–training mismatch in bf16 (sampler vs trainer, logged:"
        out.append((f"{what} {logged['mean']:.4f} nats/token), the trainer's forward vs itself at another batch shape "
                    "/ logged", f"{r['batch_shape_over_logged']:.2f}",
                    f"demo's SmolLM2 + LoRA, {r['bfloat16']['rows']} completions, {logged['tokens']} tokens; microbatch "
                    f"{r['bfloat16']['microbatch']} against one row at a time; logged max {logged['max']:.2f}"))
        out.append(("bf16 mismatch: the logits' rounding to bf16 alone / logged", f"{r['logit_rounding_over_logged']:.2f}",
                    "same completions; the trainer's forward with its lm_head summed in float32 against as it is"))
        out.append(("bf16 mismatch with float32 logits on both sides / logged", f"{r['float32_logits_over_logged']:.2f}",
                    "sampled again with the lm_head's output in float32 (model.float32_logits)"))
        out.append(("float32 model's mismatch / bf16's", f"{r['float32_model_over_logged']:.1e}",
                    f"same prompts and seeds; {r['float32']['sampler_vs_trainer']['mean']:.1e} nats/token"))
        if "float16" in r:
            f16 = r["float16"]
            out.append(("float16 model's mismatch / bf16's", f"{r['float16_model_over_logged']:.2f}",
                        f"the float32 model cast to float16, sampling and scoring only; {f16['sampler_vs_trainer']['mean']:.4f} "
                        f"nats/token, the trainer vs itself one row at a time {f16['trainer_vs_trainer_one_row']['mean']:.4f}"))
        if "sampler_correction" in r["bfloat16"]:
            c = r["bfloat16"]["sampler_correction"]
            out.append(("bf16 mismatch: Kish ESS of the sequence-level sampler weights / completions",
                        f"{c['sequence_weight_ess_frac']:.2f}",
                        f"train.sampler_correction=sequence_*: sequence log-ratio std {c['sequence_log_ratio_std']:.2f}, "
                        f"largest {c['sequence_log_ratio_max_abs']:.2f} in absolute value; token weights outside [0, 2] "
                        f"{c['token_truncate_clip2']['outside_frac']:.3f}, mean {c['token_truncate_clip2']['weight_mean']:.4f}"))
    if "float16_training" in results:
        r = results["float16_training"]
        g, f16, b16 = r["gradient"], r["runs"]["float16"], r["runs"]["bfloat16"]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out.append(("float16 / bf16 training: loss-gradient error against float32 arithmetic",
                    f"{r['grad_err_float16_over_bfloat16']:.2f}",
                    f"demo's SmolLM2 + LoRA, one step's {g['sequences']} sequences, the same rounded weights in float32 the "
                    f"reference; relative errors bf16 {g['bfloat16']['rel_err']:.1e}, float16 with its loss scale "
                    f"{g['float16_scaled']['rel_err']:.1e}, without one {g['float16_unscaled']['rel_err']:.1e} "
                    f"({g['float16_unscaled']['zeroed_frac']:.2%} of entries underflow to 0)"))
        if "float16_single_sequence" in g:
            out.append(("float16 / bf16: one sequence's ∇log π error (unscaled: Fisher's own backward)",
                        f"{g['float16_single_sequence']['rel_err'] / g['bfloat16_single_sequence']['rel_err']:.2f}",
                        f"mean over {g['single_sequences']} completions; relative errors float16 "
                        f"{g['float16_single_sequence']['rel_err']:.1e} ({g['float16_single_sequence']['zeroed_frac']:.2%} "
                        f"of entries underflow to 0), bf16 {g['bfloat16_single_sequence']['rel_err']:.1e}"))
        out.append(("float16 / bf16 training: logged rollout–training mismatch", f"{r['mismatch_float16_over_bfloat16']:.2f}",
                    f"{r['steps']} steps each, alternating; {mean(f16['mismatch_tok']):.4f} against "
                    f"{mean(b16['mismatch_tok']):.4f} nats/token; float16 updates skipped {f16['updates_skipped']:g}"))
        out.append(("float16 / bf16 training: s/step", f"{r['step_time_float16_over_bfloat16']:.2f}",
                    f"{mean(f16['step_s']):.1f} against {mean(b16['step_s']):.1f} s (these CPU cores; no GPU measurement)"))
    return out


def table(results: dict, info: dict) -> str:
    lines = [f"Measured with `make bench` on {info['device']} ({info['cpus']} CPUs, {info['processor']}), "
             f"torch {info['torch']}, {info.get('date', '')}:", "",
             "| measure | ratio | how |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(results)]
    return "\n".join(lines)


def update_readme(text: str) -> None:
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README has no {BEGIN} … {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated bench names (default: all)")
    ap.add_argument("--table-only", action="store_true", help="no runs: the table from the JSON already there")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown bench(es) {sorted(unknown)}; known: {sorted(BENCHES)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    seconds = {}
    if not args.table_only:
        for name in names:
            t0 = time.perf_counter()
            cmd = [sys.executable, *BENCHES[name], "--out", str(RESULTS / f"{name}.json")]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, cwd=REPO, check=True)
            seconds[name] = time.perf_counter() - t0
    previous_path = REPO / "bench" / "results.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    results, dates = gather(RESULTS, previous)
    seconds = {**previous.get("seconds", {}), **seconds}  # a partial run keeps the other benches' run times
    days = sorted({d for span in dates.values() for d in span.split(" to ") if d})
    info = {**machine(), "date": " to ".join(dict.fromkeys([days[0], days[-1]])) if days else ""}
    text = table(results, info)
    (REPO / "bench" / "results.json").write_text(json.dumps(
        {"machine": info, "seconds": seconds, "dates": dates, "rows": rows(results), "results": results}, indent=1, default=str))
    print(text)
    if args.readme:
        update_readme(text)


if __name__ == "__main__":
    main()
