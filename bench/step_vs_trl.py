"""Seconds per optimizer step: TRL's GRPOTrainer vs our trainer, side by side in one process.

Both train SmolLM2-135M-Instruct + LoRA (r16, α32, q/v), loaded by the same function
(``session.load_policy``), on our arithmetic records with our prompt text (chat template +
R1 system prompt, rendered once: TRL gets the finished string, so it adds no default system
prompt of its own), with the same reward (``flexible_reward``), the same Dr-GRPO loss (TRL:
``loss_type="dr_grpo"``, ``scale_rewards="none"``, ``beta=0``), 4 prompts × 4 completions =
16 sequences per optimizer step in 2 microbatches of 8, max_new_tokens 64, full-vocabulary
sampling at T = 1, AdamW lr 1e-5, grad clip 1.0, and our group filtering off.

TRL is driven by its own ``train()`` (max_steps = 1 + rounds); a callback times each
optimizer step from ``on_step_begin`` to ``on_step_end`` (generation, rewards, both
microbatches, clip, optimizer and scheduler step; not its logging) and then runs and times
one of our ``Trainer.train_step()`` calls, so the two alternate: warm-up TRL, warm-up ours,
then [TRL, ours] × rounds. Completion tokens are counted exactly on both sides (TRL: from the
completion ids its reward function receives; ours: the rollout stats).

Known difference: we stop a completion at "</answer>" (``STOP_STRINGS``); TRL stops only at
EOS (its ``generate`` call gets no tokenizer, so ``stop_strings`` cannot be passed), so TRL may
generate more tokens per step. Compare tokens/s as well as s/step.

    python bench/step_vs_trl.py --rounds 3 --out bench/results/step_vs_trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rl_training import dist  # noqa: E402
from rl_training.config import load_config, to_dict  # noqa: E402
from rl_training.data.prompts import build_prompt  # noqa: E402
from rl_training.rewards import flexible_reward  # noqa: E402
from rl_training.session import build_session, load_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "rollout.group_size=4", "rollout.prompts_per_round=4", "rollout.max_new_tokens=64", "rollout.temperature=1.0",
    "rollout.filter_groups=false", "rollout.generation_batch_size=16",
    "train.buffer_size=16", "train.microbatch_size=8", "train.lr=1e-5", "train.grad_clip=1.0",
    "train.total_steps=1000", "logging.progress_bar=false",
    "probes.probes=[]",  # the same work as TRL: no probes (bench/probe_cost.py measures those)
]  # fmt: skip


def build_trl(cfg, records, out_dir: Path, max_steps: int, trl_tokens: list[int]):
    import datasets
    import trl

    tokenizer, model = load_policy(cfg)  # the same model, LoRA and LoRA init as ours

    def flexible(prompts, completions, completion_ids, gold, **kwargs):
        trl_tokens.append(sum(len(ids) for ids in completion_ids))
        return [flexible_reward(c, g).reward for c, g in zip(completions, gold)]

    r, t = cfg.rollout, cfg.train
    on_gpu = torch.cuda.is_available()
    args = trl.GRPOConfig(
        output_dir=str(out_dir), use_cpu=not on_gpu, bf16=on_gpu and cfg.model.dtype == "bfloat16",
        report_to=[], logging_steps=1, save_strategy="no",
        disable_tqdm=True, max_steps=max_steps, seed=cfg.seed,
        loss_type="dr_grpo", scale_rewards="none", beta=0.0, epsilon=t.eps_low, epsilon_high=t.eps_high,
        num_generations=r.group_size, max_completion_length=r.max_new_tokens,
        # One generation round of 16 sequences = one optimizer step of 2 microbatches of 8.
        per_device_train_batch_size=t.microbatch_size, gradient_accumulation_steps=t.buffer_size // t.microbatch_size,
        generation_batch_size=t.buffer_size,
        # Full-vocabulary ancestral sampling at T, like ours (TRL passes these to GenerationConfig;
        # top_k=0 and top_p=1 add no warper).
        temperature=r.temperature, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
        adam_epsilon=t.eps, max_grad_norm=t.grad_clip, lr_scheduler_type="constant", warmup_steps=0,
        use_vllm=False, gradient_checkpointing=False, disable_dropout=False,
    )  # fmt: skip
    prompts = [build_prompt(rec.question, tokenizer, cfg.data.use_chat_template) for rec in records]
    dataset = datasets.Dataset.from_dict({"prompt": prompts, "gold": [rec.gold for rec in records]})
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=flexible, args=args, processing_class=tokenizer, train_dataset=dataset
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def alternate_with_trl(cfg, ours, records, rounds: int) -> tuple[dict, dict, dict]:
    """[TRL step, our step] × (1 + rounds) in one process, the first pair a warm-up: (summary,
    raw records, TRL's args). ``ours`` is our Trainer on ``cfg``; TRL gets the same model."""
    trl_tokens: list[int] = []
    tmp = tempfile.TemporaryDirectory(prefix="trl_bench_")  # TRL's output_dir; it saves nothing
    t0 = time.perf_counter()
    trainer = build_trl(cfg, records, Path(tmp.name), 1 + rounds, trl_tokens)
    setup_s = time.perf_counter() - t0

    from transformers import TrainerCallback

    rec = {"trl_step_s": [], "trl_rollout_s": [], "trl_outside_step_s": [], "trl_logs": [],
           "ours_step_s": [], "ours_rollout_s": [], "ours_tokens": [], "ours_sequences": [], "ours_metrics": []}  # fmt: skip

    # TRL's rollout (generation + rewards + advantages) on its own, like our time/rollout_s.
    gen_and_score = trainer._generate_and_score_completions

    def timed_gen_and_score(*a, **kw):
        t = time.perf_counter()
        try:
            return gen_and_score(*a, **kw)
        finally:
            rec["trl_rollout_s"].append(time.perf_counter() - t)

    trainer._generate_and_score_completions = timed_gen_and_score

    class Alternate(TrainerCallback):
        t_begin = t_after_ours = None

        def on_step_begin(self, a, state, control, **kw):
            self.t_begin = time.perf_counter()
            if self.t_after_ours is not None:  # TRL's logging + data fetch between two steps
                rec["trl_outside_step_s"].append(self.t_begin - self.t_after_ours)

        def on_step_end(self, a, state, control, **kw):
            _sync()
            rec["trl_step_s"].append(time.perf_counter() - self.t_begin)
            print(f"TRL  step {state.global_step}: {rec['trl_step_s'][-1]:.1f} s", flush=True)
            t = time.perf_counter()
            out = ours.train_step()
            _sync()
            rec["ours_step_s"].append(time.perf_counter() - t)
            rec["ours_rollout_s"].append(out.metrics["time/rollout_s"])
            rec["ours_tokens"].append(out.batch.stats.completion_tokens)
            rec["ours_sequences"].append(out.batch.stats.sequences)
            rec["ours_metrics"].append(out.metrics)
            print(f"ours step {out.step}: {rec['ours_step_s'][-1]:.1f} s", flush=True)
            self.t_after_ours = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            rec["trl_logs"].append({"step": state.global_step, **(logs or {})})

    trainer.add_callback(Alternate())
    trainer.train()
    tmp.cleanup()

    n_steps = len(rec["trl_step_s"])
    assert n_steps == 1 + rounds and len(rec["ours_step_s"]) == n_steps and len(trl_tokens) == n_steps
    assert all(s == cfg.train.buffer_size for s in rec["ours_sequences"])
    timed = slice(1, None)  # drop the warm-up pair
    summary = {}
    for name, steps, tokens, rollout in (
        ("trl", rec["trl_step_s"], trl_tokens, rec["trl_rollout_s"]),
        ("ours", rec["ours_step_s"], rec["ours_tokens"], rec["ours_rollout_s"]),
    ):
        m, sd = mean_sd(steps[timed])
        summary[name] = {
            "s_per_step_mean": m, "s_per_step_sd": sd,
            "completion_tokens_per_step": statistics.fmean(tokens[timed]),
            "tokens_per_s": sum(tokens[timed]) / sum(steps[timed]),
            "rollout_s_mean": statistics.fmean(rollout[timed]),
            "rollout_tokens_per_s": sum(tokens[timed]) / sum(rollout[timed]),
            "warmup_step_s": steps[0],
        }  # fmt: skip
    summary["ratio_ours_over_trl_s_per_step"] = summary["ours"]["s_per_step_mean"] / summary["trl"]["s_per_step_mean"]
    summary["ratio_ours_over_trl_tokens_per_s"] = summary["ours"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    trl_args = {k: v for k, v in trainer.args.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
    return summary, {**rec, "trl_tokens": trl_tokens, "setup_s": setup_s}, trl_args


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="timed [TRL step, our step] pairs after one warm-up pair")
    ap.add_argument("--cfg", default=str(REPO / "cfg" / "smollm2_cpu_demo.yaml"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "step_vs_trl.json"))
    args = ap.parse_args()

    cfg = load_config(args.cfg, OVERRIDES)
    load_before = os.getloadavg()  # other jobs on the machine slow both sides alike (they alternate)
    t0 = time.perf_counter()
    session = build_session(cfg, dist.DistInfo())
    session_s = time.perf_counter() - t0
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    summary, rec, trl_args = alternate_with_trl(cfg, session.trainer, session.train_records, args.rounds)
    setup_s = session_s + rec.pop("setup_s")  # both trainers built, before the first step

    print(f"\n{args.rounds} timed round(s) after one warm-up step each; {cfg.train.buffer_size} sequences/step, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'':6} {'s/step (mean ± sd)':>20} {'tokens/step':>12} {'tokens/s':>9} {'rollout s':>10}")
    for name in ("trl", "ours"):
        s = summary[name]
        print(f"{name:6} {s['s_per_step_mean']:>11.2f} ± {s['s_per_step_sd']:<6.2f} "
              f"{s['completion_tokens_per_step']:>12.1f} {s['tokens_per_s']:>9.1f} {s['rollout_s_mean']:>10.2f}")  # fmt: skip
    print(f"ours/TRL time per step: {summary['ratio_ours_over_trl_s_per_step']:.3f}   "
          f"ours/TRL tokens/s: {summary['ratio_ours_over_trl_tokens_per_s']:.3f}")  # fmt: skip

    import accelerate
    import peft
    import transformers
    import trl

    result = {
        "summary": summary,
        "raw": rec,
        "setup_s": setup_s,
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "config": {
            "rounds": args.rounds, "cfg": args.cfg, "overrides": OVERRIDES, "ours": to_dict(cfg),
            "trl": trl_args,
        },  # fmt: skip
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        },  # fmt: skip
    }
    out_path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
