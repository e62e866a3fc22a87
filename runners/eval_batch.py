"""Evaluate a run's checkpoints: ``rl-eval --run-dir RUN [--steps all|N,M] [--split test|train] ...``.

For each checkpoint step, every question gets ``--num-samples`` completions from the policy at
that step (the run's prompt, sampler, stop strings and reward; temperature and token budget
the run's unless given), and one folder is written:

  <out>/step_N/metrics.csv       one row per question: format and answer rates, unbiased
                                 pass@1/2/4/8 (Chen et al. 2021), reward, lengths, entropy/token
  <out>/step_N/records.jsonl.gz  every completion with its reward breakdown
  <out>/step_N/run_meta.json     what was evaluated, how, and how long it took

and <out>/consolidated_metrics.csv, one row per evaluated step (means over questions and
their standard errors). <out> is RUN/eval/<split> unless --output-dir is given. A step whose
folder exists is skipped (a second call does no work); one evaluated with other settings is
refused. Under torchrun the questions are split across ranks and the results gathered (rank 0
writes). Sample j of a question has the seed (run seed, question id, j) at every step: steps
are compared on common random numbers.

Questions: ``--split train`` is the run's training pool, ``--split test`` its held-out pool
(arithmetic), or for GSM8K the test split from ``--data PATH`` (a local jsonl) or the hub;
``--subset-frac F`` keeps a fixed, seeded fraction.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rl_training import checkpoint, dist, policy  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.data.prompts import STOP_STRINGS, build_prompt  # noqa: E402
from rl_training.data.records import load_hub_gsm8k, load_jsonl_records  # noqa: E402
from rl_training.errors import ConfigError, UserError  # noqa: E402
from rl_training.eval_metrics import PASS_KS, mean_se, question_row  # noqa: E402
from rl_training.rewards import get_reward_fn  # noqa: E402
from rl_training.sampling import sample, stable_seed  # noqa: E402
from rl_training.session import check_prompt_lengths, load_policy, load_records  # noqa: E402

METRICS = ("format_rate", "answer_rate", "reward_mean", *(f"pass@{k}" for k in PASS_KS), "length_mean", "length_max",
           "entropy_per_token")
COLUMNS = ("id", "n", "correct", *METRICS)
SETTINGS = ("split", "data", "subset_frac", "num_samples", "temperature", "max_new_tokens")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="rl-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--steps", default="all", help="all, or comma-separated checkpoint steps")
    ap.add_argument("--split", choices=("test", "train"), default="test")
    ap.add_argument("--data", default=None, help="GSM8K test jsonl (default: the hub's test split)")
    ap.add_argument("--subset-frac", type=float, default=1.0)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=None, help="default: the run's rollout.temperature")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's rollout.max_new_tokens")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per generate() (default: the run's)")
    ap.add_argument("--output-dir", type=Path, default=None)
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- inputs


def select_steps(ckpt_root: Path, spec: str) -> list[int]:
    have = checkpoint.available_steps(ckpt_root)
    if not have:
        raise checkpoint.CheckpointError(f"no checkpoints in {ckpt_root}")
    if spec == "all":
        return have
    try:
        want = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--steps must be 'all' or comma-separated integers, got {spec!r}") from None
    missing = sorted(set(want) - set(have))
    if missing:
        raise ConfigError(f"--steps: no checkpoint for step(s) {missing} (available: {have})")
    return sorted(set(want))


def load_questions(cfg, split: str, data: str | None, subset_frac: float) -> list:
    if not 0 < subset_frac <= 1:
        raise ConfigError(f"--subset-frac must be in (0, 1], got {subset_frac}")
    if data is not None:
        records = load_jsonl_records(data)
    elif cfg.data.task == "gsm8k" and split == "test":
        records = load_hub_gsm8k("test")
    else:  # the run's own pools: training prompts, or the held-out ones
        train, held_out = load_records(cfg)
        records = train if split == "train" else held_out
        if not records:
            raise ConfigError("--split test: the run has no held-out prompts (data.eval_fraction = 0); give --data")
    keep = max(1, math.ceil(subset_frac * len(records)))
    if keep < len(records):
        idx = sorted(random.Random(f"{cfg.seed}/eval-subset").sample(range(len(records)), keep))
        records = [records[i] for i in idx]
    return records


# ----------------------------------------------------------------------------- one step


def evaluate(model, tokenizer, cfg, records: list, settings: dict, batch_size: int, bar=None) -> list[dict]:
    """Every sample of ``records`` at the model's current weights: dicts with the question id,
    sample index, text, reward breakdown, length and entropy (sum over tokens, under π_T)."""
    reward_fn = get_reward_fn(cfg.data.reward)
    T = settings["temperature"]
    pairs = [(r, j) for r in records for j in range(settings["num_samples"])]
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        comps = sample(model, tokenizer, [build_prompt(r.question, tokenizer, cfg.data.use_chat_template) for r, _ in chunk],
                       [stable_seed(cfg.seed, "eval", r.id, j) for r, j in chunk],
                       max_new_tokens=settings["max_new_tokens"], temperature=T, stop_strings=STOP_STRINGS,
                       max_prompt_tokens=cfg.data.max_prompt_tokens)
        tokens = policy.TokenBatch(comps.prompt_ids, comps.prompt_mask, comps.completion_ids, comps.completion_mask)
        _, ent = policy.score(model, tokens, T, cfg.train.microbatch_size, with_entropy=True)
        lengths = comps.completion_mask.sum(-1).tolist()
        for (r, j), text, n, e in zip(chunk, comps.texts, lengths, ent.sum(-1).tolist()):
            rb = reward_fn(text, r.gold)
            out.append({"id": r.id, "sample": j, "text": text, "length": int(n), "entropy_sum": float(e),
                        "format_ok": rb.format_ok, "answer_ok": rb.answer_ok, "reward": rb.reward, "breakdown": rb.to_dict()})
        if bar is not None:
            bar.update(len(chunk))
    return out


def write_step(folder: Path, records: list, samples: list[dict], meta: dict) -> None:
    """The step's three files, written aside and renamed into place (a step folder is complete)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_q: dict[str, list[dict]] = {}
    for s in samples:
        by_q.setdefault(s["id"], []).append(s)
    rows = [question_row(r.id, sorted(by_q[r.id], key=lambda s: s["sample"])) for r in records]
    with open(tmp / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: row[k] for k in COLUMNS} for row in rows)
    with gzip.open(tmp / "records.jsonl.gz", "wt") as f:
        for s in sorted(samples, key=lambda s: (s["id"], s["sample"])):
            f.write(json.dumps({k: v for k, v in s.items() if k not in ("format_ok", "answer_ok", "reward")}) + "\n")
    (tmp / "run_meta.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(folder)


def consolidate(out: Path) -> Path:
    """consolidated_metrics.csv: one row per evaluated step, means over questions and SEs."""
    rows = []
    for folder in sorted(out.glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")) if p.name[5:].isdigit() else -1):
        if not folder.name.removeprefix("step_").isdigit() or not (folder / "run_meta.json").is_file():
            continue
        with open(folder / "metrics.csv") as f:
            qs = list(csv.DictReader(f))
        row = {"step": int(folder.name.removeprefix("step_")), "questions": len(qs), "samples": sum(int(q["n"]) for q in qs)}
        for m in METRICS:
            row[m], row[f"{m}_se"] = mean_se([float(q[m]) for q in qs])
        rows.append(row)
    path = out / "consolidated_metrics.csv"
    fields = ["step", "questions", "samples", *(c for m in METRICS for c in (m, f"{m}_se"))]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------- main


def run(args, world: dist.DistInfo) -> Path:
    run_dir = args.run_dir
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = load_config(run_dir / "config.yaml")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    steps = select_steps(run_dir / "checkpoints", args.steps)
    settings = {"split": args.split, "data": args.data, "subset_frac": args.subset_frac, "num_samples": args.num_samples,
                "temperature": args.temperature if args.temperature is not None else cfg.rollout.temperature,
                "max_new_tokens": args.max_new_tokens or cfg.rollout.max_new_tokens}
    out = args.output_dir or run_dir / "eval" / args.split
    todo = []
    for step in steps:
        meta = out / f"step_{step}" / "run_meta.json"
        if not meta.is_file():
            todo.append(step)
            continue
        done = json.loads(meta.read_text())
        if any(done.get(k) != settings[k] for k in SETTINGS):
            raise ConfigError(f"{meta.parent} was evaluated with other settings "
                              f"({ {k: done.get(k) for k in SETTINGS} }); pass --output-dir")
    if not todo:
        return consolidate(out) if world.is_main else out
    records = load_questions(cfg, args.split, args.data, args.subset_frac)
    tokenizer, model = load_policy(cfg)
    model.to(world.device).eval()
    prompt_fn = lambda q: build_prompt(q, tokenizer, cfg.data.use_chat_template)  # noqa: E731
    check_prompt_lengths(records, prompt_fn, tokenizer, cfg.data.max_prompt_tokens)
    mine = records[world.rank :: world.world_size]
    bar = None
    if world.is_main and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * len(mine) * args.num_samples, desc="rl-eval", unit="seq", dynamic_ncols=True)
    batch_size = args.batch_size or cfg.rollout.generation_batch_size
    for step in todo:
        t0 = time.perf_counter()
        ckpt = checkpoint.resolve(run_dir / "checkpoints", step)
        checkpoint.load_adapter(ckpt, model)
        with torch.no_grad():
            samples = evaluate(model, tokenizer, cfg, mine, settings, batch_size, bar)
        gathered = [s for part in world.all_gather_object(samples) for s in part]
        if world.is_main:
            meta = {"step": step, "checkpoint": str(ckpt), **settings, "questions": len(records),
                    "world_size": world.world_size, "seconds": time.perf_counter() - t0}
            write_step(out / f"step_{step}", records, gathered, meta)
        world.barrier()
    if bar is not None:
        bar.close()
    return consolidate(out) if world.is_main else out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        world = dist.init("auto")
        path = run(args, world)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    if world.is_main and not args.quiet:
        print(f"consolidated metrics: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
