"""Per-row gradients of trainable Linear layers from one forward+backward (the capture engine).

Rows of a batch do not interact, so for y = W x + b the hooks of ONE forward+backward of a
row-separable objective Σ_i f_i give, per position t, the input x_t and the output gradient
δ_t = ∂(Σ f)/∂y_t, and row i's gradients are g_i(W) = Σ_{t∈i} δ_t x_tᵀ (einsum 'bto,bti->boi')
and g_i(b) = Σ_{t∈i} δ_t. LoRA's A and B are Linear modules, so this covers peft LoRA exactly;
a trainable parameter outside a Linear is refused.

Row gradients are handed to a callback module by module as soon as the backward reaches the
module; unless the callback keeps them (GNS does, to reduce same-shape modules together after
the backward) memory stays at one module's [rows × params] at a time. An owner that keeps
every row (the Fisher probe) gives ``rows_out``: the matmul then writes straight into the
owner's buffer, with no copy and no second allocation. The hooks only
read: the forward, the backward and whatever DDP does with ``.grad`` are unchanged. Attach
them around the forward+backward to capture (e.g. one training microbatch) and detach after.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from rl_training.errors import ConfigError

RowGrads = Callable[[str, torch.Tensor], None]  # (parameter name, [rows, *param.shape]) -> None
RowsOut = Callable[[str, int], torch.Tensor]  # (parameter name, rows) -> float32 [rows, *param.shape] to write into
TokenTerms = Callable[[dict, torch.Tensor, torch.Tensor], None]  # (attrs, x [rows, T, in], δ [rows, T, out]) -> None


def linear_owners(model: torch.nn.Module, names: set[str]) -> dict[torch.nn.Module, dict[str, str]]:
    """module -> {"weight"|"bias": full parameter name} for the named parameters; refuses others."""
    owners: dict[torch.nn.Module, dict[str, str]] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for attr in ("weight", "bias"):
            full = f"{mod_name}.{attr}" if mod_name else attr
            if full in names:
                owners.setdefault(module, {})[attr] = full
    missing = names - {full for attrs in owners.values() for full in attrs.values()}
    if missing:
        raise ConfigError(f"per-sequence gradients need trainable parameters inside nn.Linear (LoRA is); "
                          f"not: {sorted(missing)[:3]}")
    return owners


class LinearCapture:
    """Forward hooks on the Linear modules owning ``names``; ``on_rows(name, g)`` per parameter,
    or, instead of forming row gradients, ``on_tokens(attrs, x, δ)`` per module with x [rows, T,
    in] and δ [rows, T, out] in float32 (attrs: {"weight"|"bias": parameter name})."""

    def __init__(self, model: torch.nn.Module, names: set[str], on_rows: RowGrads | None = None,
                 on_tokens: TokenTerms | None = None, rows_out: RowsOut | None = None):
        if (on_rows is None) == (on_tokens is None):
            raise ValueError("LinearCapture: give exactly one of on_rows and on_tokens")
        self.owners = linear_owners(model, names)
        self.on_rows, self.on_tokens, self.rows_out = on_rows, on_tokens, rows_out
        self._handles: list = []
        self.seen: set[str] = set()
        self.error: BaseException | None = None  # raised by the owner after the backward
        self.seconds = 0.0  # spent in the hooks since attach (inside the owner's backward)
        self._generation = 0  # bumped by detach: hooks of an earlier attach stay quiet

    def attach(self) -> None:
        self.detach()
        self.seen, self.error, self.seconds = set(), None, 0.0
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self.owners]

    def detach(self) -> None:
        """Remove the forward hooks; gradient hooks already on tensors of a kept graph go quiet
        (a later backward through it, e.g. with retain_graph, captures nothing)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._generation += 1

    def _forward_hook(self, module, inputs, output) -> None:
        if not output.requires_grad:
            return
        x = inputs[0].detach()
        attrs = self.owners[module]
        generation = self._generation

        def grad_hook(delta: torch.Tensor) -> None:
            # An exception here would abort the TRAINING backward: keep it for the owner, who
            # raises it where the probe manager isolates probe failures.
            if self.error is None and generation == self._generation:
                t0 = time.perf_counter()
                try:
                    self._rows(attrs, x, delta)
                except Exception as e:  # noqa: BLE001
                    self.error = e
                self.seconds += time.perf_counter() - t0

        output.register_hook(grad_hook)

    def _rows(self, attrs: dict[str, str], x: torch.Tensor, delta: torch.Tensor) -> None:
        d = delta.detach().float()
        xs = x.float()
        rows = d.shape[0]
        d3, x3 = d.reshape(rows, -1, d.shape[-1]), xs.reshape(rows, -1, xs.shape[-1])
        if self.on_tokens is not None:
            self.on_tokens(attrs, x3, d3)
            self.seen.update(attrs.values())
            return
        for attr, name in attrs.items():
            out = None if self.rows_out is None else self.rows_out(name, rows)
            # g_i(W) = Σ_t δ_t x_tᵀ: one batched matmul ('bto,bti->boi'); g_i(b) = Σ_t δ_t
            g = torch.bmm(d3.transpose(1, 2), x3, out=out) if attr == "weight" else torch.sum(d3, dim=1, out=out)
            self.on_rows(name, g)
            self.seen.add(name)
