"""float16 against bfloat16 training on the demo's SmolLM2 + LoRA, side by side in one run.

bf16 keeps 7 significand bits, float16 10 (and a narrower exponent range, hence the loss
scale: ``rl_training/loss_scale.py``). Measured here:

- one step's loss gradient (the same rollouts, sampled once by the float32 model) in each dtype
  against float32 arithmetic on the same rounded weights: relative error and cosine; float16
  with its loss scale and without one (S = 1), with the share of entries that underflow to 0;
- the same for single sequences' ∇log π(y) (what the Fisher probe's own backward takes, not
  loss-scaled): mean relative error over a few completions;
- a short training run in each dtype, their steps alternating: the logged rollout–training
  mismatch (``rollout/logp_mismatch_tok``), seconds per step, updates skipped, the loss scale.

    python bench/float16_training.py --steps 3 --out bench/results/float16_training.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rl_training import dist, policy, rollout  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.loss_scale import LossScaler  # noqa: E402
from rl_training.session import build_session  # noqa: E402
from rl_training.trainer import total_grad_norm  # noqa: E402

DEMO = "cfg/smollm2_cpu_demo.yaml"
SINGLE = 4  # completions whose own ∇log π is compared


def loss_grad(trainer, batch, scale: float | None) -> torch.Tensor:
    """The step's loss gradient over the trainable parameters, flat float64 (``scale``: the loss
    scale of a float16 backward; None: none)."""
    params = list(trainer.trainable.values())
    for p in params:
        p.grad = None
    scaler = LossScaler(scale is not None, scale or 1.0)
    micro = trainer.cfg.train.microbatch_size
    for i in range(trainer.accum):
        terms, *_ = trainer._microbatch_loss(batch.select(slice(i * micro, (i + 1) * micro)))
        scaler.scale_loss(terms.loss).backward()
    scaler.unscale_(params)
    assert scaler.finite(total_grad_norm(params)), "the gradient overflowed"
    return torch.cat([p.grad.reshape(-1).double() for p in params])


def sequence_grads(trainer, batch, rows: int) -> list[torch.Tensor]:
    """∇ Σ_t log π(y_t) of each of the first ``rows`` completions alone, flat float64."""
    params = list(trainer.trainable.values())
    out = []
    for i in range(rows):
        mb = batch.select(slice(i, i + 1))
        logits = policy.completion_logits(trainer.policy, *mb.tensors, trainer.cfg.rollout.temperature)
        lp = policy.token_logprobs(logits, mb.completion_ids) * mb.completion_mask.to(logits.device)
        out.append(torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(lp.sum(), params)]))
    return out


def compare(g: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"rel_err": float((g - ref).norm() / ref.norm()),
            "cosine": float(g @ ref / (g.norm() * ref.norm())),
            "zeroed_frac": float(((g == 0) & (ref != 0)).double().mean())}


def gradient_precision(overrides: list[str]) -> dict:
    cfg = load_config(DEMO, ["model.dtype=float32", "probes.probes=[]", *overrides])
    trainer = build_session(cfg, dist.DistInfo()).trainer
    model = trainer.policy
    model.eval()
    batch = rollout.collect(trainer.engine, trainer.scheduler, trainer.prompt_fn, trainer.reward_fn, cfg, step=1,
                            world=trainer.world)
    model.train()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    original = {n: p.detach().clone() for n, p in frozen.items()}

    def set_frozen(dtype):
        for n, p in frozen.items():
            p.data = original[n].to(dtype)

    out: dict = {"sequences": len(batch), "tokens": int(batch.completion_mask.sum()), "single_sequences": SINGLE}
    for dtype, scales in ((torch.bfloat16, (None,)), (torch.float16, (cfg.train.loss_scale_init, None))):
        set_frozen(dtype)
        grads = {s: loss_grad(trainer, batch, s) for s in scales}
        singles = sequence_grads(trainer, batch, SINGLE)
        for p in frozen.values():  # the same rounded weights, float32 arithmetic
            p.data = p.data.float()
        ref = loss_grad(trainer, batch, None)
        for s, g in grads.items():
            name = "bfloat16" if dtype == torch.bfloat16 else ("float16_scaled" if s else "float16_unscaled")
            out[name] = compare(g, ref)
        per_seq = [compare(g, r) for g, r in zip(singles, sequence_grads(trainer, batch, SINGLE))]
        out[f"{'bfloat16' if dtype == torch.bfloat16 else 'float16'}_single_sequence"] = {
            k: sum(c[k] for c in per_seq) / len(per_seq) for k in per_seq[0]}
    set_frozen(torch.float32)
    return out


def runs(steps: int, overrides: list[str]) -> dict:
    trainers = {d: build_session(load_config(DEMO, [f"model.dtype={d}", "probes.probes=[]", *overrides]),
                                 dist.DistInfo()).trainer for d in ("float16", "bfloat16")}
    out = {d: {"mismatch_tok": [], "mismatch_max": [], "step_s": [], "updates_skipped": 0.0} for d in trainers}
    for _ in range(steps):
        for d, tr in trainers.items():  # alternating: both see the same machine state
            t0 = time.perf_counter()
            m = tr.train_step().metrics
            out[d]["step_s"].append(time.perf_counter() - t0)
            out[d]["mismatch_tok"].append(m["rollout/logp_mismatch_tok"])
            out[d]["mismatch_max"].append(m["rollout/logp_mismatch_max"])
            out[d]["updates_skipped"] += m.get("train/updates_skipped", 0.0)
    out["float16"]["loss_scale"] = trainers["float16"].loss_scaler.scale
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="training steps per dtype")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (a smoke run: another model, fewer tokens)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/float16_training.json"))
    args = ap.parse_args()
    grad = gradient_precision(args.set)
    run = runs(args.steps, args.set)
    f16, b16 = run["float16"], run["bfloat16"]
    result = {
        "model": load_config(DEMO, args.set).model.name_or_path, "steps": args.steps, "gradient": grad, "runs": run,
        "grad_err_float16_over_bfloat16": grad["float16_scaled"]["rel_err"] / grad["bfloat16"]["rel_err"],
        "mismatch_float16_over_bfloat16": mean(f16["mismatch_tok"]) / mean(b16["mismatch_tok"]),
        "step_time_float16_over_bfloat16": mean(f16["step_s"]) / mean(b16["step_s"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['model']}: one step's loss gradient ({grad['sequences']} sequences, {grad['tokens']} tokens), and "
          f"{SINGLE} sequences' own ∇log π (means), against float32 arithmetic on the same rounded weights")
    for name in ("bfloat16", "float16_scaled", "float16_unscaled", "bfloat16_single_sequence", "float16_single_sequence"):
        g = grad[name]
        print(f"  {name:24s} rel err {g['rel_err']:.2e}  cosine {g['cosine']:.6f}  entries zeroed {g['zeroed_frac']:.4f}")
    print(f"training, {args.steps} steps each, alternating:")
    for d in ("float16", "bfloat16"):
        r = run[d]
        print(f"  {d:9s} mismatch/token {mean(r['mismatch_tok']):.4f} (max {max(r['mismatch_max']):.3f})  "
              f"{mean(r['step_s']):.1f} s/step  updates skipped {r['updates_skipped']:g}")
    print(f"float16 / bfloat16: gradient error {result['grad_err_float16_over_bfloat16']:.3f}, "
          f"mismatch {result['mismatch_float16_over_bfloat16']:.3f}, step time {result['step_time_float16_over_bfloat16']:.2f}")


if __name__ == "__main__":
    main()
