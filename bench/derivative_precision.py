"""The δH probe's derivatives in the model's bf16 against float32 and float64, on the same E-batch.

The demo's SmolLM2 + LoRA in bf16 trains a few steps with the δH probe (B_E 8, every step); at
each, the probe's tables of that step's E-batch, θ_k and Δθ are taken again with its passes in
bf16 (``precision: model``), float32 and float64. δH₁ is then estimated from the float64 values
with each precision's derivatives, so only the derivative pass differs. Reported: each
precision's per-token relative error of dh, dℓ, dP_S, and |δH₁ − δH₁(float64)| over δH₁'s SE
and over |δH₁ − ΔH_true| (the second-order term the two differ by). Writes JSON.

    python bench/derivative_precision.py --out bench/results/derivative_precision.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from probes.functional import delta_h as F  # noqa: E402
from rl_training import dist  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.session import build_session  # noqa: E402

PRECISIONS = ("model", "float32", "float64")


def step_errors(probe, model, captured: dict) -> dict:
    tables = {}
    for precision in PRECISIONS:
        probe.precision, probe._evaluator = precision, None
        tabs, rows = zip(*probe.tables(model, captured["theta"], captured["ebatch"], delta=captured["delta"]))
        tables[precision] = F.TokenTable.unstack(torch.cat(tabs))
        meta = torch.cat(rows)
    probe.precision, probe._evaluator = "auto", None
    ref = tables["float64"]
    mask = ref.mask.bool()
    base = F.estimate(ref, meta[:, 0].long(), meta[:, 1].long(), probe.pool_size)
    out = {"pred": base["pred"], "pred_se": base["pred_se"], "true": base["true"]}
    for precision, tab in tables.items():
        mixed = dataclasses.replace(ref, dh=tab.dh, dlp=tab.dlp, dps=tab.dps)
        pred = F.estimate(mixed, meta[:, 0].long(), meta[:, 1].long(), probe.pool_size)["pred"]
        rel = {k: float((getattr(tab, k) - getattr(ref, k))[mask].norm() / getattr(ref, k)[mask].norm())
               for k in ("dh", "dlp", "dps")}
        out[precision] = {"pred": pred, "tangent_rel_err": rel,
                          "pred_err_over_se": abs(pred - base["pred"]) / base["pred_se"],
                          "pred_err_over_second_order": abs(pred - base["pred"]) / abs(base["pred"] - base["true"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/derivative_precision.json"))
    args = ap.parse_args()
    cfg = load_config("cfg/smollm2_cpu_demo.yaml", [
        "model.dtype=bfloat16", "rollout.filter_groups=false", "train.total_steps=1000",
        "probes.probes=[{name: delta_h, kind: delta_h, every_n_steps: 1, options: {batch_size: 8}}]"])
    trainer = build_session(cfg, dist.DistInfo()).trainer
    probe = trainer.probes.probes[0]
    captured: dict = {}
    measure = probe.measure

    def keep(model, theta, delta, ebatch, theta_new=None):  # the step's θ_k, Δθ and E-batch, as the probe saw them
        captured.update(theta={k: v.clone() for k, v in theta.items()}, delta={k: v.clone() for k, v in delta.items()},
                        ebatch=ebatch)
        return measure(model, theta, delta, ebatch, theta_new)

    probe.measure = keep
    steps = []
    for _ in range(args.steps):
        trainer.train_step()
        steps.append(step_errors(probe, trainer.policy, captured))
    worst = {p: max(s[p]["pred_err_over_se"] for s in steps) for p in PRECISIONS}
    result = {"model": cfg.model.name_or_path, "dtype": cfg.model.dtype, "lr": cfg.train.lr, "be": 8, "steps": steps,
              "pred_err_over_se_max": worst,
              "pred_err_over_second_order_max": {p: max(s[p]["pred_err_over_second_order"] for s in steps)
                                                 for p in PRECISIONS}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for i, s in enumerate(steps, 1):
        print(f"step {i}: δH₁ {s['pred']:+.4f} ± {s['pred_se']:.4f}, ΔH_true {s['true']:+.4f}")
        for p in PRECISIONS[:2]:
            r = s[p]
            errs = ", ".join(f"{k} {v:.1e}" for k, v in r["tangent_rel_err"].items())
            print(f"  derivatives in {p:7s}: per-token rel. error {errs}; δH₁ {r['pred']:+.4f}, off by "
                  f"{r['pred_err_over_se']:.3f} SE, {r['pred_err_over_second_order']:.2f} × |δH₁ − ΔH_true|")


if __name__ == "__main__":
    main()
