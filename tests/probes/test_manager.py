"""The probe manager: one collective for all sum-stats, failure isolation, registry."""

import math
from dataclasses import dataclass, field

import pytest
import torch

from probes.base import SetupContext
from probes.manager import ProbeManager, registered_kinds, resolve_kind
from rl_training.config import ProbeSpec, ProbesConfig
from rl_training.errors import ConfigError
from tests.helpers.toy_probes import BrokenProbe, SumProbe


@dataclass
class CountingWorld:
    """A stand-in for DistInfo at world_size 2 whose collectives count calls and double sums."""

    world_size: int = 2
    rank: int = 0
    calls: dict = field(default_factory=lambda: {"sum": 0, "max": 0, "min": 0, "gather": 0})

    def all_reduce_sum(self, t):
        self.calls["sum"] += 1
        return t.mul_(2)  # as if the other rank held the same values

    def all_reduce_max(self, t):
        self.calls["max"] += 1
        return t

    def all_reduce_min(self, t):
        self.calls["min"] += 1
        return t

    def all_gather_object(self, obj):
        self.calls["gather"] += 1
        return [obj, obj]


def _manager(*probes, strict=False):
    m = ProbeManager(list(probes), strict=strict)
    m.setup(SetupContext(None, None, None, None, {}))
    return m


def test_one_all_reduce_for_every_sum_stat_of_every_probe():
    m = _manager(SumProbe("p1"), SumProbe("p2"), SumProbe("p3", every_n_steps=2))
    world = CountingWorld()
    m.begin_step(2)
    m.on_before_optimizer_step(None)
    out = m.reduce(world)
    assert world.calls == {"sum": 1, "max": 1, "min": 0, "gather": 0}
    for name in ("p1", "p2", "p3"):
        assert out[f"probe/{name}/a"] == 3.0 and out[f"probe/{name}/ratio"] == 0.75 and out[f"probe/{name}/peak"] == 7.0
        assert out[f"probe/{name}/time_s"] >= 0
    m.begin_step(3)  # p3 is not due at odd steps
    m.on_before_optimizer_step(None)
    assert "probe/p3/a" not in m.reduce(CountingWorld())


def test_a_failing_probe_is_logged_once_disabled_and_training_goes_on(caplog):
    m = _manager(BrokenProbe("bad"), SumProbe("good"))
    for step in (1, 2):
        m.begin_step(step)
        m.on_before_optimizer_step(None)
        out = m.reduce(CountingWorld())
        assert "probe/good/a" in out and not any(k.startswith("probe/bad/") for k in out)
    assert caplog.text.count("probe bad failed") == 1 and "RuntimeError: boom" in caplog.text
    assert m.disabled == {"bad"}


def test_strict_reraises():
    m = _manager(BrokenProbe("bad"), strict=True)
    m.begin_step(1)
    with pytest.raises(RuntimeError, match="boom"):
        m.on_before_optimizer_step(None)


def test_failure_on_one_rank_disables_probe_on_all_ranks():
    # The failure flag travels in the same sum buffer: a rank where the probe ran fine still
    # sees the other rank's flag and drops the probe, so the buffer layouts stay equal.
    m = _manager(SumProbe("p"))
    m.begin_step(1)
    m.on_before_optimizer_step(None)

    class OtherRankFailed(CountingWorld):
        def all_reduce_sum(self, t):
            t[-1] += 1.0
            return super().all_reduce_sum(t)

    out = m.reduce(OtherRankFailed())
    assert not any(k.startswith("probe/p/") for k in out) and m.disabled == {"p"}


def test_registry_and_dotted_path_kinds():
    assert "ess" in registered_kinds()
    assert resolve_kind("tests.helpers.toy_probes.SumProbe") is SumProbe
    with pytest.raises(ConfigError, match="unknown probe kind 'nope'"):
        resolve_kind("nope")
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_kind("no.such.Module")
    m = ProbeManager.from_config(ProbesConfig(probes=[ProbeSpec("mine", "tests.helpers.toy_probes.SumProbe", 3, {})]))
    assert m.probes[0].name == "mine" and m.probes[0].every_n_steps == 3


def test_world_size_one_communicates_nothing():
    from rl_training.dist import DistInfo

    m = _manager(SumProbe("p"))
    m.begin_step(1)
    m.on_before_optimizer_step(None)
    out = m.reduce(DistInfo())  # would raise without an initialised process group if it communicated
    assert out["probe/p/a"] == 1.5 and math.isfinite(out["probe/p/ratio"])
    assert torch.distributed.is_initialized() is False
