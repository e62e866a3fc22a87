"""Train with Dr-GRPO: ``rl-train --cfg cfg/tiny_test.yaml [key=value ...]``.

Also ``python runners/rl_runner.py ...`` and ``torchrun --nproc_per_node=2 runners/rl_runner.py ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl_training import dist  # noqa: E402
from rl_training.config import load_config  # noqa: E402
from rl_training.errors import UserError  # noqa: E402
from rl_training.session import fit, start_or_restart  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", required=True, help="YAML config (see cfg/)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    world = None
    try:
        cfg = load_config(args.cfg, args.overrides)
        world = dist.init(cfg.train.backend)
        if not world.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        session, last = start_or_restart(cfg, world)
        summary = fit(session, last)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    report(world, session, summary)
    return 0


def report(world, session, summary: dict) -> None:
    if world.is_main:
        print(json.dumps(summary, indent=2))
        print(f"run directory: {session.run_dir}")
        print(f"TensorBoard:   tensorboard --logdir {session.run_dir / 'tensorboard'}")


if __name__ == "__main__":
    sys.exit(main())
