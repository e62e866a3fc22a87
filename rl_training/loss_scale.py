"""Dynamic loss scaling, for a float16 model's backward.

The Dr-GRPO loss is divided by N·L_budget (51,200 at the user's setting), so its activation
gradients fall below float16's range (smallest normal 6e-5): unscaled, the demo's LoRA gradient
is 21 % off and 0.08 % of its entries are 0; with S = 2¹⁶, 0.9 % off (``bench/float16_training.py``).
The loss is multiplied by S before the backward and the gradients divided by S after; S halves
when a gradient is inf or nan (the step is then skipped) and doubles after ``growth_interval``
good steps in a row, as torch.amp.GradScaler does. Ours says whether the step will be skipped
before the optimizer step, so that the probes can drop that step instead of reading an inf
gradient or a zero update. S is a power of two, so the scaling itself rounds nothing.

Gradients are the same on every rank when they are checked (DDP has averaged them), so every
rank skips the same steps without a collective.
"""

from __future__ import annotations

import math

import torch

from rl_training.errors import ConfigError


class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        assert init_scale > 0 and math.log2(init_scale).is_integer(), "the scale must be a power of two"
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0  # finite steps since the scale last changed

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params: list[torch.Tensor]) -> None:
        """Divide the gradients by S in place (disabled: nothing to do)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled and grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def finite(self, total_norm: torch.Tensor) -> bool:
        """False when the unscaled gradients' total norm is inf or nan: the step must be skipped
        (one device-to-host read). Disabled: True, as before scaling existed."""
        return not self.enabled or bool(total_norm.isfinite())

    def update(self, finite: bool) -> None:
        """After each optimizer step (skipped or not). An overflow at S ≤ 1 is not the scale's:
        gradients no larger than the true ones overflow, so the float16 forward or gradient
        itself does, and halving on would skip every step from then on."""
        if not self.enabled:
            return
        if not finite:
            if self.scale <= 1.0:
                raise ConfigError(f"'model.dtype' float16: the gradient is inf or nan even at loss scale {self.scale:g} "
                                  "(no larger than the true one): this model overflows float16; train in bfloat16")
            self.scale, self.good_steps = self.scale / 2.0, 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * 2.0, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, sd: dict) -> None:
        if self.enabled:
            self.scale, self.good_steps = float(sd["scale"]), int(sd["good_steps"])
