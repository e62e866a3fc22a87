"""Resume a run from a checkpoint: ``rl-resume --run-dir runs/run_X --from-step latest --additional-steps 50``.

Continues the same run directory (logs appended, TensorBoard steps continue; anything a
crashed run logged after the checkpoint is dropped), or writes a new one with --new-run-dir.
Works under torchrun like rl-train.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl_training.session import fit, resume_session  # noqa: E402
from runners.common import init_world, run_main  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--from-step", default="latest", help="'latest' or a step number")
    ap.add_argument("--additional-steps", type=int, default=None, help="default: up to train.total_steps")
    ap.add_argument("--new-run-dir", action="store_true", help="write to a new run directory")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run's config")
    args = ap.parse_args(argv)
    if args.from_step != "latest" and not args.from_step.isdigit():
        ap.error(f"--from-step must be 'latest' or a step number, got {args.from_step!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        world = init_world()
        which = args.from_step if args.from_step == "latest" else int(args.from_step)
        session, last = resume_session(
            args.run_dir, world, which=which, additional_steps=args.additional_steps,
            new_run_dir=args.new_run_dir, overrides=args.overrides,
        )
        return world, session, fit(session, last)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
