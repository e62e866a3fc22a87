"""Where a bf16 model's rollout–training mismatch comes from, on the demo's SmolLM2 + LoRA.

``rollout/logp_mismatch_tok`` is the mean |log π(y_t) as the sampler computed it − as the
loss's forward scores it| per completion token. In float32 it is ~1e-7; in bf16 it is large
enough to matter (issue 12 asks for ≤ 0.02 nats). One run, the same rollouts, side by side:

- sampler vs the trainer's forward (microbatch 8): what the trainer logs;
- the trainer's forward vs itself one row at a time: the same policy and tokens, only another
  batch shape (bf16 GEMMs round differently at other shapes and paddings);
- the trainer's forward with its logits rounded to bf16 (the model's lm_head) vs in float32 (the
  lm_head's products summed and kept in float32): the rounding of the logits alone;
- sampler vs trainer with float32 logits on both sides (``model.float32_logits``);
- the same model in float32: the floor;
- the same model in float16 (10 significand bits to bf16's 7; scoring and sampling only: the
  trainer does not train in float16);
- what ``train.sampler_correction`` would do about the bf16 mismatch: per mode, the share of
  tokens whose importance weight π_trainer/π_sampler falls outside the clip range (verl's
  [0, 2] and TRL's [0, 3]), the weights' mean, the spread of the sequence log-ratios and the
  Kish ESS fraction of the sequence weights (what sequence-level correction costs in samples).

    python bench/bf16_mismatch.py --out bench/results/bf16_mismatch.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rl_training import dist, policy  # noqa: E402
from rl_training.algs.dr_grpo import SAMPLER_CORRECTIONS, sampler_weights  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.data.prompts import STOP_STRINGS  # noqa: E402
from rl_training.models import set_float32_logits  # noqa: E402
from rl_training.session import build_session  # noqa: E402

DEMO = "cfg/smollm2_cpu_demo.yaml"


@contextlib.contextmanager
def float32_logits(model):
    """``model.float32_logits`` turned on for the block."""
    base = model.get_base_model()
    set_float32_logits(base)
    try:
        yield
    finally:
        set_float32_logits(base, on=False)


def mismatch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict:
    d = (a - b).abs()[mask]
    return {"mean": float(d.mean()), "max": float(d.max()), "tokens": int(mask.sum())}


def correction(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """The loss's importance weights in each ``train.sampler_correction`` mode at two clip ranges."""
    out: dict = {}
    seq_log_ratio = ((trainer_logp.double() - sampler_logp.double()) * mask).sum(1)
    out["sequence_log_ratio_std"] = float(seq_log_ratio.std())
    out["sequence_log_ratio_max_abs"] = float(seq_log_ratio.abs().max())
    w = seq_log_ratio.exp()
    out["sequence_weight_ess_frac"] = float(w.sum() ** 2 / (w * w).sum()) / w.numel()  # Kish, uncut
    for clip_max in (2.0, 3.0):
        for mode in SAMPLER_CORRECTIONS[1:]:
            sw = sampler_weights(trainer_logp, sampler_logp, mask, mode=mode, clip_min=0.0, clip_max=clip_max)
            out[f"{mode}_clip{clip_max:g}"] = {"outside_frac": float(sw.outside[mask].double().mean()),
                                              "weight_mean": float(sw.weight[mask].double().mean())}
    return out


def scores(model, comps, temperature: float, microbatch: int) -> torch.Tensor:
    """The trainer's log-probs of ``comps`` (``policy.score``: its microbatches and padding)."""
    tokens = policy.TokenBatch(comps.prompt_ids, comps.prompt_mask, comps.completion_ids, comps.completion_mask)
    with torch.no_grad():
        logp, _ = policy.score(model, tokens, temperature, microbatch)
    return logp


