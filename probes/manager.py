"""Runs the due probes at each hook, reduces their stats across ranks, isolates failures.

Reduction: every sum-stat of every due probe (plus one failure flag per probe) is packed into
one flat float64 buffer and all-reduced ONCE per step; max- and min-stats take one more
collective each, cat-stats an all_gather. At world_size 1 nothing is communicated. The set of
packed stats is fixed when the step begins, so ranks always agree on the buffer layout even if
a probe fails on one rank only (it is then disabled on every rank).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
import traceback

import torch

from probes.base import Probe, SetupContext, StepContext
from rl_training.errors import ConfigError, import_dotted

log = logging.getLogger(__name__)

# kind -> Probe subclass; probe modules register themselves here when imported.
PROBE_KINDS: dict[str, type[Probe]] = {}
BUILTIN_PROBE_MODULES = ("probes.ess", "probes.delta_h")


def registered_kinds() -> dict[str, type[Probe]]:
    for module in BUILTIN_PROBE_MODULES:
        importlib.import_module(module)
    return PROBE_KINDS


def register(cls: type[Probe]) -> type[Probe]:
    assert cls.kind and cls.kind not in PROBE_KINDS, f"bad or duplicate probe kind {cls.kind!r}"
    PROBE_KINDS[cls.kind] = cls
    return cls


def resolve_kind(kind: str) -> type[Probe]:
    """A registered kind, or a user's class named by dotted import path (pkg.mod.Class)."""
    kinds = registered_kinds()
    if kind in kinds:
        return kinds[kind]
    if "." in kind:
        cls = import_dotted(kind, "probe kind")
        if not (isinstance(cls, type) and issubclass(cls, Probe)):
            raise ConfigError(f"probe kind '{kind}' is not a Probe subclass")
        return cls
    raise ConfigError(f"unknown probe kind '{kind}' (registered: {', '.join(sorted(PROBE_KINDS)) or 'none'})")


class ProbeManager:
    def __init__(self, probes: list[Probe], strict: bool = False):
        self.probes = probes
        self.strict = strict
        self.disabled: set[str] = set()
        self._due: list[Probe] = []
        self._failed: set[str] = set()
        self._time: dict[str, float] = {}

    @classmethod
    def from_config(cls, probes_cfg) -> ProbeManager:
        probes = [resolve_kind(p.kind)(p.name, p.every_n_steps, p.options) for p in probes_cfg.probes]
        return cls(probes, strict=probes_cfg.strict)

    # -- lifecycle ---------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        for p in self.probes:
            p.setup(dataclasses.replace(ctx, options=p.options))
            p.reset_stats()

    def begin_step(self, step: int) -> None:
        self._due = [p for p in self.probes if p.name not in self.disabled and p.is_due(step)]
        self._failed = set()
        self._time = {p.name: 0.0 for p in self._due}
        for p in self._due:
            p.reset_stats()

    @property
    def wants_param_snapshot(self) -> bool:
        return any(p.needs_param_snapshot for p in self._live())

    def _live(self) -> list[Probe]:
        return [p for p in self._due if p.name not in self._failed]

    def _call(self, hook: str, ctx: StepContext) -> None:
        for p in self._live():
            t0 = time.perf_counter()
            try:
                getattr(p, hook)(ctx)
            except Exception:
                if self.strict:
                    raise
                log.error("probe %s failed in %s; disabled from now on:\n%s", p.name, hook, traceback.format_exc())
                self._failed.add(p.name)
            finally:
                self._time[p.name] += time.perf_counter() - t0

    def on_after_backward(self, ctx: StepContext) -> None:
        self._call("on_after_backward", ctx)

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        self._call("on_before_optimizer_step", ctx)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        self._call("on_after_optimizer_step", ctx)

    # -- reduction ---------------------------------------------------------------------
    def reduce(self, world) -> dict[str, float]:
        """All-reduce the due probes' stats, compute, and return probe/<name>/<key> values."""
        due = self._due
        if not due:
            return {}
        layout = {kind: [(p, n) for p in due for n, s in p._declared.items() if s.reduce == kind] for kind in ("sum", "max", "min")}
        flags = torch.tensor([float(p.name in self._failed) for p in due], dtype=torch.float64)
        sums = torch.cat([_pack(layout["sum"]), flags])
        world.all_reduce_sum(sums)  # the one collective for every sum-stat of every probe
        _unpack(layout["sum"], sums)
        for kind, op in (("max", world.all_reduce_max), ("min", world.all_reduce_min)):
            if layout[kind]:
                _unpack(layout[kind], op(_pack(layout[kind])))
        for p in due:
            for n, s in p._declared.items():
                if s.reduce == "cat":
                    parts = world.all_gather_object([t.detach().cpu() for t in p.stats[n]])
                    p.stats[n] = [t for part in parts for t in part]
        failed_anywhere = {p.name for p, f in zip(due, sums[len(sums) - len(due) :].tolist()) if f > 0}
        out: dict[str, float] = {}
        for p in due:
            if p.name in failed_anywhere:
                self.disabled.add(p.name)
                continue
            try:
                values = p.compute()
            except Exception:
                if self.strict:
                    raise
                log.error("probe %s failed in compute; disabled from now on:\n%s", p.name, traceback.format_exc())
                self.disabled.add(p.name)
                continue
            out.update({f"probe/{p.name}/{k}": float(v) for k, v in values.items()})
            out[f"probe/{p.name}/time_s"] = self._time[p.name]
        self._due = []
        return out

    # -- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"probes": {p.name: p.state_dict() for p in self.probes}, "disabled": sorted(self.disabled)}

    def load_state_dict(self, sd: dict) -> None:
        self.disabled = set(sd.get("disabled", []))
        for p in self.probes:
            if p.name in sd.get("probes", {}):
                p.load_state_dict(sd["probes"][p.name])


def _pack(entries) -> torch.Tensor:
    """Scalar and tensor stats of (probe, name) entries, flattened into one float64 vector."""
    parts = [torch.as_tensor(p.stats[n], dtype=torch.float64).detach().cpu().reshape(-1) for p, n in entries]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _unpack(entries, flat: torch.Tensor) -> None:
    """Write reduced values back: floats stay floats, tensors keep their shape (as float64)."""
    offset = 0
    for p, n in entries:
        old = p.stats[n]
        size = old.numel() if isinstance(old, torch.Tensor) else 1
        chunk = flat[offset : offset + size]
        p.stats[n] = chunk.reshape(old.shape).clone() if isinstance(old, torch.Tensor) else float(chunk.item())
        offset += size
