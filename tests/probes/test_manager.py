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
    device: torch.device = torch.device("cpu")
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


class ThreadWorld:
    """Rank ``rank`` of a world of threads: each collective waits for every rank, checks that all
    called the same operation with the same tensor shape (what gloo/nccl need to not hang or
    mix up buffers), then hands each rank the reduced result."""

    device = torch.device("cpu")

    def __init__(self, shared: dict, rank: int, world_size: int):
        self.shared, self.rank, self.world_size = shared, rank, world_size

    def _meet(self, op, payload):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = (op, payload)
        barrier.wait()
        seen = list(slots)
        barrier.wait()  # nobody overwrites a slot before every rank has read them all
        ops = {o for o, _ in seen}
        assert len(ops) == 1, f"ranks called different collectives: {ops}"
        if isinstance(payload, torch.Tensor):
            shapes = {tuple(p.shape) for _, p in seen}
            assert len(shapes) == 1, f"{op}: ranks sent different layouts {shapes}"
        return [p for _, p in seen]

    def _reduce(self, op, t, fn):
        parts = self._meet(op, t.clone())
        return t.copy_(fn(torch.stack(parts)))

    def all_reduce_sum(self, t):
        return self._reduce("sum", t, lambda s: s.sum(0))

    def all_reduce_max(self, t):
        return self._reduce("max", t, lambda s: s.amax(0))

    def all_reduce_min(self, t):
        return self._reduce("min", t, lambda s: s.amin(0))

    def all_gather_object(self, obj):
        return self._meet("gather_object", obj)


def run_ranks(make_probes, steps, world_size=2):
    """Each rank in a thread: setup, then per step begin, hook, reduce. -> per rank (outputs, manager)."""
    import threading
    from types import SimpleNamespace

    shared = {"slots": [None] * world_size, "barrier": threading.Barrier(world_size, timeout=20)}
    results, errors = [None] * world_size, []

    def rank_main(rank):
        try:
            world = ThreadWorld(shared, rank, world_size)
            m = ProbeManager(make_probes(), strict=False)
            m.setup(SetupContext(None, world, None, None, {}))
            outs = []
            for step in steps:
                m.begin_step(step)
                ctx = SimpleNamespace(step=step, epoch=0, world=world, microbatch_index=0, num_microbatches=1)
                m.on_after_backward(ctx)
                m.on_before_optimizer_step(ctx)
                m.on_after_optimizer_step(ctx)
                outs.append(m.reduce(world))
            results[rank] = (outs, m)
        except Exception as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("every", [1, 2])
def test_compute_failing_on_one_rank_disables_the_probe_on_every_rank_at_the_next_reduce(every):
    from tests.helpers.toy_probes import ComputeFailsOnRank

    steps = [1, 2, 3, 4]
    first_due = every  # steps 1.. at every=1; 2, 4 at every=2
    (outs0, m0), (outs1, m1) = run_ranks(lambda: [ComputeFailsOnRank("flaky", every), SumProbe("good")], steps)
    # Rank 0 computed fine at the first due step; rank 1 raised. From the next reduce on (a
    # step where the probe is not due too) both have dropped it, and nothing hung.
    assert outs0[first_due - 1]["probe/flaky/x"] == 2.0
    for outs in (outs0, outs1):
        for step, out in zip(steps, outs):
            assert out["probe/good/a"] == 3.0, step
            if step > first_due:
                assert not any(k.startswith("probe/flaky/") for k in out), step
    assert m0.disabled == m1.disabled == {"flaky"}
    flaky0, flaky1 = m0.probes[0], m1.probes[0]
    assert flaky0.hook_steps == ([1, 2] if every == 1 else [2])
    assert flaky1.hook_steps == [first_due], "a rank where the probe failed does not run it again"


def test_packing_failure_on_one_rank_zero_fills_its_slot_and_disables_it_everywhere(caplog):
    from tests.helpers.toy_probes import BadShapeOnRank

    (outs0, m0), (outs1, m1) = run_ranks(lambda: [SumProbe("good"), BadShapeOnRank("bad")], [1, 2])
    for outs in (outs0, outs1):
        for out in outs:
            assert out["probe/good/a"] == 3.0 and out["probe/good/peak"] == 7.0
            assert not any(k.startswith("probe/bad/") for k in out)
    assert m0.disabled == m1.disabled == {"bad"}
    assert "probe bad failed" in caplog.text


