"""How often does the policy produce groups with reward variance? (Picks the demo's task.)

Samples P prompts × G completions per (task level, max_new_tokens) from the initial policy
and reports pass rate, format rate and the fraction of groups whose rewards are not all
equal — the groups Dr-GRPO can learn from. Writes JSON.

    python bench/reward_variance.py --levels 1,2 --prompts 16 --out bench/results/reward_variance.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl_training.algs.dr_grpo import group_has_signal  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.data.prompts import build_prompt  # noqa: E402
from rl_training.data.records import load_task  # noqa: E402
from rl_training.engine import HFEngine  # noqa: E402
from rl_training.rewards import flexible_reward, strict_reward  # noqa: E402
from rl_training.rollout import generate_groups  # noqa: E402
from rl_training.session import load_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="cfg/smollm2_cpu_demo.yaml")
    ap.add_argument("--levels", default="1,2")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", default="64")
    ap.add_argument("--out", default="bench/results/reward_variance.json")
    args = ap.parse_args()
    cfg = load_config(args.cfg)
    tokenizer, model = load_policy(cfg)
    model.eval()
    results = []
    for level in map(int, args.levels.split(",")):
        records = load_task("arithmetic", path=None, split="train", n=args.prompts, seed=123, level=level)
        for max_new in map(int, args.max_new_tokens.split(",")):
            cfg.rollout.max_new_tokens = max_new
            t0 = time.perf_counter()
            for reward_name, reward_fn in (("flexible", flexible_reward), ("strict", strict_reward)):
                if reward_name == "flexible":
                    groups = generate_groups(
                        HFEngine(model, tokenizer), records, lambda q: build_prompt(q, tokenizer), reward_fn, cfg,
                        seed_parts=("reward-variance", level, max_new),
                    )
                G = cfg.rollout.group_size
                scored = [[reward_fn(t, r.gold).reward for t in g.completions.texts] for g, r in zip(groups, records)]
                import torch

                signal = [bool(group_has_signal(torch.tensor(s), G)) for s in scored]
                row = {
                    "level": level, "max_new_tokens": max_new, "reward": reward_name, "groups": len(groups), "G": G,
                    "pass_rate": sum(map(sum, scored)) / (len(scored) * G),
                    "format_rate": sum(b["format_ok"] for g in groups for b in g.breakdowns) / (len(groups) * G),
                    "groups_with_variance": sum(signal) / len(signal),
                    "seconds": time.perf_counter() - t0,
                }
                results.append(row)
                print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cfg": args.cfg, "results": results}, indent=2))


if __name__ == "__main__":
    main()
