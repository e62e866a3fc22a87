"""Analysis of offline entropy experiments: fits and verdicts as pure functions."""

from __future__ import annotations

import math


def mean_sd_se(xs: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mean, sd, sd / math.sqrt(n) if n > 1 else float("nan")


def linear_fit(x: list[float], y: list[float], w: list[float] | None = None) -> dict[str, float]:
    """Least squares y = a·x + b (weights w optional): slope, intercept, their SEs, R²."""
    n = len(x)
    w = w or [1.0] * n
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    sxy = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y))
    a = sxy / sxx
    b = my - a * mx
    resid = [yi - (a * xi + b) for xi, yi in zip(x, y)]
    ss_res = sum(wi * r * r for wi, r in zip(w, resid))
    ss_tot = sum(wi * (yi - my) ** 2 for wi, yi in zip(w, y))
    s2 = ss_res / (n - 2) if n > 2 else float("nan")
    return {
        "slope": a, "intercept": b, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "slope_se": math.sqrt(s2 / sxx) if n > 2 else float("nan"),
        "intercept_se": math.sqrt(s2 * (1 / sw + mx * mx / sxx)) if n > 2 else float("nan"),
    }


def loglog_slope(etas: list[float], values: list[float]) -> float:
    """Slope of log|value| against log η (1 where the change is first order in η)."""
    pts = [(math.log(e), math.log(abs(v))) for e, v in zip(etas, values) if e > 0 and v != 0]
    if len(pts) < 2:
        return float("nan")
    return linear_fit([p[0] for p in pts], [p[1] for p in pts])["slope"]


def first_order_range(etas, true, true_se, pred, rel_tol: float = 0.1) -> list[float]:
    """The η at which ΔH_true agrees with η·⟨∇H, v⟩ within rel_tol or 2 standard errors."""
    ok = []
    for e, t, se, p in zip(etas, true, true_se, pred):
        if abs(t - p) <= max(rel_tol * abs(p), 2 * se):
            ok.append(e)
    return ok


def scaling_verdict(be_values: list[int], means: list[float], ses: list[float]) -> dict:
    """Fit mean δH₁ = c + k/B_E (weighted by 1/SE²): a significant k (|k| > 3 SE) means the
    estimate depends on the batch size — the signature of a biased (same-sample) baseline."""
    fit = linear_fit([1.0 / b for b in be_values], means, [1.0 / (s * s) if s > 0 else 1.0 for s in ses])
    trend = abs(fit["slope"]) > 3 * fit["slope_se"] if math.isfinite(fit["slope_se"]) else False
    return {"verdict": "1/B_E trend" if trend else "converged", "limit": fit["intercept"],
            "limit_se": fit["intercept_se"], "k": fit["slope"], "k_se": fit["slope_se"]}
