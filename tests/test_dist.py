"""Collectives: every tensor goes to the device its backend accepts (nccl refuses CPU tensors),
a 1-rank group can be forced (so one GPU exercises the nccl path), and the rank-divergence
check gathers checksums, not parameter copies."""

import copy
import pickle

import pytest
import torch
import torch.distributed as tdist

from rl_training import dist
from rl_training.config import load_config
from rl_training.dist import DistInfo
from rl_training.session import build_session, create_run_dir, fit, param_checksums, rank_param_divergence
from tests.helpers.runs import TINY

CUDA = torch.device("cuda:0")


def test_collective_device_follows_the_backend():
    assert DistInfo(device=CUDA, backend="nccl").collective_device == CUDA
    assert DistInfo(device=CUDA, backend="gloo").collective_device == torch.device("cpu")
    assert DistInfo().collective_device == torch.device("cpu")
    assert not DistInfo().enabled and DistInfo(force_collectives=True).enabled


class BackendSpy:
    """Stands in for torch.distributed at world_size 1 and for the host→device copy of
    ``dist.to_device``: a tensor that reached the backend without going through that copy (or
    that went to another device) has no or the wrong ``spy_device`` and fails the check."""

    def __init__(self, device):
        self.device = device
        self.ops: list[str] = []

    def to_device(self, t, device):
        out = t.detach().clone()  # stays on the CPU here; the tag says where it would live
        out.spy_device = torch.device(device)
        return out

    def check(self, op, t):
        where = getattr(t, "spy_device", t.device)
        assert where == self.device, f"{op} got a tensor on {where}, not on the collective device {self.device}"
        self.ops.append(op)

    def all_reduce(self, t, op=None, group=None, async_op=False):
        self.check("all_reduce", t)

    def all_gather(self, out, t, group=None, async_op=False):
        self.check("all_gather", t)
        for o in out:
            o.copy_(t)

    def broadcast(self, t, src=0, group=None, async_op=False):
        self.check("broadcast", t)

    def all_gather_object(self, out, obj, group=None):
        # Objects are pickled into a byte tensor on the current cuda device by torch itself.
        self.ops.append("all_gather_object")
        out[:] = [pickle.loads(pickle.dumps(obj)) for _ in out]

    def barrier(self, *args, **kwargs):
        self.ops.append("barrier")


def test_every_collective_of_a_step_sends_its_tensors_to_the_nccl_device(tmp_path, monkeypatch):
    """One real tiny step (rollout, loss, probes, metrics, SIGTERM agreement, checkpoint, rank
    check) with the collectives of a cuda/nccl world forced on: every tensor handed to the
    backend was first moved to cuda (today's trainer gathers its metrics from the CPU)."""
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "run_name=run", "train.total_steps=1"])
    session = build_session(cfg, DistInfo())  # the model stays on the CPU: there is no GPU here
    spy = BackendSpy(CUDA)
    monkeypatch.setattr(dist, "to_device", spy.to_device)
    for name in ("all_reduce", "all_gather", "broadcast", "all_gather_object", "barrier"):
        monkeypatch.setattr(tdist, name, getattr(spy, name))
    world = DistInfo(device=CUDA, backend="nccl", force_collectives=True)
    session.world = session.trainer.world = world
    session.run_dir = create_run_dir(cfg, world)
    summary = fit(session)
    assert summary["steps"] == 1 and summary["rank_param_max_abs_diff"] == 0.0
    # The trainer's metrics and the rank check (all_gather), the probes and the SIGTERM
    # agreement (all_reduce) all went through the spy.
    assert {"all_gather", "all_reduce", "all_gather_object"} <= set(spy.ops)
    assert spy.ops.count("all_reduce") >= 3  # probe sums, probe max (ess), SIGTERM flag


def test_forced_collectives_make_a_one_rank_group(monkeypatch):
    monkeypatch.setenv(dist.FORCE_ENV, "1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    world = dist.init("gloo")
    try:
        assert world.enabled and world.world_size == 1 and world.backend == "gloo"
        assert tdist.is_initialized() and tdist.get_world_size() == 1
        t = torch.tensor([1.0, -2.0], dtype=torch.float64)
        assert torch.equal(world.all_reduce_sum(t.clone()), t)
        assert torch.equal(world.all_gather(t), t.unsqueeze(0))
        assert world.all_gather_object("x") == ["x"]
    finally:
        dist.shutdown()
    assert not tdist.is_initialized()


class TwoRankGather:
    """Rank 0 of two; the peer's gathered checksums are given."""

    world_size, rank, enabled = 2, 0, True

    def __init__(self, peer: torch.Tensor):
        self.peer = peer
        self.gathered: list[torch.Size] = []

    def all_gather(self, t):
        self.gathered.append(t.shape)
        return torch.stack([t, self.peer])

    def all_gather_object(self, obj):
        raise AssertionError("parameters must not be gathered as Python objects")


def test_rank_param_divergence_gathers_small_checksums():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    model[1].bias.requires_grad_(False)  # frozen: not compared
    peer = copy.deepcopy(model)
    with torch.no_grad():
        peer[0].weight[3, 5] += 0.5
    same = TwoRankGather(param_checksums(model))
    assert rank_param_divergence(model, same) == 0.0
    (shape,) = same.gathered
    assert shape.numel() <= 3 * 2, "two numbers per trainable tensor, not the parameters"
    assert rank_param_divergence(model, TwoRankGather(param_checksums(peer))) > 0


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_inplace_reductions_write_back_to_the_callers_tensor(monkeypatch, backend):
    spy = BackendSpy(CUDA if backend == "nccl" else torch.device("cpu"))
    monkeypatch.setattr(dist, "to_device", spy.to_device)

    def doubling_all_reduce(t, op=None, group=None, async_op=False):
        spy.check("all_reduce", t)
        t.mul_(2)

    monkeypatch.setattr(tdist, "all_reduce", doubling_all_reduce)
    world = DistInfo(device=CUDA, backend=backend, force_collectives=True)
    t = torch.tensor([1.0, 3.0])
    assert world.all_reduce_sum(t) is t and torch.equal(t, torch.tensor([2.0, 6.0]))
