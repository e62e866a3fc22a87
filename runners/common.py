"""The frame every training runner shares: logging, one-line user errors, teardown, report."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from rl_training import dist
from rl_training.errors import UserError
from rl_training.summary_text import format_summary


def run_main(body: Callable[[], tuple]) -> int:
    """``body()`` -> (world, session, summary). A UserError is one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        world, session, summary = body()
        session.trainer.close()  # before the process group goes (finally)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    if world.is_main:
        print(format_summary(summary, session.run_dir))
    return 0


def init_world(backend: str = "auto") -> dist.DistInfo:
    world = dist.init(backend)
    if not world.is_main:  # one rank speaks
        logging.getLogger().setLevel(logging.WARNING)
    return world
