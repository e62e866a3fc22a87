"""Cost of the exact Fisher kernel of a batch, as ratios measured side by side.

On one rollout batch of the demo (SmolLM2 + LoRA, 16 sequences), alternating in rounds:
  plain  — one forward+backward of Σ_i log π(y_i) over the batch (the probe's microbatches);
  kernel — the same pass with the capture hooks, then the Gram matrix (probes/fisher.py);
  sketch — the same pass in the probe's mode sketch: each sequence's gradient Kronecker-sketched
           in the hooks (16 × 16 per weight), never formed, and contracted with an F there (the
           exact c_j); then S Sᵀ;
  loop   — one forward+backward per sequence, then G Gᵀ (the brute force the tests compare to).
Prints kernel/plain, sketch/plain and loop/kernel (medians), checks that kernel and loop agree,
and the sketch's errors in units of their stated SD (mean z², ≈ 1); writes JSON. Before the
timed rounds, the device kernels (non-view aten ops) of one plain pass, one exact kernel (its
rows' pass and its Gram matrix apart) and one contraction of the rows with an F (the c_j) are
counted: on a GPU these small per-module ops cost their launches, which a CPU's timing cannot
show. ``--rounds 0`` only counts (the user's shape on a CPU: minutes, not hours).

    python bench/fisher_cost.py --rounds 3 --out bench/results/fisher_cost.json
    python bench/fisher_cost.py --shape smollm2-135m --tokenizer .carry/smollm2_tokenizer --out $OUT/fisher_cost.json
    python bench/fisher_cost.py --shape qwen2.5-1.5b --tokenizer .carry/smollm2_tokenizer --out $OUT/fisher_cost_qwen.json
    python bench/fisher_cost.py --shape qwen2.5-1.5b --rounds 0 --set rollout.max_new_tokens=8 --out /tmp/fc.json

``--shape`` (a GPU, where the converted SmolLM2 cannot be carried): a random-init model of
``bench/gpu_step.py``'s shapes and config instead of ``--cfg``'s model, on the default device;
``smollm2-135m`` is the demo's model and setting (issue 10's) in bf16, ``qwen2.5-1.5b`` the user's.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from rl_training import dist, policy, rollout  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from gpu_step import SETTINGS, scratch_dir, shape_config, sync  # noqa: E402
from rl_training.session import build_session  # noqa: E402
from probes.evaluation import probe_model  # noqa: E402
from probes.functional import fisher as F  # noqa: E402
from kernel_count import count  # noqa: E402

PROBE = ("probes.probes=[{name: fisher, kind: fisher, options: {preconditioner: none}}, "
         "{name: sketch, kind: fisher, options: {preconditioner: none, mode: sketch}}]")


def plain(model, params, tokens, micro, T):
    with probe_model(model):  # as the probe's passes: eval mode (no dropout), the model's own forward
        for _, mb in policy.microbatches(tokens, micro):
            lp = policy.token_logprobs(policy.completion_logits(model, *mb, T), mb.completion_ids)
            torch.autograd.grad((lp * mb.completion_mask).sum(), params)


def kernel(probe, model, tokens, keep: dict | None = None, sketch=None, F_all=None):
    rows, _, _ = probe.sequence_gradients(model, None, tokens, torch.zeros(0), sketch, F_all)
    if keep is not None:
        keep.update(rows)
    return probe.kernel(rows, None, step=1)[0]


def loop(model, params, tokens, T):
    G = []
    with probe_model(model):
        for i in range(len(tokens.prompt_ids)):
            row = policy.trim(*tokens.rows(slice(i, i + 1)))
            lp = policy.token_logprobs(policy.completion_logits(model, *row, T), row.completion_ids)
            grads = torch.autograd.grad((lp * row.completion_mask).sum(), params)
            G.append(torch.cat([g.reshape(-1) for g in grads]).double())
    G = torch.stack(G)
    return G @ G.T


def count_kernels(probe, model, tokens, params, F_all, runs) -> dict:
    """Kernels of one plain pass, one exact kernel (the rows' pass, then the Gram matrix), one
    contraction of the rows with F_all (the probe's c_j), and one sketched kernel."""
    from probes.fisher import U_ROW
    from probes.fisher_files import META

    got = []
    counted = {"plain": count(runs["plain"]).total,
               "rows_pass": count(lambda: got.append(probe.sequence_gradients(model, None, tokens, torch.zeros(0))[0])).total}
    rows = got[0]
    counted["gram"] = count(lambda: probe.kernel(rows, None, step=1)).total
    n = len(tokens.prompt_ids)
    meta = torch.zeros(n, len(META), dtype=torch.float64)
    meta[:, 1], meta[:, 4] = U_ROW, 1.0
    probe.stats["F"] = torch.cat([F_all[name].reshape(-1) for name in probe.names]).double()
    counted["contributions"] = count(lambda: probe.contributions({"meta": meta, "rows": rows, "dots": None}, None, 1.0)).total
    counted["sketch"] = count(runs["sketch"]).total
    counted["kernel"] = counted["rows_pass"] + counted["gram"]
    out = {"kernels": counted, "kernels_kernel_over_plain": counted["kernel"] / counted["plain"],
           "kernels_probe_over_plain": (counted["kernel"] + counted["contributions"]) / counted["plain"],
           "kernels_sketch_over_plain": counted["sketch"] / counted["plain"],
           "captured_modules": len(probe.capture.owners)}
    print(f"kernels: plain pass {counted['plain']}, exact kernel {counted['kernel']} (rows' pass {counted['rows_pass']}, "
          f"Gram {counted['gram']}; {out['kernels_kernel_over_plain']:.2f}× plain), c_j contraction "
          f"{counted['contributions']}, sketched kernel {counted['sketch']} ({out['kernels_sketch_over_plain']:.2f}× plain); "
          f"{out['captured_modules']} captured modules")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="cfg/smollm2_cpu_demo.yaml")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up round")
    ap.add_argument("--out", default="bench/results/fisher_cost.json")
    ap.add_argument("--shape", choices=sorted(SETTINGS), default=None, help="a random-init model of this shape")
    ap.add_argument("--tokenizer", type=Path, default=None, help="with --shape: tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (last)")
    args = ap.parse_args()
    overrides = ["rollout.filter_groups=false", "logging.progress_bar=false", PROBE]
    world = dist.DistInfo()
    if args.shape:
        args.cfg, shape_overrides = shape_config(args.shape, args.tokenizer, scratch_dir("fisher_cost_"))
        overrides = [*shape_overrides, *overrides]
        G = load_config(args.cfg, overrides).rollout.group_size
        overrides += [f"rollout.prompts_per_round={max(1, 16 // G)}", "train.buffer_size=16"]  # 16 sequences
        world = dist.init("auto", force_collectives=False)
    overrides += args.set
    cfg = load_config(args.cfg, overrides)
    s = build_session(cfg, world)
    tr = s.trainer
    (probe, sketch), model, T = tr.probes.probes, tr.policy, cfg.rollout.temperature
    kron = F.KroneckerSketch(0, *sketch.factors)
    model.eval()
    batch = rollout.collect(tr.engine, tr.scheduler, tr.prompt_fn, tr.reward_fn, cfg, step=1, world=s.world)
    tokens = batch.tensors
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # LoRA B = 0 at init leaves A without a gradient: move to a trained-like point
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
    exact_rows: dict = {}
    F_all = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}  # the c_j's contraction
    runs = {"plain": lambda: plain(model, params, tokens, probe.micro, T),
            "kernel": lambda: kernel(probe, model, tokens, keep=exact_rows),
            "sketch": lambda: kernel(sketch, model, tokens, sketch=kron, F_all=F_all),
            "loop": lambda: loop(model, params, tokens, T)}
    kernels = count_kernels(probe, model, tokens, params, F_all, runs)
    base = {"sequences": len(batch), "tokens": int(tokens.completion_mask.sum()), **kernels, "rounds": args.rounds,
            "cfg": args.cfg, "shape": args.shape, "overrides": overrides, "device": str(next(model.parameters()).device),
            "trainable_params": sum(p.numel() for p in params)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.rounds == 0:
        Path(args.out).write_text(json.dumps(base, indent=2))
        return
    times = {k: [] for k in runs}
    results = {}
    order = list(runs)
    for r in range(args.rounds + 1):
        for name in order[r % len(order):] + order[: r % len(order)]:  # rotate: none always first
            sync()
            t0 = time.perf_counter()
            results[name] = runs[name]()
            sync()
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            print(f"round {r} {name:6s} {dt:6.2f} s{' (warm-up)' if not r else ''}")
    med = {k: statistics.median(v) for k, v in times.items()}
    K, K_loop = results["kernel"], results["loop"]
    rel = float((K - K_loop).abs().max() / K_loop.abs().max())
    var = F.kronecker_variance_matrix(exact_rows, *sketch.factors, n=len(batch))
    z2 = float(((results["sketch"] - K) ** 2 / var).mean())
    columns = sum(kron.dim(p.shape) for p in params)
    real = int(tokens.prompt_mask.sum() + tokens.completion_mask.sum())
    padded = sum(mb.prompt_ids.numel() + mb.completion_ids.numel() for _, mb in policy.microbatches(tokens, probe.micro))
    summary = {
        **base, "median_s": med,
        "batched_positions_over_real_tokens": padded / real,
        "kernel_over_plain": med["kernel"] / med["plain"], "loop_over_kernel": med["loop"] / med["kernel"],
        "kernel_vs_loop_max_rel_err": rel, "sketch_over_plain": med["sketch"] / med["plain"],
        "sketch_factors": list(sketch.factors), "sketch_columns": columns, "sketch_z2_mean": z2,
        "sketch_rows_over_exact_rows_memory": columns / sum(p.numel() for p in params), "times_s": times,
        "loadavg": os.getloadavg(),
    }
    print(f"{len(batch)} sequences: plain fwd+bwd {med['plain']:.2f} s, exact kernel {med['kernel']:.2f} s, "
          f"sketched kernel {med['sketch']:.2f} s, per-sequence loop {med['loop']:.2f} s (medians)")
    print(f"sketch / plain = {summary['sketch_over_plain']:.3f}; {columns} columns per sequence "
          f"({summary['sketch_rows_over_exact_rows_memory']:.4f} of the exact rows); errors: mean z² {z2:.2f} (1 expected)")
    print(f"kernel / plain = {summary['kernel_over_plain']:.3f}   loop / kernel = {summary['loop_over_kernel']:.2f}   "
          f"kernel vs loop max rel err {rel:.1e}")
    print(f"the batched passes compute {padded / real:.2f} positions per real token (padding); the loop computes none")
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
