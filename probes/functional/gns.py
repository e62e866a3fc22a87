"""Gradient noise scale (McCandlish et al. 2018, App. A) with prompt groups as the examples.

The example is the prompt GROUP: its G completions share a prompt and the group-mean baseline,
so they are not independent, while groups are (prompts are drawn independently). With P
example groups in a step, Γ_p = P·Σ_{i∈p} ∇ℓ_i (ℓ_i: sequence i's share of the global loss)
and the step gradient g = (1/P) Σ_p Γ_p. Then

    E[(1/P) Σ_p |Γ_p|²] = |ḡ|² + tr Σ,      E[|g|²] = |ḡ|² + tr Σ / P,

so, unbiased per step (P ≥ 2):

    tr Σ̂ = P/(P−1) · ((1/P) Σ_p |Γ_p|² − |g|²),      |ḡ̂|² = |g|² − tr Σ̂ / P.

B_simple = tr Σ / |ḡ|² (in prompts; × G in sequences) is taken from bias-corrected EMAs of the
numerator and the denominator separately: per-step estimates are noisy and often negative.

Two-level split. With γ_i = P·G·∇ℓ_i (a sequence's own gradient, on the scale of Γ_p, whose
group mean is Γ_p), the within-group scatter s_w = mean_p (1/(G−1)) Σ_{i∈p} |γ_i − Γ_p|²
estimates the intra-prompt noise, and tr Σ(G) ≈ tr Σ_between + s_w / G predicts the noise, and
so B_simple, at another group size G'. An approximation: the group baseline couples the γ_i of
a group (their advantages sum to zero), so s_w/G is not exactly the within-group part of tr Σ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def noise_and_signal(sum_sq_groups: float, sq_full: float, P: float) -> tuple[float, float]:
    """(tr Σ̂, |ḡ̂|²) of one step from Σ_p|Γ_p|², |g|² and P (nan for P < 2)."""
    if P < 2:
        return float("nan"), float("nan")
    tr = P / (P - 1) * (sum_sq_groups / P - sq_full)
    return tr, sq_full - tr / P


def within_scatter(sum_sq_members: float, sum_sq_groups: float, P: float, G: int) -> float:
    """s_w = mean_p (1/(G−1)) Σ_{i∈p} |γ_i − Γ_p|² from Σ_i|γ_i|² and Σ_p|Γ_p|² (Γ_p = mean of γ_i)."""
    if P < 1 or G < 2:
        return float("nan")
    return (sum_sq_members - G * sum_sq_groups) / (P * (G - 1))


@dataclass
class Ema:
    """Bias-corrected exponential moving average with a running second moment (for its noise)."""

    beta: float
    value: float = 0.0
    second: float = 0.0
    steps: int = 0

    def update(self, x: float) -> None:
        if not math.isfinite(x):
            return
        self.value = self.beta * self.value + (1 - self.beta) * x
        self.second = self.beta * self.second + (1 - self.beta) * x * x
        self.steps += 1

    @property
    def mean(self) -> float:
        return self.value / (1 - self.beta**self.steps) if self.steps else float("nan")

    @property
    def se(self) -> float:
        """Standard error of ``mean`` for independent per-step values: sd·√((1−β)/(1+β)),
        with the sd from the bias-corrected moments (nan before two steps)."""
        if self.steps < 2:
            return float("nan")
        var = max(self.second / (1 - self.beta**self.steps) - self.mean**2, 0.0)
        return math.sqrt(var * (1 - self.beta) / (1 + self.beta))

    def state_dict(self) -> dict:
        return {"value": self.value, "second": self.second, "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        self.value, self.second, self.steps = float(sd["value"]), float(sd["second"]), int(sd["steps"])


def b_simple(noise: float, signal: float, signal_se: float) -> float | None:
    """tr Σ / |ḡ|², or None (unresolved) while the signal is ≤ 0, within 2 SE of 0, or its SE
    is not known yet (fewer than two steps)."""
    if not (math.isfinite(noise) and math.isfinite(signal) and math.isfinite(signal_se)):
        return None
    if signal <= 0 or signal <= 2 * signal_se:
        return None
    return max(noise, 0.0) / signal


def generated_prompts(b_accepted: float, q: float) -> float:
    """B in generated prompts when a fraction q of groups has reward variance: (B + 1 − q)/q.
    Exact when zero-variance groups carry no gradient (kl_beta = 0)."""
    return (b_accepted + 1 - q) / q if q > 0 else float("nan")
