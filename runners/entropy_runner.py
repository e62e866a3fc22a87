"""Offline entropy experiments on a saved checkpoint: ``rl-entropy <subcommand> --checkpoint CKPT``.

  single         one U-batch step direction, one E-batch: δH₁ and ΔH_true
  eta-sweep      ΔH_true(η) along v = Δθ/lr against η·⟨∇H, v⟩; log-log slope; first-order range
  lr-linearity   per learning rate, N real steps with fresh U-batches; ΔH on a fixed E-batch; linear fit,
                 and ΔH/lr per repeat (its U-batch at every lr): flat where ΔH is first order
  batch-scaling  δH₁ mean and SE per B_E over runs; converged or 1/B_E trend
  sanity-check   spread of δH₁ across runs vs the mean reported SE; bias against a large-B_E reference
  fisher         the Fisher kernel E×U, U×U, E×E of one update, and which U sequences moved the entropy

CKPT is runs/<run>/checkpoints/step_N or a run directory (its latest checkpoint). Results go to
results/<subcommand>/<name>_<timestamp>/ (config.yaml, log.txt, results.json; runs/<i>/ with
result.json or error.txt: a failed run is recorded and the others go on).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from probes.functional import experiments as X  # noqa: E402
from rl_training.config import to_dict  # noqa: E402
from rl_training.errors import ConfigError, UserError  # noqa: E402

log = logging.getLogger("rl-entropy")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    return [int(x) for x in _floats(text)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="rl-entropy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--checkpoint", required=True, type=Path)
        p.add_argument("--bu", type=int, default=None, help="U-batch sequences (default: the run's train.buffer_size)")
        p.add_argument("--lr", type=float, default=None, help="learning rate of the update (default: the run's)")
        p.add_argument("--per-prompt", type=int, default=2, help="completions per E-batch prompt (k)")
        p.add_argument("--runtime-dtype", choices=("float32", "float64"), default=None)
        p.add_argument("--microbatch-size", type=int, default=None)
        p.add_argument("--output-dir", type=Path, default=Path("results"))
        p.add_argument("--name", default=None)
        p.add_argument("--seed", type=int, default=0, help="offsets every U/E-batch key")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--verbose", action="store_true")
        g.add_argument("--quiet", action="store_true")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config")

    p = sub.add_parser("single", help="δH₁ and ΔH_true for one update")
    common(p)
    p.add_argument("--be", type=int, default=256)
    p = sub.add_parser("eta-sweep", help="ΔH_true(η) vs η·⟨∇H, v⟩")
    common(p)
    p.add_argument("--be", type=int, default=64)
    p.add_argument("--etas", type=_floats, default=None, help="step sizes along v = Δθ/lr (default: lr × 2^k)")
    p = sub.add_parser("lr-linearity", help="ΔH against the learning rate")
    common(p)
    p.add_argument("--be", type=int, default=128)
    p.add_argument("--learning-rates", type=_floats, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("batch-scaling", help="δH₁ against B_E")
    common(p)
    p.add_argument("--be-values", type=_ints, default=[16, 32, 64, 128])
    p.add_argument("--runs", type=int, default=3)
    p = sub.add_parser("sanity-check", help="calibration of the reported SE")
    common(p)
    p.add_argument("--be", type=int, default=64)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--ref-be", type=int, default=None, help="reference B_E (default 4 × --be)")
    p = sub.add_parser("fisher", help="Fisher kernel between E- and U-batch sequences")
    common(p)
    p.add_argument("--be", type=int, default=64)
    p.add_argument("--preconditioner", choices=("adam", "none"), default="adam")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- experiments


def run_single(exp, args, out: Path) -> dict:
    lr = args.lr or exp.cfg.train.lr
    delta = exp.update(lr, key=args.seed, bu=args.bu)
    res = exp.delta_h(delta, exp.ebatch(args.be, key=args.seed))
    log.info("δH₁ = %.4g ± %.2g   ΔH_true = %.4g ± %.2g   ESS/B_E = %.3f", res["pred"], res["pred_se"],
             res["true"], res["true_se"], res["ess_frac"])
    return {"lr": lr, **res}


def run_eta_sweep(exp, args, out: Path) -> dict:
    lr = args.lr or exp.cfg.train.lr
    v = {n: d / lr for n, d in exp.update(lr, key=args.seed, bu=args.bu).items()}  # v = Δθ / lr
    etas = args.etas or [lr * 2.0**k for k in range(-3, 8)]
    eb = exp.ebatch(args.be, key=args.seed)
    at_lr = exp.delta_h(v, eb, scale=lr)  # a step of the run's size, then per unit step:
    grad = {"pred": at_lr["pred"] / lr, "pred_se": at_lr["pred_se"] / lr}  # ⟨∇H, v⟩
    cache: dict = {}
    rows = []
    for eta in _progress(etas, args, "η"):
        theta_new = {n: exp.theta[n] + eta * v[n] for n in v}
        t = exp.true_change(theta_new, eb, cache)
        rows.append({"eta": eta, "pred": eta * grad["pred"], "pred_se": eta * grad["pred_se"], **t,
                     "ratio": t["true"] / (eta * grad["pred"]) if grad["pred"] else float("nan")})
        log.info("η=%.3g  δH₁=%.4g  ΔH_true=%.4g ± %.2g  ratio=%.3f", eta, rows[-1]["pred"], t["true"], t["true_se"], rows[-1]["ratio"])
    return {
        "lr": lr, "grad_dot_v": grad["pred"], "grad_dot_v_se": grad["pred_se"], "sweep": rows,
        "loglog_slope": X.loglog_slope(etas, [r["true"] for r in rows]),
        "first_order_etas": X.first_order_range(etas, [r["true"] for r in rows], [r["true_se"] for r in rows],
                                                [r["pred"] for r in rows]),
        "precision": {"runtime_dtype": exp.cfg.model.dtype, "entropy_dtype": "float64", "tf32": False},
    }


def run_lr_linearity(exp, args, out: Path) -> dict:
    eb = exp.ebatch(args.be, key=args.seed)  # one fixed E-batch for every lr and repeat
    cache: dict = {}
    raw = []
    for lr in _progress(args.learning_rates, args, "lr"):
        for r in range(args.repeats):
            def one(lr=lr, r=r):
                delta = exp.update(lr, key=args.seed + 1000 * r, bu=args.bu)  # fresh U-batch per repeat
                return exp.true_change({n: exp.theta[n] + delta[n] for n in delta}, eb, cache)
            res = _isolated(out / "runs" / f"lr_{lr:.0e}_run_{r}", one)
            if res is not None:
                raw.append({"lr": lr, "repeat": r, **res})
    summary = []
    for lr in args.learning_rates:
        vals = [x["true"] for x in raw if x["lr"] == lr]
        if vals:
            mean, sd, se = X.mean_sd_se(vals)
            summary.append({"lr": lr, "n": len(vals), "mean": mean, "sd": sd, "se": se, "min": min(vals), "max": max(vals)})
    fit = X.linear_fit([x["lr"] for x in raw], [x["true"] for x in raw]) if len({x["lr"] for x in raw}) > 1 else {}
    paired = X.paired_linearity(raw)
    (out / "raw_results.json").write_text(json.dumps(raw, indent=2))
    analysis = {"per_lr": summary, "fit": fit, "paired": paired}
    (out / "analysis.json").write_text(json.dumps(analysis, indent=2))
    _plot_linearity(out, raw, summary, fit)
    for s in summary:
        log.info("lr=%-8.1e n=%d  mean ΔH=%.4g ± %.2g", s["lr"], s["n"], s["mean"], s["se"])
    if fit:
        log.info("fit ΔH = %.4g·lr + %.3g   R² = %.4f (over repeats: its spread is the U-batches', not curvature)",
                 fit["slope"], fit["intercept"], fit["r2"])
    for q in paired:  # each repeat's U-batch at every lr: the linearity itself
        log.info("lr=%-8.1e ΔH/lr=%.4g ± %.2g  relative to lr=%.1e: %.4f ± %.2g (%d repeats)", q["lr"], q["slope"],
                 q["slope_se"], paired[0]["lr"], q["ratio"], q["ratio_se"], q["ratio_repeats"])
    return analysis


def run_batch_scaling(exp, args, out: Path) -> dict:
    lr = args.lr or exp.cfg.train.lr
    delta = exp.update(lr, key=args.seed, bu=args.bu)  # one fixed direction
    per_be = []
    for be in args.be_values:
        preds = []
        for r in _progress(range(args.runs), args, f"B_E={be}"):
            res = _isolated(out / "runs" / f"BE{be:03d}_run{r:03d}", lambda be=be, r=r: exp.delta_h(delta, exp.ebatch(be, key=args.seed + 100 * be + r)))
            if res is not None:
                preds.append(res)
        if preds:
            mean = sum(p["pred"] for p in preds) / len(preds)
            sd = X.mean_sd_se([p["pred"] for p in preds])[1] if len(preds) > 1 else float("nan")
            # SE of the mean from the reported per-run SEs: steadier than a spread of 3 runs.
            se = (sum(p["pred_se"] ** 2 for p in preds) / len(preds)) ** 0.5 / len(preds) ** 0.5
            per_be.append({"be": be, "runs": len(preds), "mean": mean, "sd_across_runs": sd, "se_of_mean": se,
                           "mean_reported_se": sum(p["pred_se"] for p in preds) / len(preds)})
            log.info("B_E=%-4d δH₁ = %.4g ± %.2g (spread across runs %.2g)", be, mean, se, sd)
    ses = [p["se_of_mean"] for p in per_be]
    verdict = X.scaling_verdict([p["be"] for p in per_be], [p["mean"] for p in per_be], ses) if len(per_be) > 2 else {}
    log.info("verdict: %s", verdict.get("verdict", "need ≥ 3 B_E values"))
    return {"lr": lr, "per_be": per_be, **verdict}


def run_sanity_check(exp, args, out: Path) -> dict:
    lr = args.lr or exp.cfg.train.lr
    delta = exp.update(lr, key=args.seed, bu=args.bu)
    runs = []
    for r in _progress(range(args.runs), args, "run"):
        res = _isolated(out / "runs" / f"run{r:03d}", lambda r=r: exp.delta_h(delta, exp.ebatch(args.be, key=args.seed + r)))
        if res is not None:
            runs.append(res)
    ref_be = args.ref_be or 4 * args.be
    ref = exp.delta_h(delta, exp.ebatch(ref_be, key=args.seed + 777_777))
    mean, sd, se = X.mean_sd_se([r["pred"] for r in runs])
    mean_se = sum(r["pred_se"] for r in runs) / len(runs)
    bias = mean - ref["pred"]
    result = {"lr": lr, "be": args.be, "runs": len(runs), "mean": mean, "sd_across_runs": sd,
              "mean_reported_se": mean_se, "calibration_ratio": sd / mean_se,
              "reference_be": ref_be, "reference": ref["pred"], "reference_se": ref["pred_se"],
              "bias": bias, "bias_z": bias / (se * se + ref["pred_se"] ** 2) ** 0.5}
    log.info("calibration sd/SE = %.3f (1 is ideal); bias vs B_E=%d reference = %.3g (z = %.2f)",
             result["calibration_ratio"], ref_be, bias, result["bias_z"])
    return result


def run_fisher(exp, args, out: Path) -> dict:
    from probes.fisher_files import write_results

    lr = args.lr or exp.cfg.train.lr
    probe = exp.fisher_probe(args.be, args.preconditioner)
    delta = exp.update(lr, key=args.seed, bu=args.bu)  # the U-batch is that update's
    n = len(exp.last_batch)
    D = exp.last_preconditioner if args.preconditioner == "adam" else None
    held = probe.gradients(exp.model, exp.ebatch(args.be, key=args.seed), exp.last_batch, exp.trainer.step)
    probe.accumulate(held, D, delta, lr * exp.last_clip / (n * exp.cfg.rollout.max_new_tokens), step=exp.trainer.step)
    res = probe.results()
    write_results(out, "fisher", res)
    v = res["values"]
    log.info("U×U diag %.4g, off-diagonal %.4g (same prompt %.4g, other prompts %.4g); E×U mean %.4g",
             v.get("uu_diag_mean", float("nan")), v.get("uu_offdiag_mean", float("nan")),
             v.get("uu_same_prompt_mean", float("nan")), v.get("uu_diff_prompt_mean", float("nan")), v.get("eu_mean", float("nan")))
    log.info("δH₁ of the update %.4g; Σ_j c_j %.4g (ratio %.3f)", v["pred"], v["contrib_sum"], v.get("contrib_ratio", float("nan")))
    return {"lr": lr, **v}


COMMANDS = {"single": run_single, "eta-sweep": run_eta_sweep, "lr-linearity": run_lr_linearity,
            "batch-scaling": run_batch_scaling, "sanity-check": run_sanity_check, "fisher": run_fisher}
NEEDS_OPTIMIZER = set(COMMANDS)  # every experiment takes a real optimizer step from the checkpoint


# ----------------------------------------------------------------------------- plumbing


def _progress(items, args, desc):
    if args.quiet:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


def _isolated(run_dir: Path, fn):
    """One run of a multi-run experiment: result.json, or error.txt and None (the others go on)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        res = fn()
    except UserError:
        raise
    except Exception:
        (run_dir / "error.txt").write_text(traceback.format_exc())
        log.error("run %s failed (see %s)", run_dir.name, run_dir / "error.txt")
        return None
    (run_dir / "result.json").write_text(json.dumps(res, indent=2))
    return res


