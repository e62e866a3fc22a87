"""Probes for manager tests; also an example of a user probe named by dotted path."""

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
