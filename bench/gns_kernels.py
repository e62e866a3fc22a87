"""Device kernels the GNS probe launches per step, against the training step's own, side by side.

On a GPU the probe's small reductions cost their launches, not their arithmetic, so the count of
kernels is the device-independent part of its cost (a CPU's timing cannot show it). Two trainers
on the same config, one without probes and one with ``gns``, each run one step after a warm-up
step, under a dispatch mode that counts every aten op that is not a view, outside the rollout
(generation, rewards, old log-probs): forward, backward, optimizer, probes, reduce. Both draw the
same rollouts (the probe only reads), so the difference is the probe's; it is also counted
inside the probe's hooks, by hook. Writes JSON.

    python bench/gns_kernels.py --out bench/results/gns_kernels.json
    python bench/gns_kernels.py --cfg cfg/tiny_test.yaml --set --out /tmp/gns_kernels.json

``--shape qwen2.5-1.5b``: a random-init model of the user's shape on the Qwen config (LoRA r64 on
seven projections; ``bench/gpu_step.py``'s settings), no hub; give ``--set`` a short rollout on
a CPU (``bench/run_all.py`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probes.capture import LinearCapture  # noqa: E402
from probes.gns import GnsProbe  # noqa: E402
from rl_training import dist, rollout  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.session import build_session  # noqa: E402
from gpu_step import SETTINGS, scratch_dir, shape_config  # noqa: E402
from kernel_count import KernelCount  # noqa: E402

COMMON = ["rollout.filter_groups=false", "logging.progress_bar=false", "train.total_steps=1000"]
COUNTER: KernelCount | None = None


def labelled(fn, label):
    """fn, whose ops go under ``label`` while a count is on."""
    def wrapper(*args, **kwargs):
        if COUNTER is None:
            return fn(*args, **kwargs)
        COUNTER.where.append(label)
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTER.where.pop()
    return wrapper


def count_step(trainer) -> KernelCount:
    global COUNTER
    COUNTER = KernelCount()
    try:
        with COUNTER:
            trainer.train_step()
    finally:
        counter, COUNTER = COUNTER, None
    return counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="cfg/smollm2_cpu_demo.yaml")
    ap.add_argument("--set", nargs="*", default=["rollout.max_new_tokens=32"], help="config overrides (last)")
    ap.add_argument("--shape", choices=sorted(SETTINGS), default=None, help="a random-init model of this shape")
    ap.add_argument("--tokenizer", type=Path, default=None, help="with --shape: tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--out", default="bench/results/gns_kernels.json")
    args = ap.parse_args()
    # the rollout is not counted (its kernels do not depend on the probe)
    rollout.collect = labelled(rollout.collect, None)
    rollout.add_logprobs = labelled(rollout.add_logprobs, None)
    LinearCapture._rows = labelled(LinearCapture._rows, "gns: capture hook (in the backward)")
    for hook in ("on_before_microbatch", "on_after_backward", "on_before_optimizer_step", "compute", "on_reduced"):
        setattr(GnsProbe, hook, labelled(getattr(GnsProbe, hook), f"gns: {hook}"))
    world = dist.DistInfo()
    overrides = COMMON
    if args.shape:
        args.cfg, shape_overrides = shape_config(args.shape, args.tokenizer, scratch_dir("gns_kernels_"))
        overrides = [*shape_overrides, *COMMON]
    overrides = [*overrides, *args.set]
    trainers = {"bare": build_session(load_config(args.cfg, overrides + ["probes.probes=[]"]), world).trainer,
                "gns": build_session(load_config(args.cfg, overrides + ["probes.probes=[{name: gns, kind: gns}]"]),
                                     world).trainer}
    for tr in trainers.values():
        tr.train_step()  # warm-up: lazy initialisations are not the step's
    counts = {name: count_step(tr) for name, tr in trainers.items()}
    probe = next(p for p in trainers["gns"].probes.probes if isinstance(p, GnsProbe))
    bare = sum(counts["bare"].counts.values())
    probed = sum(counts["gns"].counts.values())
    in_hooks = {k: v for k, v in counts["gns"].counts.items() if k.startswith("gns")}
    summary = {
        "cfg": args.cfg, "shape": args.shape, "overrides": overrides, "modules": len(probe.capture.owners),
        "microbatches": trainers["gns"].accum, "kernels_bare_step": bare, "kernels_probed_step": probed,
        "kernels_probe": probed - bare, "kernels_in_probe_hooks": sum(in_hooks.values()),
        "probe_over_bare": (probed - bare) / bare, "by_hook": in_hooks,
        "ops_by_hook": {k: dict(v) for k, v in counts["gns"].ops.items() if k.startswith("gns")},
        "device": str(next(iter(trainers["gns"].trainable.values())).device), "torch": torch.__version__,
    }
    print(f"kernels a step outside the rollout: bare {bare}, with gns {probed}: the probe adds {probed - bare} "
          f"({summary['probe_over_bare']:.3f} of the bare step's; {sum(in_hooks.values())} inside its hooks, "
          f"{len(probe.capture.owners)} captured modules)")
    for k, v in in_hooks.items():
        print(f"  {k}: {v}  {dict(counts['gns'].ops[k])}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
