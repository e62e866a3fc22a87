"""Statistics declared with their reduction, packed into fixed-size slots for the collectives.

A ``StatSet`` is what a probe (and the trainer's own metrics) accumulates into during a step.
Its declaration fixes the size of every slot, so what a rank sends depends only on the
declaration, never on what happened on that rank: the packing of every participant is
concatenated into one buffer per reduction (probes/manager.py) and reduced at once.

``exchange`` is a sum taken earlier: right after the last microbatch's ``on_after_backward``
of the step's first PPO epoch, for a quantity a probe needs summed over every rank before the
update (the Fisher probe's E-side vector F, so that each rank's training sequences meet the
whole F exactly). Exchange-stats are declared in rounds (``round``, 0 first): the manager sums
round r, calls ``on_exchanged(ctx, r)``, which may set round r + 1's values from the sums (the
Fisher probe's baseline totals, then its F built with them). They are packed where the rank
computes (``DistInfo.device``): F has as many entries as the trainable parameters (74 M at the
user's shape), and a GPU's F stays there, not crossing to the host and back. Every other
reduction happens once, after the step, on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rl_training import dist

REDUCTIONS = ("sum", "max", "min", "cat", "exchange")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Stat:
    default: float | torch.Tensor
    reduce: str
    round: int = 0  # exchange-stats: the round they are summed in

    @property
    def size(self) -> int:
        return self.default.numel() if isinstance(self.default, torch.Tensor) else 1


class StatSet:
    """``values[name]``: a float, a fixed-shape tensor (sum/max/min elementwise), or for ``cat``
    a list of tensors (concatenated over ranks in rank order)."""

    def __init__(self, declared: tuple[tuple[str, str], ...] = ()):
        self.declared: dict[str, Stat] = {}
        self.values: dict[str, Any] = {}
        for name, reduce in declared:
            self.add(name, 0.0, reduce)

    def add(self, name: str, default: float | torch.Tensor = 0.0, reduce: str = "sum", round: int = 0) -> None:
        assert reduce in REDUCTIONS, f"reduce must be one of {REDUCTIONS}"
        assert name not in self.declared, f"stat {name} declared twice"
        assert round == 0 or reduce == "exchange", "only exchange-stats have rounds"
        self.declared[name] = Stat(default, reduce, round)

    def reset(self) -> None:
        """Fresh values from the defaults (in place: holders of ``values`` see the reset)."""
        self.values.clear()
        for n, s in self.declared.items():
            self.values[n] = [] if s.reduce == "cat" else (
                s.default.clone() if isinstance(s.default, torch.Tensor) else s.default)

    def names(self, reduce: str, round: int | None = None) -> list[str]:
        """The stats of one reduction (of one exchange ``round``, if given), in declaration order."""
        return [n for n, s in self.declared.items() if s.reduce == reduce and round in (None, s.round)]

    def rounds(self) -> int:
        """How many exchange rounds the declaration asks for (0: none)."""
        return max((self.declared[n].round + 1 for n in self.names("exchange")), default=0)

    def size(self, reduce: str, round: int | None = None) -> int:
        return sum(self.declared[n].size for n in self.names(reduce, round))

    def pack(self, reduce: str, device: torch.device = CPU, round: int | None = None) -> torch.Tensor:
        """The values of one reduction (exchange: of one round) as a float64 vector of the declared
        size on ``device``; raises if a value does not fit its declaration."""
        parts = []
        for n in self.names(reduce, round):
            flat = dist.to_device(torch.as_tensor(self.values[n], dtype=torch.float64).detach(), device).reshape(-1)
            if flat.numel() != self.declared[n].size:
                raise ValueError(f"stat {n!r} has {flat.numel()} values, declared {self.declared[n].size}")
            parts.append(flat)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)

    def unpack(self, reduce: str, flat: torch.Tensor, round: int | None = None) -> None:
        """Write reduced values back: floats stay floats, tensors take their declared shape (float64,
        on ``flat``'s device)."""
        offset = 0
        for n in self.names(reduce, round):
            default = self.declared[n].default
            chunk = flat[offset : offset + self.declared[n].size]
            self.values[n] = chunk.reshape(default.shape).clone() if isinstance(default, torch.Tensor) else float(chunk.item())
            offset += self.declared[n].size

    def pack_cats(self) -> dict[str, list[torch.Tensor]]:
        return {n: [torch.as_tensor(t).detach().cpu() for t in self.values[n]] for n in self.names("cat")}

    def zeros(self, reduce: str, device: torch.device = CPU, round: int | None = None) -> torch.Tensor:
        return torch.zeros(self.size(reduce, round), dtype=torch.float64, device=device)
