"""torch.distributed helpers that are no-ops at world_size 1.

``init`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain
``python runners/rl_runner.py`` is world_size 1 and never touches a process group, unless
``RL_TRAINING_FORCE_COLLECTIVES=1``: then it makes a 1-rank group with the requested backend
and every collective runs for real, so one GPU exercises the nccl path of a multi-GPU run.

Every tensor collective goes through a ``DistInfo`` method, which sends the tensor on
``collective_device`` (nccl refuses CPU tensors; gloo takes CPU ones) and hands the result
back on the caller's device. Object collectives (``all_gather_object``) need no care: torch
pickles them onto the current cuda device, which ``init`` sets.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

FORCE_ENV = "RL_TRAINING_FORCE_COLLECTIVES"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The one place a collective's tensor changes device (tests spy on it)."""
    return t.to(device)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"  # of the process group: decides where collective tensors live
    force_collectives: bool = False  # a 1-rank group whose collectives run anyway (GPU checks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.force_collectives

    @property
    def collective_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        """In place, whatever device ``t`` is on."""
        if self.enabled:
            sent = to_device(t, self.collective_device)
            tdist.all_reduce(sent, op=op)
            if sent is not t:
                t.copy_(to_device(sent, t.device))
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM across ranks (gloo has no AVG: divide yourself)."""
        return self._reduce(t, tdist.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, tdist.ReduceOp.MAX)

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, tdist.ReduceOp.MIN)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world_size, *t.shape]: row r is rank r's ``t`` (same shape on every rank)."""
        if not self.enabled:
            return t.unsqueeze(0)
        sent = to_device(t, self.collective_device)
        parts = [torch.zeros_like(sent) for _ in range(self.world_size)]
        tdist.all_gather(parts, sent)
        return to_device(torch.stack(parts), t.device)

    def all_gather_object(self, obj):
        """[obj of rank 0, obj of rank 1, ...]."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            if self.backend == "nccl":  # else nccl guesses the device and warns
                tdist.barrier(device_ids=[self.device.index])
            else:
                tdist.barrier()


def forced_from_env() -> bool:
    return os.environ.get(FORCE_ENV, "0") not in ("", "0", "false", "False")


def init(backend: str = "auto", force_collectives: bool | None = None) -> DistInfo:
    """The process group of a torchrun launch (or a forced 1-rank one) and this rank's DistInfo."""
    force = forced_from_env() if force_collectives is None else force_collectives
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if (world_size > 1 or force) and not tdist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # Forced outside torchrun: a 1-rank group needs no rendezvous, an in-memory store does.
            tdist.init_process_group(backend=backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
        elif attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps ONE store across worker restarts: without a per-attempt
            # prefix a restarted rank can read a dead peer's address and fail to connect.
            base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timeout)
            store = tdist.PrefixStore(f"rl_training/attempt_{attempt}", base)
            tdist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            tdist.init_process_group(backend=backend, timeout=timeout)
    if tdist.is_initialized():
        backend = str(tdist.get_backend())
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend,
                    force_collectives=force)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