def measure(dtype: str, rows: int, overrides: list[str]) -> dict:
    # float16 is not a training dtype here (its backward needs loss scaling): the float32 model
    # cast to float16, LoRA included, measured as a sampler and a scorer only
    cfg = load_config(DEMO, [f"model.dtype={'float32' if dtype == 'float16' else dtype}", "probes.probes=[]", *overrides])
    trainer = build_session(cfg, dist.DistInfo()).trainer
    cfg, model = trainer.cfg, trainer.policy
    if dtype == "float16":
        model.to(torch.float16)
    records = trainer.scheduler.records
    prompts = [trainer.prompt_fn(records[i].question) for i in range(rows)]
    settings = dict(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                    stop_strings=STOP_STRINGS, max_prompt_tokens=cfg.data.max_prompt_tokens)
    T, micro = cfg.rollout.temperature, cfg.train.microbatch_size
    out: dict = {"dtype": dtype, "rows": rows, "microbatch": micro}
    t0 = time.perf_counter()
    comps = trainer.engine.generate(prompts, list(range(rows)), **settings)
    mask = comps.completion_mask.bool()
    trained = scores(model, comps, T, micro)
    out["sampler_vs_trainer"] = mismatch(comps.logp, trained, mask)
    if dtype == "float32":
        out["seconds"] = time.perf_counter() - t0
        return out
    out["trainer_vs_trainer_one_row"] = mismatch(trained, scores(model, comps, T, 1), mask)
    out["sampler_correction"] = correction(trained, comps.logp, mask)
    if dtype == "float16":
        out["seconds"] = time.perf_counter() - t0
        return out
    with float32_logits(model):
        out["trainer_bf16_vs_float32_logits"] = mismatch(trained, scores(model, comps, T, micro), mask)
        comps32 = trainer.engine.generate(prompts, list(range(rows)), **settings)
        mask32 = comps32.completion_mask.bool()
        out["sampler_vs_trainer_float32_logits"] = mismatch(comps32.logp, scores(model, comps32, T, micro), mask32)
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16, help="completions (the demo's prompts, one each)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (a smoke run: another model, fewer tokens)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/bf16_mismatch.json"))
    args = ap.parse_args()
    bf16, fp32 = measure("bfloat16", args.rows, args.set), measure("float32", args.rows, args.set)
    fp16 = measure("float16", args.rows, args.set)
    logged = bf16["sampler_vs_trainer"]["mean"]
    result = {
        "model": load_config(DEMO, args.set).model.name_or_path, "bfloat16": bf16, "float32": fp32, "float16": fp16,
        "batch_shape_over_logged": bf16["trainer_vs_trainer_one_row"]["mean"] / logged,
        "logit_rounding_over_logged": bf16["trainer_bf16_vs_float32_logits"]["mean"] / logged,
        "float32_logits_over_logged": bf16["sampler_vs_trainer_float32_logits"]["mean"] / logged,
        "float32_model_over_logged": fp32["sampler_vs_trainer"]["mean"] / logged,
        "float16_model_over_logged": fp16["sampler_vs_trainer"]["mean"] / logged,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"bf16 {result['model']}, {args.rows} completions, {bf16['sampler_vs_trainer']['tokens']} tokens: "
          f"mismatch sampler vs trainer {logged:.4f} nats/token (max {bf16['sampler_vs_trainer']['max']:.3f})")
    for key, label in (("batch_shape_over_logged", "trainer vs itself one row at a time"),
                       ("logit_rounding_over_logged", "trainer, logits bf16 vs float32"),
                       ("float32_logits_over_logged", "sampler vs trainer, float32 logits on both"),
                       ("float32_model_over_logged", "sampler vs trainer, float32 model"),
                       ("float16_model_over_logged", "sampler vs trainer, float16 model")):
        print(f"  {label:45s} / logged: {result[key]:.3g}")
    corr = bf16["sampler_correction"]
    print(f"sampler correction (bf16): sequence log-ratio std {corr['sequence_log_ratio_std']:.3f}, "
          f"max |.| {corr['sequence_log_ratio_max_abs']:.3f}, Kish ESS of the sequence weights "
          f"{corr['sequence_weight_ess_frac']:.3f} of the completions")
    for mode in SAMPLER_CORRECTIONS[1:]:
        cells = "   ".join(f"[0, {c:g}]: outside {corr[f'{mode}_clip{c:g}']['outside_frac']:.4f} "
                           f"weight mean {corr[f'{mode}_clip{c:g}']['weight_mean']:.4f}" for c in (2.0, 3.0))
        print(f"  {mode:18s} {cells}")


if __name__ == "__main__":
    main()
