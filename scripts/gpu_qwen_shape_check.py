"""δH in the user's setting on one GPU: a random-init model of Qwen2.5-1.5B's shape, bf16, lr 1e-6,
the 2×H100 config at one rank, every collective forced on a 1-rank NCCL group.

No hub is needed: the model is built from its config (random weights, the shape and dtype are
what matter for precision and speed) with a tokenizer from a local folder (SmolLM2's, vocab
49,152: `--tokenizer` names a folder holding tokenizer.json etc.). Prints per step δH₁ and ΔH_true
with their SEs, the probe's cost and the step time, and writes them as JSON.

    python scripts/gpu_qwen_shape_check.py --tokenizer .carry/smollm2_tokenizer --out $OUT/qwen_shape.json
    python scripts/gpu_qwen_shape_check.py --tokenizer DIR --tiny        # the CPU path, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rl_training.models import save_random_model  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (CPU check)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="qwen_shape_"))  # 3 GB of model: removed below, also on failure
    try:
        run(args, cuda, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, cuda: bool, work: Path) -> None:
    model_dir = save_random_model(args.tokenizer, work / "model", "tiny" if args.tiny else "qwen2.5-1.5b")
    os.environ["RL_TRAINING_FORCE_COLLECTIVES"] = "1"
    overrides = [
        f"model.name_or_path={model_dir}", "data.task=arithmetic", "data.reward=length_parity", "data.num_records=1000",
        f"train.total_steps={args.steps}", f"train.backend={'nccl' if cuda else 'gloo'}", f"output_dir={work / 'runs'}",
        "run_name=qwen_shape", "checkpoint.save_every=0", "logging.progress_bar=false",
        "probes.probes=[{name: ess, kind: ess}, {name: delta_h, kind: delta_h, options: {batch_size: 16}}]",
    ]
    if args.tiny:
        overrides += ["train.buffer_size=16", "rollout.prompts_per_round=2", "rollout.max_new_tokens=16",
                      "rollout.generation_batch_size=16"]
    from runners.rl_runner import main as rl_train

    assert rl_train(["--cfg", "cfg/qwen2_5_1_5b_gsm8k_2xh100.yaml", *overrides]) == 0
    rows = [json.loads(line) for line in (work / "runs" / "qwen_shape" / "logs" / "train_log.jsonl").read_text().splitlines()]
    keep = ("pred", "pred_se", "true", "true_se", "pred_stop", "ess_frac", "logp_gap_tok", "stop_frac", "time_s",
            "time_gen_s", "time_fwd_s", "time_jvp_s")
    table = [{"step": r["step"], "step_s": r["time/step_s"], **{k: r.get(f"probe/delta_h/{k}") for k in keep}} for r in rows]
    for t in table:
        print(f"step {t['step']}: δH₁ {t['pred']:+.3g} ± {t['pred_se']:.2g}  ΔH {t['true']:+.3g} ± {t['true_se']:.2g}  "
              f"gap/token {t['logp_gap_tok']:.2g}  step {t['step_s']:.1f} s, probe {t['time_s']:.1f} s")
    if args.out:
        args.out.write_text(json.dumps({"cuda": cuda, "tiny": args.tiny, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
