"""Counting the device kernels a piece of code launches: the device-independent part of a GPU
cost that a CPU's timing cannot show (small reductions cost their launches, not arithmetic)."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "expand", "unsqueeze", "squeeze", "detach",
         "alias", "as_strided", "t", "select", "slice", "split", "split_with_sizes", "unbind", "lift_fresh"}


class KernelCount(TorchDispatchMode):
    """Counts non-view aten ops under the label in ``where`` (None: not counted)."""

    def __init__(self, label: str | None = "step"):
        super().__init__()
        self.where: list[str | None] = [label]
        self.counts: collections.Counter = collections.Counter()
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        label, name = self.where[-1], func.overloadpacket.__name__
        if label is not None and name not in VIEWS:
            self.counts[label] += 1
            self.ops[label][name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count(fn) -> KernelCount:
    """The kernels of one call of fn()."""
    counter = KernelCount()
    with counter:
        fn()
    return counter