def test_exchange_stats_are_summed_over_the_ranks_before_the_update():
    from tests.helpers.toy_probes import ExchangeProbe

    (outs0, _), (outs1, _) = run_ranks(lambda: [ExchangeProbe("x", 2), SumProbe("good")], [1, 2])
    for outs in (outs0, outs1):
        assert "probe/x/seen" not in outs[0]  # not due: no exchange (ThreadWorld checks both ranks agree)
        assert outs[1]["probe/x/seen"] == 2 * 9.0  # each rank saw (1 + 2)·3 after the update


def test_exchange_rounds_follow_each_other_and_a_failure_in_between_disables_everywhere():
    """Round 1's values are set from round 0's sums (on_exchanged), then summed in turn; a probe
    that raises between the rounds on one rank still sends (zeros), so nothing hangs."""
    from tests.helpers.toy_probes import TwoRoundProbe

    (outs0, _), (outs1, _) = run_ranks(lambda: [TwoRoundProbe("r"), SumProbe("good")], [1, 2])
    for outs in (outs0, outs1):
        assert [(o["probe/r/seen"], o["probe/r/rounds"]) for o in outs] == [(2 * 9.0, 2.0)] * 2  # each rank saw 9
    (outs0, m0), (outs1, m1) = run_ranks(lambda: [TwoRoundProbe("r", 1, {"fail_rank": 0}), SumProbe("good")], [1, 2])
    for outs in (outs0, outs1):
        assert all(o["probe/good/a"] == 3.0 and "probe/r/seen" not in o for o in outs)
    assert m0.disabled == m1.disabled == {"r"}


def test_exchange_takes_one_collective_after_the_last_backward_of_ppo_epoch_0_at_due_steps():
    from types import SimpleNamespace

    from tests.helpers.toy_probes import ExchangeProbe

    m = ProbeManager([ExchangeProbe("x", 2), SumProbe("good")])
    world = CountingWorld()
    m.setup(SetupContext(None, world, None, None, {}))
    for step, exchanges in ((1, 0), (2, 1)):
        world.calls["sum"] = 0
        m.begin_step(step)
        for epoch in (0, 1):
            for i in range(3):
                m.on_after_backward(SimpleNamespace(step=step, epoch=epoch, world=world, microbatch_index=i,
                                                    num_microbatches=3))
                assert world.calls["sum"] == (exchanges if (epoch, i) >= (0, 2) else 0), (step, epoch, i)
        m.reduce(world)


def test_exchange_stats_are_summed_where_the_rank_computes():
    # The Fisher probe's F has one entry per trainable parameter: on a GPU it must not cross to
    # the host and back. "meta" stands for the rank's device: any host copy would fail here.
    from types import SimpleNamespace

    from tests.helpers.toy_probes import ExchangeProbe

    m = ProbeManager([ExchangeProbe("x", 1)])
    world = CountingWorld(device=torch.device("meta"))
    sent = []
    world.all_reduce_sum = lambda t: sent.append(t.device) or t
    m.setup(SetupContext(None, world, None, None, {}))
    m.begin_step(1)
    m.on_after_backward(SimpleNamespace(step=1, epoch=0, world=world, microbatch_index=0, num_microbatches=1))
    assert sent == [torch.device("meta")] and m.probes[0].stats["v"].device == torch.device("meta")


def test_a_probe_failing_before_its_exchange_on_one_rank_is_disabled_everywhere_without_a_hang():
    from tests.helpers.toy_probes import ExchangeProbe

    (outs0, m0), (outs1, m1) = run_ranks(lambda: [ExchangeProbe("x", 1, {"fail_rank": 1}), SumProbe("good")], [1, 2])
    for outs in (outs0, outs1):
        assert all(out["probe/good/a"] == 3.0 and "probe/x/seen" not in out for out in outs)
    assert m0.disabled == m1.disabled == {"x"}


def test_param_snapshot_is_a_copy_and_its_time_is_shared_by_the_probes_that_asked(monkeypatch):
    from types import SimpleNamespace

    import probes.manager as manager_module
    from tests.helpers.toy_probes import SnapshotProbe

    class Other(SumProbe):  # needs no snapshot; its hooks do not run here
        def compute(self):
            return {}

    m = _manager(SnapshotProbe("s1"), SnapshotProbe("s2"), Other("other"))
    m.begin_step(1)
    w = torch.ones(2)
    with monkeypatch.context() as mp:
        clock = iter([10.0, 14.0])
        mp.setattr(manager_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
        snap = m.param_snapshot({"w": w})
    assert torch.equal(snap["w"], w) and snap["w"].data_ptr() != w.data_ptr()
    out = m.reduce(CountingWorld())
    assert out["probe/s1/time_s"] == out["probe/s2/time_s"] == 2.0 and out["probe/other/time_s"] == 0.0
    m2 = _manager(Other("other"))
    m2.begin_step(1)
    assert m2.param_snapshot({"w": w}) is None
