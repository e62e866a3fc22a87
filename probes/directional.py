"""Per-sequence directional derivatives ⟨∇_θ f_i, v⟩ for all rows of a batch in ONE backward.

Sequences in a batch do not interact, so the gradient of Σ_i f_i at a module's output,
restricted to row i, is the gradient of f_i alone. For a Linear module y = W x + b whose
parameters are trainable, ⟨∂f_i/∂W, ΔW⟩ + ⟨∂f_i/∂b, Δb⟩ = Σ_{positions p of row i}
⟨∂f/∂y_p, ΔW x_p + Δb⟩. Hooks capture x_p and ∂f/∂y_p, so d_i needs no per-sequence
backward and no per-sequence gradient in memory. LoRA's A and B are Linear modules, so this
covers peft LoRA exactly (any trainable parameter outside a Linear is refused).

The forward runs at the given parameter values through ``torch.func.functional_call``: the
model's own parameters and their ``.grad`` are never touched.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.func import functional_call


def _linear_owners(model: torch.nn.Module, names: set[str]) -> dict[torch.nn.Module, dict[str, str]]:
    owners: dict[torch.nn.Module, dict[str, str]] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for attr in ("weight", "bias"):
            full = f"{mod_name}.{attr}" if mod_name else attr
            if full in names:
                owners.setdefault(module, {})[attr] = full
    covered = {full for attrs in owners.values() for full in attrs.values()}
    missing = names - covered
    assert not missing, f"directional derivatives need trainable params inside nn.Linear; not: {sorted(missing)[:3]}"
    return owners


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The sampled policy has no dropout; restore the caller's mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def per_row_directional(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
    objective: Callable[[Callable[..., object]], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(f [B], d [B], total) with d_i = ⟨∇_θ f_i(θ), v⟩ at θ = ``params``, v = ``direction``.

    ``objective(call)`` runs the model through ``call(**forward_kwargs)`` and returns the
    per-row objective f [B]. ``total`` = ⟨∇_θ Σ_i f_i, v⟩ from the ordinary parameter
    gradient; Σ_i d_i must equal it (a free consistency check).
    """
    owners = _linear_owners(model, set(direction))
    theta = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    acc: list[torch.Tensor] = []
    handles = []

    def forward_hook(module, inputs, output):
        attrs = owners[module]
        dw = direction[attrs["weight"]] if "weight" in attrs else None
        db = direction[attrs["bias"]] if "bias" in attrs else None
        x = inputs[0]

        def grad_hook(g):
            # ΔW x + Δb at every position, contracted with ∂f/∂y; summed per row in float64.
            jv = torch.zeros_like(g) if dw is None else torch.nn.functional.linear(x, dw.to(x.dtype))
            if db is not None:
                jv = jv + db.to(x.dtype)
            acc.append((g.double() * jv.double()).reshape(g.shape[0], -1).sum(dim=1))

        if output.requires_grad:
            output.register_hook(grad_hook)

    for module in owners:
        handles.append(module.register_forward_hook(forward_hook))
    try:
        call = lambda **kw: functional_call(model, theta, args=(), kwargs=kw, strict=False)  # noqa: E731
        f = objective(call)
        grads = torch.autograd.grad(f.sum(), list(theta.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    d = torch.stack(acc).sum(dim=0) if acc else torch.zeros_like(f, dtype=torch.float64)
    total = sum(
        float((g.double() * direction[n].double()).sum()) for n, g in zip(theta, grads) if g is not None
    )
    return f.detach(), d, total
