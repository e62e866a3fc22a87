"""The GNS probe in the loop against brute force: one backward per group and per sequence.

tiny-random, group size 4, microbatch 2 (every group spans two of the step's four
microbatches): the squared norms the capture hooks collect during the training backward equal
those of separate backward passes of each group's (and each sequence's) share of the loss, and
the training gradient is bit-identical with and without the probe.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from probes.functional import gns as F
from rl_training.config import load_config
from rl_training.dist import DistInfo
from rl_training.session import build_session
from tests.helpers.runs import TINY

STEP = ("train.total_steps=1", "train.buffer_size=8", "train.microbatch_size=2", "rollout.group_size=4",
        "rollout.max_rounds=8", "train.lr=1e-3")


def _trainer(*extra):
    return build_session(load_config(TINY, [*STEP, *extra]), DistInfo()).trainer


def _grad_sq(trainer, batch, rows: slice) -> tuple[float, dict]:
    """|∇ of the rows' share of the local loss|² by a backward of those rows alone."""
    trainer.policy.zero_grad(set_to_none=True)
    terms, *_ = trainer._microbatch_loss(batch.select(rows))
    terms.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.trainable.items() if p.grad is not None}
    return sum(float(g.double().pow(2).sum()) for g in grads.values()), grads


def test_captured_sums_equal_per_group_and_per_sequence_backward_passes():
    trainer = _trainer("probes.probes=[{name: gns, kind: gns}]")
    theta = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    torch.manual_seed(0)
    out = trainer.train_step()
    logged = {k.split("/")[-1]: v for k, v in out.metrics.items() if k.startswith("probe/gns/")}
    batch = out.batch
    with torch.no_grad():  # back to θ_k, where the step's gradients were taken
        for n, p in trainer.trainable.items():
            p.copy_(theta[n])
    trainer.policy.train()
    G = 4
    examples = [g for g in range(len(batch) // G) if bool((batch.advantages[g * G:(g + 1) * G] != 0).any())]
    P = len(examples)
    assert P >= 2 and logged["P"] == P
    sq_groups = sum(_grad_sq(trainer, batch, slice(g * G, (g + 1) * G))[0] for g in examples)
    sq_members = sum(_grad_sq(trainer, batch, slice(i, i + 1))[0] for g in examples for i in range(g * G, (g + 1) * G))
    full, _ = _grad_sq(trainer, batch, slice(0, len(batch)))
    assert logged["sum_sq_groups"] == pytest.approx(P**2 * sq_groups, rel=1e-5)
    assert logged["g2"] == pytest.approx(full, rel=1e-5)
    want_s_w = F.within_scatter((P * G) ** 2 * sq_members, P**2 * sq_groups, P, G)
    assert logged["s_w"] == pytest.approx(want_s_w, rel=1e-5)
    trS, g2 = F.noise_and_signal(P**2 * sq_groups, full, P)
    assert logged["trS"] == pytest.approx(trS, rel=1e-4) and logged["g2_true"] == pytest.approx(g2, rel=1e-4, abs=1e-12)


def test_adam_view_weights_the_same_sums_by_adams_preconditioner():
    """Step 2 (Adam has state): Σ_p Γ_p²·D and |g|²·D equal per-group backward passes weighted
    by D = 1/(√v̂ + ε) of the optimizer state before the update; step 1 has no D."""
    from probes.functional.fisher import adam_preconditioner

    trainer = _trainer("probes.probes=[{name: gns, kind: gns, options: {adam_view: true}}]", "train.total_steps=2")
    first = trainer.train_step().metrics
    assert first["probe/gns/adam"] == 0.0 and "probe/gns/g2_adam_ema" not in first
    D = adam_preconditioner(trainer.optimizer, trainer.trainable)
    theta = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    out = trainer.train_step()
    probe = trainer.probes.probes[0]
    assert out.metrics["probe/gns/adam"] == 1.0 and "probe/gns/g2_adam_ema" in out.metrics
    batch = out.batch
    with torch.no_grad():
        for n, p in trainer.trainable.items():
            p.copy_(theta[n])
    trainer.policy.train()
    G = 4
    examples = [g for g in range(len(batch) // G) if bool((batch.advantages[g * G:(g + 1) * G] != 0).any())]

    def weighted(grads):
        return sum(float((g.double().pow(2) * D[n]).sum()) for n, g in grads.items())

    want_groups = sum(weighted(_grad_sq(trainer, batch, slice(g * G, (g + 1) * G))[1]) for g in examples)
    want_full = weighted(_grad_sq(trainer, batch, slice(0, len(batch)))[1])
    assert probe.stats["sq_groups_adam"] == pytest.approx(want_groups, rel=1e-5)
    assert probe.stats["g2_adam"] == pytest.approx(want_full, rel=1e-5)
    assert want_groups != pytest.approx(probe.stats["sq_groups"], rel=1e-2), "D is not 1"


def test_training_gradient_is_unchanged_by_the_captures():
    def step(probes):
        trainer = _trainer(probes)
        trainer.train_step()
        return {n: p.detach().clone() for n, p in trainer.trainable.items()}

    with_probe, without = step("probes.probes=[{name: gns, kind: gns}]"), step("probes.probes=[]")
    assert all(torch.equal(with_probe[n], without[n]) for n in without)


def test_refuses_trainable_parameters_outside_linear_layers():
    from probes.capture import linear_owners
    from rl_training.errors import ConfigError

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    with pytest.raises(ConfigError, match="inside nn.Linear"):
        linear_owners(model, {n for n, _ in model.named_parameters()})


@pytest.mark.parametrize("options, message", [({"ema_beta": 1.0}, "ema_beta must be in"),
                                              ({"group_sizes": [0]}, "group_sizes must be >= 1"),
                                              ({"hold_rows_gb": 0}, "hold_rows_gb must be > 0")])
def test_refuses_bad_options_in_one_line(options, message):
    from types import SimpleNamespace

    from probes.gns import GnsProbe
    from rl_training.errors import ConfigError

    cfg = SimpleNamespace(rollout=SimpleNamespace(group_size=4), train=SimpleNamespace(microbatch_size=4))
    with pytest.raises(ConfigError, match=message):
        GnsProbe("gns", options=options).setup(
            SimpleNamespace(cfg=cfg, world=SimpleNamespace(world_size=1), model=torch.nn.Linear(2, 2)))


_VIEWS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "expand", "unsqueeze", "squeeze",
          "detach", "alias", "as_strided", "t", "select", "slice"}


class _OpLog(TorchDispatchMode):
    """The aten ops a block dispatches, and the largest float64 tensor it makes."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()
        self.f64_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            self.f64_numel = max(self.f64_numel, out.numel())
        return out


# Twelve rows in microbatches of 5, 5 and 2; groups 0 and 2 have a reward signal, group 1 is filler.
LAYOUTS = {"filler last": ([2, 0, 1, 0, 2, 0, 1, 0, 2, 2, 1, 1], 2),  # the last microbatch: filler only
           "spanning last": ([2, 0, 1, 0, 2, 0, 1, 0, 1, 2, 2, 1], 3)}  # group 2 spans all three


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hold_rows_gb", [None, 1e-12, 700 / 2**30], ids=["default", "none held", "some held"])
def test_shuffled_groups_across_uneven_microbatches_without_device_stalls(monkeypatch, hold_rows_gb, layout):
    """Groups scattered over microbatches of 5, 5 and 2 rows (TRL shuffles them), a filler
    group that fills the last microbatch alone or a group spanning all three, two modules of one shape (reduced stacked): the
    sums equal brute force; inside the backward a module launches only its row-gradient matmul
    (and a bias's sum); neither there nor in the reduction after it does anything index, read a
    value back or build a float64 tensor larger than the rows (on a GPU each stalls or costs).
    With a budget for held rows that the modules exceed, reduced in the backward, the same
    (700 bytes: the biases of the two same-shape modules are reduced apart in a full microbatch,
    and must be in the short last one too)."""
    from types import SimpleNamespace

    from probes.base import StepContext
    from probes.capture import LinearCapture
    from probes.gns import GnsProbe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.Tanh(), torch.nn.Linear(4, 4),
                                torch.nn.Tanh(), torch.nn.Linear(4, 4))
    G, rows, T = 4, 12, 3
    group_index, captured = torch.tensor(LAYOUTS[layout][0]), LAYOUTS[layout][1]
    advantages = torch.where(group_index == 1, 0.0, torch.randn(rows))  # group 1: filler
    x, coef = torch.randn(rows, T, 5), torch.randn(rows, T, 4)
    batch = SimpleNamespace(group_index=group_index, advantages=advantages,
                            stats=SimpleNamespace(groups=3, groups_rejected=1))
    cfg = SimpleNamespace(rollout=SimpleNamespace(group_size=G), train=SimpleNamespace(microbatch_size=5))
    probe = GnsProbe("gns", options={} if hold_rows_gb is None else {"hold_rows_gb": hold_rows_gb})
    probe.setup(SimpleNamespace(cfg=cfg, world=SimpleNamespace(world_size=1), model=model))
    probe.reset_stats()
    params = dict(model.named_parameters())

    def row_losses(sel):
        return (model(x[sel]) * coef[sel]).sum(dim=(1, 2)) * (1 + advantages[sel])

    logs: list[_OpLog] = []
    after: list[_OpLog] = []
    rows_hook, after_hook = LinearCapture._rows, GnsProbe.on_after_backward

    def logged_rows(self, attrs, xs, delta):
        with _OpLog() as log:
            rows_hook(self, attrs, xs, delta)
        logs.append(log)

    def logged_after(self, ctx):
        with _OpLog() as log:
            after_hook(self, ctx)
        after.append(log)

    monkeypatch.setattr(LinearCapture, "_rows", logged_rows)
    monkeypatch.setattr(GnsProbe, "on_after_backward", logged_after)
    for i, start in enumerate(range(0, rows, 5)):
        sel = slice(start, start + 5)
        ctx = StepContext(step=1, model=model, optimizer=None, lr=0.0, batch=batch, world=SimpleNamespace(world_size=1),
                          cfg=cfg, microbatch=group_index[sel], microbatch_index=i)
        probe.on_before_microbatch(ctx)
        row_losses(sel).sum().backward()
        probe.on_after_backward(ctx)
    probe.on_before_optimizer_step(ctx)

    def sq_grad(idx):
        grads = torch.autograd.grad(row_losses(idx).sum(), list(params.values()))
        return sum(float(g.double().pow(2).sum()) for g in grads)

    examples = [0, 2]
    want_groups = sum(sq_grad((group_index == g).nonzero().flatten()) for g in examples)
    want_members = sum(sq_grad(torch.tensor([i])) for i in range(rows) if int(group_index[i]) in examples)
    assert probe.stats["P"] == 2
    assert probe.stats["sq_groups"] == pytest.approx(want_groups, rel=1e-6)
    assert probe.stats["sq_members"] == pytest.approx(want_members, rel=1e-6)
    assert len(logs) == 3 * captured  # 3 Linear modules × the microbatches with example rows
    for log in logs if hold_rows_gb is None else []:
        assert log.ops - _VIEWS <= {"bmm", "sum"}
    assert len(after) == 3  # a filler-only microbatch included: it returns at once
    for log in logs + after:
        assert not log.ops & {"index", "index_select", "nonzero", "masked_select", "_local_scalar_dense", "item"}
        assert log.f64_numel <= 2 * 5  # 2 stacked modules × 5 rows
