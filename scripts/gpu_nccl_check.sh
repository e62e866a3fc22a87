#!/usr/bin/env bash
# The nccl path of a multi-GPU run, on ONE GPU: the trainer runs 2 steps (bf16, tiny-random)
# with every collective forced on a 1-rank process group (RL_TRAINING_FORCE_COLLECTIVES=1):
# DDP's gradient all-reduce, the metrics gather, the probes' reductions, the SIGTERM agreement,
# the RNG gathers of the checkpoints and the rank check. nccl refuses CPU tensors, so a tensor
# collective sent from the wrong device fails here as it would on 2×H100.
# Without a GPU the same run uses a 1-rank gloo group (the CPU fallback; CI runs it).
#
# Usage: scripts/gpu_nccl_check.sh [OUTPUT_DIR] [key=value ...]   (extra overrides go to rl-train)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUTPUT_DIR=${1:-$(mktemp -d)}
shift || true
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  BACKEND=nccl
else
  BACKEND=gloo
  echo "no GPU: checking the forced collectives on a 1-rank gloo group instead of nccl" >&2
fi

RL_TRAINING_FORCE_COLLECTIVES=1 PYTHONPATH=. "$PY" runners/rl_runner.py --cfg cfg/tiny_test.yaml \
  output_dir="$OUTPUT_DIR" run_name=nccl_check train.total_steps=2 train.backend="$BACKEND" \
  model.dtype=bfloat16 checkpoint.save_every=1 "$@"

"$PY" - "$OUTPUT_DIR/nccl_check" "$BACKEND" <<'PYEOF'
import json, math, sys
from pathlib import Path

run, backend = Path(sys.argv[1]), sys.argv[2]
summary = json.loads((run / "summary.json").read_text())
rows = [json.loads(line) for line in (run / "logs" / "train_log.jsonl").read_text().splitlines()]
assert summary["collectives"] == backend, f"collectives ran on {summary['collectives']!r}, not {backend}"
assert summary["steps"] == 2 and summary["world_size"] == 1, summary
assert summary["rank_param_max_abs_diff"] == 0.0, summary
assert [r["step"] for r in rows] == [1, 2], rows
assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in rows), rows
assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_1", "step_2"]
print(f"ok: 2 steps with every collective on a 1-rank {backend} group; run in {run}")
PYEOF