def _plot_linearity(out: Path, raw, summary, fit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([s["lr"] for s in summary], [s["mean"] for s in summary], yerr=[s["se"] for s in summary], fmt="o", capsize=3)
    if fit:
        xs = sorted({x["lr"] for x in raw})
        ax.plot(xs, [fit["slope"] * x + fit["intercept"] for x in xs], "--", label=f"fit R²={fit['r2']:.3f}")
        ax.legend()
    ax.set(xlabel="learning rate", ylabel="ΔH (nats / sequence)", title="entropy change vs learning rate (mean ± SE)")
    fig.tight_layout()
    fig.savefig(out / "entropy_vs_learning_rate.png", dpi=120)
    ax.clear()
    ax.scatter([x["lr"] for x in raw], [x["true"] for x in raw], s=12)
    ax.set(xlabel="learning rate", ylabel="ΔH (nats / sequence)", title="raw measurements")
    fig.savefig(out / "raw_measurements.png", dpi=120)
    ax.clear()
    for r in sorted({x["repeat"] for x in raw}):
        runs = sorted((x["lr"], x["true"] / x["lr"]) for x in raw if x["repeat"] == r)
        ax.plot(*zip(*runs), marker="o", ms=3, label=f"repeat {r}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="ΔH / lr (nats / sequence)",
           title="each repeat's U-batch: flat where ΔH is first order in lr")
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=8)
    fig.savefig(out / "slope_vs_learning_rate.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # precision: no TF32 anywhere
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = None
    try:
        from probes.offline import EntropyExperiment

        if args.command in ("single", "eta-sweep", "sanity-check", "fisher") and args.be < 2:
            raise ConfigError(f"--be must be >= 2, got {args.be}")
        if args.command == "batch-scaling" and min(args.be_values) < 2:
            raise ConfigError(f"--be-values must all be >= 2, got {args.be_values}")
        if args.per_prompt < 1:
            raise ConfigError(f"--per-prompt must be >= 1, got {args.per_prompt}")
        exp = EntropyExperiment(args.checkpoint, args.overrides, need_optimizer=args.command in NEEDS_OPTIMIZER,
                                runtime_dtype=args.runtime_dtype, per_prompt=args.per_prompt,
                                microbatch_size=args.microbatch_size)
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        out = args.output_dir / args.command.replace("-", "_") / f"{args.name or args.command}_{stamp}"
        out.mkdir(parents=True)
        handler = logging.FileHandler(out / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        (out / "config.yaml").write_text(yaml.safe_dump({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                                         "checkpoint": str(exp.path), "run_config": to_dict(exp.cfg)}, sort_keys=False))
        result = COMMANDS[args.command](exp, args, out)
        (out / "results.json").write_text(json.dumps({"command": args.command, "checkpoint": str(exp.path), **result}, indent=2))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
