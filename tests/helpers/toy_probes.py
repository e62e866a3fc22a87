"""Probes for manager tests; also an example of a user probe named by dotted path."""

import torch

from probes.base import Probe


class SumProbe(Probe):
    kind = "test_sum"

    def setup(self, ctx):
        self.add_stat("a")
        self.add_stat("b")
        self.add_stat("peak", reduce="max")

    def on_before_optimizer_step(self, ctx):
        self.stats["a"] += 1.5
        self.stats["b"] += 2.0
        self.stats["peak"] = 7.0

    def compute(self):
        return {"a": self.stats["a"], "ratio": self.stats["a"] / self.stats["b"], "peak": self.stats["peak"]}


class BrokenProbe(Probe):
    kind = "test_broken"

    def setup(self, ctx):
        self.add_stat("x")

    def on_before_optimizer_step(self, ctx):
        raise RuntimeError("boom")


class ComputeFailsOnRank(Probe):
    """Raises in ``compute`` on one rank only (option ``rank``, default 1). Counts one per step
    in a sum-stat; option ``trace`` names a file that gets a "<rank> <step>" line each time its
    hook runs, so a multi-process test can see on which ranks and steps it still ran."""

    kind = "test_compute_fails_on_rank"

    def setup(self, ctx):
        self.rank = ctx.world.rank
        self.fail_rank = int(self.options.get("rank", 1))
        self.trace = self.options.get("trace")
        self.hook_steps: list[int] = []
        self.add_stat("x")

    def on_before_optimizer_step(self, ctx):
        if ctx.epoch > 0:
            return
        self.stats["x"] += 1.0
        self.hook_steps.append(ctx.step)
        if self.trace:
            with open(self.trace, "a") as f:
                f.write(f"{self.rank} {ctx.step}\n")

    def compute(self):
        if self.rank == self.fail_rank:
            raise RuntimeError(f"compute fails on rank {self.rank}")
        return {"x": self.stats["x"]}


class BadShapeOnRank(Probe):
    """Declares a 3-vector; on one rank (option ``rank``, default 1) it leaves a 5-vector
    behind, so packing its stats fails there only."""

    kind = "test_bad_shape_on_rank"

    def setup(self, ctx):
        self.rank = ctx.world.rank
        self.fail_rank = int(self.options.get("rank", 1))
        self.add_stat("v", torch.zeros(3))
        self.add_stat("top", reduce="max")

    def on_before_optimizer_step(self, ctx):
        self.stats["v"] = torch.ones(5 if self.rank == self.fail_rank else 3)
        self.stats["top"] = 1.0

    def compute(self):
        return {"v0": float(self.stats["v"][0]), "top": self.stats["top"]}


class SnapshotProbe(Probe):
    """Asks for the parameter snapshot and keeps what it was handed, per PPO epoch."""

    kind = "test_snapshot"
    needs_param_snapshot = True

    def setup(self, ctx):
        self.seen: list[tuple[int, int, dict]] = []  # (step, epoch, params_before)
        self.add_stat("calls")

    def on_after_optimizer_step(self, ctx):
        self.seen.append((ctx.step, ctx.epoch, ctx.params_before))
        self.stats["calls"] += 1.0

    def compute(self):
        return {"calls": self.stats["calls"]}


class ExchangeProbe(Probe):
    """Sends rank + 1 (three times) in an exchange-stat after the last backward and logs the sum
    it saw after the update; option ``fail_rank``: raises in the backward hook on that rank."""

    kind = "test_exchange"

    def setup(self, ctx):
        self.rank = ctx.world.rank
        self.fail_rank = self.options.get("fail_rank")
        self.add_stat("v", torch.zeros(3), reduce="exchange")
        self.add_stat("seen")

    def on_after_backward(self, ctx):
        if self.rank == self.fail_rank:
            raise RuntimeError("boom")
        self.stats["v"] = torch.full((3,), self.rank + 1.0)

    def on_after_optimizer_step(self, ctx):
        self.stats["seen"] += float(self.stats["v"].sum())

    def compute(self):
        return {"seen": self.stats["seen"]}


class TwoRoundProbe(Probe):
    """Round 0 sends rank + 1; ``on_exchanged`` of round 0 sends the round-0 sum times (rank + 1)
    in round 1; logs round 1's sum after the update, summed (2 ranks: 3·1 + 3·2 = 9 each). Option
    ``fail_rank``: raises in ``on_exchanged`` of round 0 on that rank."""

    kind = "test_two_rounds"

    def setup(self, ctx):
        self.rank = ctx.world.rank
        self.fail_rank = self.options.get("fail_rank")
        self.add_stat("v0", reduce="exchange")
        self.add_stat("v1", torch.zeros(2), reduce="exchange", round=1)
        self.add_stat("rounds", reduce="max")
        self.add_stat("seen")

    def on_after_backward(self, ctx):
        self.stats["v0"] = self.rank + 1.0

    def on_exchanged(self, ctx, round):
        if round == 0 and self.rank == self.fail_rank:
            raise RuntimeError("boom")
        if round == 0:
            self.stats["v1"] = torch.full((2,), self.stats["v0"] * (self.rank + 1))
        self.stats["rounds"] = round + 1.0

    def on_after_optimizer_step(self, ctx):
        self.stats["seen"] = float(self.stats["v1"][0])

    def compute(self):
        return {"seen": self.stats["seen"], "rounds": self.stats["rounds"]}
