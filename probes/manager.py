"""Runs the due probes at each hook, reduces their stats across ranks, isolates failures.

Reduction: every sum-stat of every due probe and of the trainer's own metrics (a ``StatSet``
passed to ``reduce``), plus one failure flag for EVERY probe (due or not), is packed into one
flat float64 buffer and all-reduced ONCE per step; max- and min-stats take one more collective
each, cat-stats one all_gather_object. At world_size 1 nothing is communicated. Exchange-stats
(a sum a probe needs before the update) take one all_reduce of their own per round, right after
the last microbatch's ``on_after_backward`` of PPO epoch 0, each round followed by the probes'
``on_exchanged``, and only at steps where a due probe declares one; the number of rounds comes
from the due probes' declarations, the same on every rank.

Failures on one rank only must not make the ranks disagree on what they send, or a collective
hangs or mixes up buffers. So the layout depends only on state every rank shares (the step and
the set of disabled probes), never on what a probe did on this rank:
- each due probe owns a fixed slot per reduction, sized from its declared defaults; a probe
  that failed in a hook, or whose stats do not fit its slot (packing fails), sends zeros there
  and sets its flag;
- a probe whose ``compute()`` fails (after the collective) is skipped on that rank from then on
  and its flag rides in the NEXT step's buffer (flags cover all probes and are sent every step,
  so this needs no extra collective, even when the probe is not due then);
- a probe flagged on any rank is disabled on every rank at that reduce, and logs nothing then.
So a compute failure on one rank costs that probe one more step on the others, whose values of
the failing step are still logged (they were computed from correctly reduced stats).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
import traceback

import torch

from probes.base import Probe, SetupContext, StepContext, is_last_microbatch
from probes.stats import CPU, StatSet
from rl_training.errors import ConfigError, import_dotted

log = logging.getLogger(__name__)

# kind -> Probe subclass; probe modules register themselves here when imported.
PROBE_KINDS: dict[str, type[Probe]] = {}
BUILTIN_PROBE_MODULES = ("probes.ess", "probes.delta_h", "probes.gns", "probes.fisher")


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
        self.disabled: set[str] = set()  # identical on every rank
        self._due: list[Probe] = []
        self._failed: set[str] = set()  # failed on this rank during this step
        self._compute_failed: set[str] = set()  # failed in this rank's last compute(); flagged at the next reduce
        self._time: dict[str, float] = {}
        self._dropped = False  # this step's update was skipped: the due probes report nothing

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
        # A probe whose compute() failed here stays due (the layout is shared) but does not run.
        self._failed = {p.name for p in self._due} & self._compute_failed
        self._time = {p.name: 0.0 for p in self._due}
        self._dropped = False
        for p in self._due:
            p.reset_stats()
            p.step = step

    def ebatch_specs(self) -> set:
        """The E-batch specs the live due probes of this step will ask for."""
        return {p.ebatch_spec for p in self._live() if p.ebatch_spec is not None}

    def set_output_dir(self, path) -> None:
        for p in self.probes:
            p.output_dir = path

    def param_snapshot(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """A copy of ``params`` if a live due probe needs one (else None). Its time is shared
        equally by the probes that asked, so their ``time_s`` add up to the probes' overhead."""
        askers = [p for p in self._live() if p.needs_param_snapshot]
        if not askers:
            return None
        t0 = time.perf_counter()
        snapshot = {n: t.detach().clone() for n, t in params.items()}
        share = (time.perf_counter() - t0) / len(askers)
        for p in askers:
            self._time[p.name] += share
        return snapshot

    def _live(self) -> list[Probe]:
        return [] if self._dropped else [p for p in self._due if p.name not in self._failed]

    def drop_step(self) -> None:
        """The step's update is skipped (float16 overflow; the same on every rank): the due
        probes get no more hooks and report nothing, but still take their part in ``reduce``."""
        for p in self._live():
            try:
                p.on_step_dropped()
            except Exception:
                self._fail(p, "on_step_dropped")
        self._dropped = True

    def _fail(self, p: Probe, where: str) -> None:
        """Called from an ``except`` block: re-raise when strict, else log and skip p this step."""
        if self.strict:
            raise  # the exception the caller is handling
        log.error("probe %s failed in %s; disabled from now on:\n%s", p.name, where, traceback.format_exc())
        self._failed.add(p.name)

    def _call(self, hook: str, ctx: StepContext, *args) -> None:
        for p in self._live():
            t0 = time.perf_counter()
            try:
                getattr(p, hook)(ctx, *args)
            except Exception:
                self._fail(p, hook)
            finally:
                self._time[p.name] += time.perf_counter() - t0

    def on_before_microbatch(self, ctx: StepContext) -> None:
        self._call("on_before_microbatch", ctx)

    def on_after_backward(self, ctx: StepContext) -> None:
        self._call("on_after_backward", ctx)
        if ctx.epoch == 0 and is_last_microbatch(ctx):
            for r in range(max((p.statset.rounds() for p in self._due), default=0)):
                self._exchange(ctx.world, r)
                self._call("on_exchanged", ctx, r)

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        self._call("on_before_optimizer_step", ctx)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        self._call("on_after_optimizer_step", ctx)

    # -- reduction ---------------------------------------------------------------------
    def _exchange(self, world, round: int) -> None:
        """Sum the due probes' exchange-stats of one round over the ranks, in fixed slots as in
        ``reduce``: a probe that failed on some rank sends zeros there and is disabled at the
        reduce, so what the others computed from the sum is never logged."""
        due = [p for p in self._due if p.statset.names("exchange", round)]
        if not due:
            return
        slots = [self._pack_slot(p, "exchange", world.device, round) for p in due]
        flat = world.all_reduce_sum(torch.cat(slots))
        start = 0
        for p, slot in zip(due, slots):
            if p.name not in self._failed:
                p.statset.unpack("exchange", flat[start:start + slot.numel()], round)
            start += slot.numel()

    def reduce(self, world, shared: StatSet | None = None) -> dict[str, float]:
        """All-reduce the due probes' stats, every probe's failure flag and ``shared`` (the
        trainer's own metrics, reduced in place), compute, and return probe/<name>/<key>
        values. Every rank calls it every step."""
        shared = shared if shared is not None else StatSet()
        due = self._due
        # Pack everything before the first collective: a packing failure must reach the flags.
        packed = {kind: [shared.pack(kind)] + [self._pack_slot(p, kind) for p in due] for kind in ("sum", "max", "min")}
        cats = {p.name: self._pack_cats(p) for p in due if p.statset.names("cat")}
        flags = torch.tensor([float(p.name in self._failed | self._compute_failed) for p in self.probes],
                             dtype=torch.float64)
        reduced: dict[str, torch.Tensor] = {}
        if any(slot.numel() for slot in packed["sum"]) or len(flags):
            sums = world.all_reduce_sum(torch.cat([*packed["sum"], flags]))  # the one collective of every sum-stat
            flags = sums[len(sums) - len(flags):]
            reduced["sum"] = sums[: len(sums) - len(flags)]
        failed_anywhere = {p.name for p, f in zip(self.probes, flags.tolist()) if f > 0}
        self.disabled |= failed_anywhere
        self._compute_failed = set()
        for kind, op in (("max", world.all_reduce_max), ("min", world.all_reduce_min)):
            if any(slot.numel() for slot in packed[kind]):
                reduced[kind] = op(torch.cat(packed[kind]))
        gathered = world.all_gather_object(cats) if cats else []
        for kind, flat in reduced.items():
            shared.unpack(kind, flat[: packed[kind][0].numel()])
        out: dict[str, float] = {}
        for i, p in enumerate(due, start=1):
            if p.name in failed_anywhere or self._dropped:
                continue
            for kind, flat in reduced.items():
                start = sum(slot.numel() for slot in packed[kind][:i])
                p.statset.unpack(kind, flat[start : start + packed[kind][i].numel()])
            for n in p.statset.names("cat"):
                p.stats[n] = [t for part in gathered for t in part[p.name][n]]
            try:
                p.on_reduced()
                values = p.compute()
            except Exception:
                if self.strict:
                    raise
                log.error("probe %s failed in compute; disabled from now on:\n%s", p.name, traceback.format_exc())
                self._compute_failed.add(p.name)
                continue
            out.update({f"probe/{p.name}/{k}": float(v) for k, v in values.items()})
            out[f"probe/{p.name}/time_s"] = self._time[p.name]
        self._due = []
        return out

    def _pack_slot(self, p: Probe, kind: str, device: torch.device = CPU, round: int | None = None) -> torch.Tensor:
        """p's stats of one reduction (exchange: of one round) as a float64 vector on ``device`` of
        the size its declaration fixes; zeros (and p marked failed) if it failed earlier or its
        stats do not fit."""
        if p.name not in self._failed:
            try:
                return p.statset.pack(kind, device, round)
            except Exception:
                self._fail(p, f"packing its {kind}-stats")
        return p.statset.zeros(kind, device, round)

    def _pack_cats(self, p: Probe) -> dict[str, list[torch.Tensor]]:
        if p.name not in self._failed:
            try:
                return p.statset.pack_cats()
            except Exception:
                self._fail(p, "packing its cat-stats")
        return {n: [] for n in p.statset.names("cat")}

    # -- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"probes": {p.name: p.state_dict() for p in self.probes}, "disabled": sorted(self.disabled)}

    def load_state_dict(self, sd: dict) -> None:
        self.disabled = set(sd.get("disabled", []))
        self._compute_failed = set()
        for p in self.probes:
            if p.name in sd.get("probes", {}):
                p.load_state_dict(sd["probes"][p.name])

