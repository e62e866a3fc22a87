"""A rollout call with HF's stop-string matcher built at every call (what ``generate(stop_strings=)``
does) against built once per tokenizer (``sampling.stop_string_criteria``), alternated, medians.

Two models, both with SmolLM2's tokenizer (vocab 49,152) and the run's stop strings, through the
rollout engine:

- ``demo``: the demo's model and setting (SmolLM2-135M + LoRA, its arithmetic prompts, 16 rows ×
  64 new tokens), where on these cores the decode itself takes seconds;
- ``fast``: a random-init model of the ``tiny`` shape at the GPU setting's 128 rows, 64 new
  tokens: a call whose decode is cheap, as on a GPU (issue 12 wants 128 × 200 tokens in under
  2 s), so that the host's work per call shows.

"per call" empties the matcher cache before each call, so the call builds it again, as HF's
generate did. A call's time varies on these cores by more than the build, so the figure is the
median of paired differences (each round's two calls adjacent, their order alternating) over the
median call. Also times the matcher's construction alone. Writes JSON.

    python bench/stop_matcher.py --out bench/results/stop_matcher.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers.generation.stopping_criteria import StopStringCriteria  # noqa: E402

from rl_training import dist, sampling  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.data.prompts import STOP_STRINGS  # noqa: E402
from rl_training.models import save_random_model, save_smollm2_tokenizer  # noqa: E402
from rl_training.session import build_session  # noqa: E402
from gpu_step import scratch_dir  # noqa: E402

DEMO = "cfg/smollm2_cpu_demo.yaml"


def trainer_of(setting: str, work: Path, rows: int = 128):
    overrides = ["probes.probes=[]"]
    if setting == "fast":
        model = save_random_model(save_smollm2_tokenizer(work / "tokenizer"), work / "model", "tiny", torch.float32)
        overrides += [f"model.name_or_path={model}", f"rollout.generation_batch_size={rows}"]
    return build_session(load_config(DEMO, overrides), dist.DistInfo()).trainer


def measure(trainer, reps: int) -> dict:
    cfg = trainer.cfg
    rows = cfg.rollout.generation_batch_size
    records = trainer.scheduler.records
    prompts = [trainer.prompt_fn(records[i % len(records)].question) for i in range(rows)]
    settings = dict(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                    stop_strings=STOP_STRINGS, max_prompt_tokens=cfg.data.max_prompt_tokens)

    def call(rebuild: bool) -> float:
        if rebuild:
            sampling._STOP_CRITERIA.clear()
        t0 = time.perf_counter()
        trainer.engine.generate(prompts, list(range(rows)), **settings)
        return time.perf_counter() - t0

    seconds: dict[str, list[float]] = {"per_call": [], "once": []}
    for rep in range(reps + 1):  # the first round warms up, untimed
        for name in ("per_call", "once") if rep % 2 else ("once", "per_call"):
            t = call(rebuild=name == "per_call")
            if rep:
                seconds[name].append(t)
    once = statistics.median(seconds["once"])
    extra = statistics.median(a - b for a, b in zip(seconds["per_call"], seconds["once"]))
    model = "random-init, tiny shape" if "stop_matcher_" in cfg.model.name_or_path else cfg.model.name_or_path
    return {"model": model, "rows": rows, "new_tokens": cfg.rollout.max_new_tokens,
            "seconds": seconds, "once_s_median": once, "per_call_extra_s_median": extra,
            "per_call_over_once": 1 + extra / once}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed pairs of calls, after one warm-up pair")
    ap.add_argument("--settings", default="fast,demo", help="comma-separated: fast, demo")
    ap.add_argument("--rows", type=int, default=128, help="rows of the fast setting's call")
    ap.add_argument("--out", type=Path, default=Path("bench/results/stop_matcher.json"))
    args = ap.parse_args()
    work = scratch_dir("stop_matcher_")
    result = {"stop_strings": list(STOP_STRINGS), "settings": {}}
    for setting in args.settings.split(","):
        trainer = trainer_of(setting, work, args.rows)
        result["settings"][setting] = measure(trainer, args.reps)
        build = []
        for _ in range(3):
            t0 = time.perf_counter()
            StopStringCriteria(trainer.tokenizer, list(STOP_STRINGS))
            build.append(time.perf_counter() - t0)
        result["vocab"], result["build_s_median"] = len(trainer.tokenizer), statistics.median(build)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"building HF's stop matcher (vocab {result['vocab']:,}): {result['build_s_median']:.3f} s")
    for setting, r in result["settings"].items():
        print(f"{setting}: rollout call of {r['rows']} rows × {r['new_tokens']} new tokens ({r['model']}), matcher "
              f"built every call / once: {r['per_call_over_once']:.3f} (+{r['per_call_extra_s_median']:.2f} s "
              f"paired, on {r['once_s_median']:.2f} s)")


if __name__ == "__main__":
    main()
