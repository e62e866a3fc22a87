"""The cross-rank Gaussian sketch of the Fisher probe's exact mode: R drawn by torch's CPU
generator (copied to the rows' device a block at a time) against the counter-based generator
on the rows' device (``GaussianSketch``'s default off the CPU), projecting the same rows,
alternated, medians. On a GPU this is the probe's cost a due step at more than one rank; on a
CPU the counter draws are the slower ones (the CPU keeps torch's stream).

    python bench/sketch_rate.py --out bench/results/sketch_rate.json
    python bench/sketch_rate.py --dim 2097152 --out $OUT/sketch_rate.json   # a GPU: 2.1 M, r16 q/v on Qwen2.5-1.5B

Also checks each projection: |s|²/|g|² of every row within 6 SE (√(2/k)) of 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from probes.functional.fisher import GaussianSketch  # noqa: E402

GENERATORS = ("torch", "counter")


def timed(sketcher: GaussianSketch, rows: torch.Tensor) -> tuple[float, torch.Tensor]:
    if rows.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = sketcher.project("model.layers.0.self_attn.q_proj.lora_A.default.weight", rows)
    if rows.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=None, help="parameters sketched (default 2**21 on a GPU, 2**16 on a CPU)")
    ap.add_argument("--k", type=int, default=512, help="sketch dimension (the probe's sketch_dim)")
    ap.add_argument("--rows", type=int, default=16, help="sequences of the rank")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dim = args.dim or (2**21 if device.type == "cuda" else 2**16)
    rows = torch.randn(args.rows, dim, generator=torch.Generator().manual_seed(0)).to(device)
    norms = rows.double().pow(2).sum(1)
    seconds: dict[str, list[float]] = {g: [] for g in GENERATORS}
    norm_ratio = {}
    for rep in range(args.reps + 1):  # the first round warms up (allocator, kernels), untimed
        for g in GENERATORS if rep % 2 else reversed(GENERATORS):
            t, out = timed(GaussianSketch(rep, args.k, g), rows)
            ratio = (out.pow(2).sum(1) / norms).cpu()
            if float((ratio - 1).abs().max()) > 6 * (2 / args.k) ** 0.5:
                raise SystemExit(f"sketch_rate: generator {g} does not preserve norms: {ratio.tolist()}")
            norm_ratio[g] = float(ratio.mean())
            if rep:
                seconds[g].append(t)
    med = {g: statistics.median(s) for g, s in seconds.items()}
    normals = dim * args.k
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "dim": dim, "k": args.k, "rows": args.rows, "reps": args.reps, "seconds": seconds,
              "normals_per_s": {g: normals / med[g] for g in GENERATORS}, "norm_ratio_mean": norm_ratio,
              "counter_over_torch": med["counter"] / med["torch"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"Gaussian sketch of {args.rows} rows × {dim:,} parameters, k {args.k}, on {result['device']}:")
    for g in GENERATORS:
        print(f"  R by {g:8s} {med[g]:8.3f} s  ({normals / med[g] / 1e9:.3f} G normals/s)")
    print(f"  counter / torch time: {result['counter_over_torch']:.3f}")


if __name__ == "__main__":
    main()
