"""Every registered probe kind: runs all hooks on a real tiny step, logs finite values and its
time, and round-trips its state_dict. (World size 2 vs 1 equality of every probe's reduced
stats: tests/integration/test_torchrun.py::test_two_ranks_equal_one_process, which runs
cfg/tiny_test.yaml with every kind enabled.)"""

import math

import pytest
import torch
import yaml

from probes.manager import registered_kinds, resolve_kind
from rl_training.config import ProbeSpec, load_config
from rl_training.dist import DistInfo
from rl_training.session import build_session
from tests.helpers.runs import TINY


@pytest.mark.parametrize("kind", sorted(registered_kinds()))
def test_probe_kind_conforms(kind):
    cfg = load_config(TINY)
    cfg.probes.strict = True
    cfg.probes.probes = [ProbeSpec(name=f"my_{kind}", kind=kind, every_n_steps=1, options={})]
    trainer = build_session(cfg, DistInfo()).trainer
    metrics = trainer.train_step().metrics
    mine = {k: v for k, v in metrics.items() if k.startswith(f"probe/my_{kind}/")}
    assert f"probe/my_{kind}/time_s" in mine and len(mine) >= 2, mine
    assert all(math.isfinite(v) for v in mine.values()), mine
    probe = trainer.probes.probes[0]
    fresh = resolve_kind(kind)(f"my_{kind}", 1, {})
    fresh.load_state_dict(probe.state_dict())
    assert _equal(fresh.state_dict(), probe.state_dict())


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_shipped_configs_enable_every_registered_kind():
    for name in ("tiny_test.yaml", "smollm2_cpu_demo.yaml"):
        raw = yaml.safe_load((TINY.parent / name).read_text())
        kinds = {p["kind"] for p in raw["probes"]["probes"]}
        assert kinds == set(registered_kinds()), name
