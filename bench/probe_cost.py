"""Cost of probes per due step, as a ratio of the bare training step, side by side.

Two trainers on the same config (SmolLM2 demo, group filtering off so that every step does
the same work), one without probes and one with the chosen probes every step, alternate steps
in one process; the median step time of each is compared. For ``delta_h`` it also prints the
breakdown (E-batch generation, the forward at θ_{k+1}, the forward-mode pass at θ_k);
writes JSON.

    python bench/probe_cost.py --steps 3 --be 8 --out bench/results/probe_cost.json
    python bench/probe_cost.py --probes gns,ess --steps 5 --out bench/results/gns_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl_training import dist  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.session import build_session  # noqa: E402

COMMON = ["rollout.filter_groups=false", "logging.progress_bar=false", "train.total_steps=1000"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="cfg/smollm2_cpu_demo.yaml")
    ap.add_argument("--steps", type=int, default=3, help="measured steps each, after one warm-up step each")
    ap.add_argument("--be", type=int, default=8)
    ap.add_argument("--per-prompt", type=int, default=2, help="completions per E-batch prompt")
    ap.add_argument("--probes", default="delta_h", help="comma-separated probe kinds to enable")
    ap.add_argument("--out", default="bench/results/probe_cost.json")
    args = ap.parse_args()
    world = dist.DistInfo()
    bare = build_session(load_config(args.cfg, COMMON + ["probes.probes=[]"]), world).trainer
    delta_opts = f"{{batch_size: {args.be}, completions_per_prompt: {args.per_prompt}}}"
    specs = [f"{{name: {k}, kind: {k}" + (f", options: {delta_opts}" if k == "delta_h" else "") + "}"
             for k in args.probes.split(",")]
    probe_cfg = f"probes.probes=[{', '.join(specs)}]"
    probed = build_session(load_config(args.cfg, COMMON + [probe_cfg]), world).trainer
    rows = {"bare": [], "probed": []}
    for i in range(args.steps + 1):
        pair = (("bare", bare), ("probed", probed))
        for name, tr in (pair if i % 2 else pair[::-1]):  # ABBA: neither always runs first
            t0 = time.perf_counter()
            metrics = tr.train_step().metrics
            dt = time.perf_counter() - t0
            if i == 0:
                continue  # warm-up
            row = {"seconds": dt, "rollout_s": metrics["time/rollout_s"],
                   **{k.removeprefix("probe/"): v for k, v in metrics.items() if k.startswith("probe/") and "/time" in k}}
            rows[name].append(row)
            print(f"{name:7s} step {i}: {dt:6.1f} s " + " ".join(f"{k}={v:.3g}" for k, v in row.items() if k != "seconds"))
    bare_s = statistics.median(r["seconds"] for r in rows["bare"])
    probed_s = statistics.median(r["seconds"] for r in rows["probed"])
    parts = {k: statistics.median(r[k] for r in rows["probed"]) for k in rows["probed"][0]
             if k not in ("seconds", "rollout_s")}
    # Both trainers draw the same rollouts (the probes only read), so most of the step-to-step
    # noise is generation time. The probes add nothing to the rollout phase: pairing the steps
    # and comparing the phase after it (forward, backward, probes, reduce) measures their cost
    # with that noise removed.
    after = lambda r: r["seconds"] - r["rollout_s"]  # noqa: E731
    paired = [after(p) - after(b) for b, p in zip(rows["bare"], rows["probed"])]
    summary = {
        "bare_s_per_step": bare_s, "probed_s_per_step": probed_s, "probes": args.probes,
        "overhead_ratio": (probed_s - bare_s) / bare_s,
        "overhead_ratio_paired": statistics.median(paired) / bare_s,
        "breakdown_ratio_of_bare_step": {k: v / bare_s for k, v in parts.items()},
        "breakdown_s": parts, "be": args.be, "per_prompt": args.per_prompt, "steps": args.steps,
        "loadavg": os.getloadavg(), "rows": rows, "cfg": args.cfg,
    }
    print(f"bare {bare_s:.1f} s/step, with {args.probes} {probed_s:.1f} s/step (medians): "
          f"overhead {summary['overhead_ratio']:+.3f} of the bare step; paired, after the rollout: "
          f"{summary['overhead_ratio_paired']:+.3f}")
    print("breakdown (fraction of a bare step): " + ", ".join(f"{k}: {v:.2f}" for k, v in summary["breakdown_ratio_of_bare_step"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
