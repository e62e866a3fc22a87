"""Train with Dr-GRPO: ``rl-train --cfg cfg/tiny_test.yaml [key=value ...]``.

Also ``python runners/rl_runner.py ...`` and ``torchrun --nproc_per_node=2 runners/rl_runner.py ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl_training.config import load_config  # noqa: E402
from rl_training.session import fit, start_or_restart  # noqa: E402
from runners.common import init_world, run_main  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", required=True, help="YAML config (see cfg/)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg = load_config(args.cfg, args.overrides)
        world = init_world(cfg.train.backend)
        session, last = start_or_restart(cfg, world)
        return world, session, fit(session, last)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
