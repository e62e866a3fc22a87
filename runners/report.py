"""A run's report: ``rl-report --run-dir RUN`` writes RUN/report/ with PNG plots and report.html.

Plots come from logs/train_log.jsonl and, when present, RUN/eval/*/consolidated_metrics.csv:
reward and pass rate; entropy; the rollout–training mismatch (and a float16 run's loss scale with
its skipped updates); δH₁ next to ΔH_true with 95 % bands, and their cumulative sums
next to the measured entropy H of the E-batches; GNS B_simple and the split of its noise;
ESS; Fisher-kernel summaries; pass@k against the step. report.html embeds them under a table
of the run's headline numbers; series.json lists the points of every plotted series. A
TensorBoard custom-scalars layout is written into the run, so that δH₁ and ΔH_true share one
chart there.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.functional.delta_h import t975  # noqa: E402
from rl_training.errors import UserError  # noqa: E402


def load_log(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "train_log.jsonl"
    if not path.is_file():
        raise UserError(f"not a run directory (no logs/train_log.jsonl): {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that logged ``key`` with a number."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def probe_names(rows: list[dict], kind_key: str) -> list[str]:
    """Probe names whose rows have ``kind_key`` (e.g. 'pred_se' for δH probes)."""
    return sorted({k.split("/")[1] for r in rows for k in r if k.startswith("probe/") and k.endswith("/" + kind_key)})


class Figures:
    """One PNG per plot, and the number of points of each series drawn (for series.json)."""

    def __init__(self, out: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.out = plt, out
        self.drawn: dict[str, dict[str, int]] = {}

    def new(self, name: str, ncols: int = 1):
        fig, axes = self.plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.6), squeeze=False)
        self.drawn[name] = {}
        return fig, axes[0]

    def line(self, name: str, ax, xs, ys, label: str, **kw) -> None:
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=label, **kw)
            self.drawn[name][label] = len(xs)

    def band(self, name: str, ax, xs, ys, half_width, label: str) -> None:
        if xs:
            ax.fill_between(xs, [y - h for y, h in zip(ys, half_width)], [y + h for y, h in zip(ys, half_width)], alpha=0.2)
            self.line(name, ax, xs, ys, label)

    def note(self, name: str, ax, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        self.drawn[name]["note"] = text

    def save(self, name: str, fig, axes) -> None:
        for ax in axes:
            ax.set_xlabel("step")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png", dpi=100)
        self.plt.close(fig)


def half_widths(rows: list[dict], key: str) -> list[float]:
    """95 % half-widths t975(df)·se of ``key`` where it is logged (1.96·se in logs without df)."""
    return [t975(r.get(f"{key}_df", float("inf"))) * r[f"{key}_se"] for r in rows if key in r]


def plot_training(fg: Figures, rows: list[dict]) -> None:
    fig, (a, b) = fg.new("reward_entropy", 2)
    fg.line("reward_entropy", a, *series(rows, "rollout/reward_mean"), "reward")
    fg.line("reward_entropy", a, *series(rows, "rollout/pass_rate"), "pass rate")
    a.set(title="rollouts")
    fg.line("reward_entropy", b, *series(rows, "train/entropy"), "entropy / token (training batch)")
    b.set(title="entropy")
    fg.save("reward_entropy", fig, (a, b))


def plot_precision(fg: Figures, rows: list[dict]) -> None:
    """The rollout–training mismatch; with float16, the loss scale and the skipped updates."""
    scaled = bool(series(rows, "train/loss_scale")[0])
    fig, axes = fg.new("precision", 2 if scaled else 1)
    a = axes[0]
    fg.line("precision", a, *series(rows, "rollout/logp_mismatch_tok"), "mean / token")
    fg.line("precision", a, *series(rows, "rollout/logp_mismatch_max"), "max")
    if all(v > 0 for v in series(rows, "rollout/logp_mismatch_tok")[1]):
        a.set(yscale="log")
    a.set(title="rollout–training mismatch |log π_sampler − log π_trainer|", ylabel="nats")
    if scaled:
        b = axes[1]
        fg.line("precision", b, *series(rows, "train/loss_scale"), "loss scale after the step")
        skipped = [(r["step"], r["train/loss_scale"]) for r in rows
                   if "train/loss_scale" in r and r.get("train/updates_skipped", 0) > 0]
        if skipped:
            b.scatter([s for s, _ in skipped], [v for _, v in skipped], color="red", zorder=3, label="update skipped")
            fg.drawn["precision"]["update skipped"] = len(skipped)
        b.set(title="float16 loss scale", yscale="log", ylabel="S")
    fg.save("precision", fig, axes)


def plot_delta_h(fg: Figures, rows: list[dict]) -> None:
    for name in probe_names(rows, "pred_se"):
        p = f"probe/{name}/"
        png = f"delta_h_{name}"
        fig, (a, b) = fg.new(png, 2)
        steps, pred = series(rows, p + "pred")
        ts, true = series(rows, p + "true")
        fg.band(png, a, steps, pred, half_widths(rows, p + "pred"), "δH₁ (predicted)")
        fg.band(png, a, ts, true, half_widths(rows, p + "true"), "ΔH_true (measured)")
        a.axhline(0, color="k", lw=0.6)
        a.set(title=f"{name}: per due step (95 % bands)", ylabel="nats / sequence")
        hs, H = series(rows, p + "H")
        if hs:  # H at the first due step, then accumulated predicted and measured changes
            cum_pred, cum_true = [H[0]], [H[0]]
            for d, t in zip(pred[:-1], true[:-1]):
                cum_pred.append(cum_pred[-1] + d)
                cum_true.append(cum_true[-1] + t)
            _, H_se = series(rows, p + "H_se")
            fg.band(png, b, hs, H, H_se, "H of the E-batch")
            fg.line(png, b, hs, cum_pred, "H₀ + Σ δH₁")
            fg.line(png, b, hs, cum_true, "H₀ + Σ ΔH_true")
            b.set(title="cumulative (exact only when due every step)", ylabel="nats / sequence")
        fg.save(png, fig, (a, b))


def plot_gns(fg: Figures, rows: list[dict]) -> None:
    for name in probe_names(rows, "trS_ema"):
        p = f"probe/{name}/"
        png = f"gns_{name}"
        fig, (a, b) = fg.new(png, 2)
        fg.line(png, a, *series(rows, p + "b_simple"), "B_simple (prompts)")
        fg.line(png, a, *series(rows, p + "b_simple_seq"), "B_simple (sequences)")
        if series(rows, p + "b_simple")[0]:
            a.set(yscale="log")
        else:  # an empty panel would read as a plotting bug
            fg.note(png, a, "not resolved at any step:\n|ḡ|² (EMA) within 2 SE of 0")
        a.set(title=f"{name}: critical batch (once resolved)")
        fg.line(png, b, *series(rows, p + "trS_between"), "tr Σ between prompts")
        fg.line(png, b, *series(rows, p + "trS_intra"), "s_w / G within prompts")
        fg.line(png, b, *series(rows, p + "g2_ema"), "|ḡ|² (EMA)")
        b.set(title="noise split and signal")
        fg.save(png, fig, (a, b))


def plot_ess(fg: Figures, rows: list[dict]) -> None:
    for name in probe_names(rows, "loss_ess_frac"):
        p = f"probe/{name}/"
        png = f"ess_{name}"
        fig, (a,) = fg.new(png)
        for key, label in (("loss_ess_frac", "loss weights"), ("ratio_tok_ess_frac", "PPO ratios, tokens"),
                           ("ratio_seq_ess_frac", "PPO ratios, sequences")):
            fg.line(png, a, *series(rows, p + key), label)
        a.set(title=f"{name}: Kish ESS / n", ylim=(0, 1.05))
        fg.save(png, fig, (a,))


def plot_fisher(fg: Figures, rows: list[dict]) -> None:
    for name in probe_names(rows, "exact_frac"):
        p = f"probe/{name}/"
        png = f"fisher_{name}"
        fig, (a, b) = fg.new(png, 2)
        for key, label in (("uu_diag_mean", "U×U diagonal"), ("uu_offdiag_mean", "U×U off-diagonal"),
                           ("uu_same_prompt_mean", "U×U same prompt"), ("eu_mean", "E×U mean")):
            fg.line(png, a, *series(rows, p + key), label)
        a.set(title=f"{name}: kernel means")
        fg.line(png, b, *series(rows, p + "pred"), "δH₁ of the update")
        fg.line(png, b, *series(rows, p + "contrib_sum"), "Σ_j c_j")
        b.set(title="contributions of the training sequences", ylabel="nats / sequence")
        fg.save(png, fig, (a, b))


def plot_eval(fg: Figures, run_dir: Path) -> None:
    for csv_path in sorted((run_dir / "eval").glob("*/consolidated_metrics.csv")):
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
        png = f"eval_{csv_path.parent.name}"
        fig, (a,) = fg.new(png)
        steps = [int(r["step"]) for r in rows]
        for k in (1, 2, 4, 8):
            pts = [(s, float(r[f"pass@{k}"]), float(r[f"pass@{k}_se"])) for s, r in zip(steps, rows) if r[f"pass@{k}"] not in ("", "nan")]
            if pts:
                fg.band(png, a, [s for s, _, _ in pts], [v for _, v, _ in pts], [e if e == e else 0.0 for _, _, e in pts], f"pass@{k}")
        a.set(title=f"rl-eval ({csv_path.parent.name}): pass@k ± 95 %", ylim=(-0.02, 1.02))
        fg.save(png, fig, (a,))


def custom_scalars(run_dir: Path, rows: list[dict]) -> None:
    """δH₁ and ΔH_true of each δH probe on one TensorBoard chart (Custom Scalars tab)."""
    from torch.utils.tensorboard import SummaryWriter

    charts = {name: ["Multiline", [f"probe/{name}/pred", f"probe/{name}/true"]] for name in probe_names(rows, "pred_se")}
    if not charts:
        return
    w = SummaryWriter(log_dir=str(run_dir / "tensorboard"), filename_suffix=".layout")
    w.add_custom_scalars({"entropy change": {f"{n}: δH₁ vs ΔH_true": c for n, c in charts.items()}})
    w.close()


def headline(run_dir: Path, rows: list[dict]) -> list[tuple[str, str]]:
    from rl_training.summary_text import summary_rows

    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return summary_rows(json.loads(summary_path.read_text()))
    return [("steps logged", str(len(rows)))]


def write_html(out: Path, run_dir: Path, table: list[tuple[str, str]], pngs: list[str]) -> None:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in table)
    imgs = "".join(f'<figure><img src="{p}.png" alt="{p}"><figcaption>{p}</figcaption></figure>' for p in pngs)
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>run report</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}th{text-align:left;padding-right:1em}"
        "img{max-width:100%}figure{margin:1em 0}</style>"
        f"<h1>{html.escape(run_dir.name)}</h1><table>{cells}</table>{imgs}")


def make_report(run_dir: Path) -> Path:
    rows = load_log(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    fg = Figures(out)
    for plot in (plot_training, plot_precision, plot_delta_h, plot_gns, plot_ess, plot_fisher):
        plot(fg, rows)
    plot_eval(fg, run_dir)
    (out / "series.json").write_text(json.dumps(fg.drawn, indent=2))
    write_html(out, run_dir, headline(run_dir, rows), list(fg.drawn))
    custom_scalars(run_dir, rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rl-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        out = make_report(args.run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
