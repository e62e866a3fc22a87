"""Analysis of offline entropy experiments: fits and verdicts as pure functions."""

from __future__ import annotations

import math
from statistics import NormalDist


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


def paired_linearity(raw: list[dict]) -> list[dict]:
    """ΔH against the learning rate with each repeat's U-batch held fixed.

    A repeat takes one real step per learning rate from the same state on the same U-batch, and
    Adam's Δθ is exactly proportional to the learning rate, so ΔH_r(lr) = lr·⟨∇H, v_r⟩ + O(lr²):
    the slope s_r(lr) = ΔH_r(lr)/lr is flat in lr where the change is first order. The pooled fit
    over repeats mixes in how much the U-batches differ (their slopes can differ in sign), which
    says nothing about linearity. Per lr: the slopes' mean and SE over repeats, and the ratio
    s_r(lr)/s_r(lr_min), 1 when linear; a repeat whose ΔH at lr_min is within 2 SE of 0 has no
    ratio (nan). Rows of ``raw``: lr, repeat, true, true_se; repeats missing an lr are left out.
    """
    lrs = sorted({x["lr"] for x in raw})
    by_repeat: dict = {}
    for x in raw:
        by_repeat.setdefault(x["repeat"], {})[x["lr"]] = x
    complete = [runs for runs in by_repeat.values() if len(runs) == len(lrs)]
    out = []
    for lr in lrs:
        slopes = [runs[lr]["true"] / lr for runs in complete]
        ratios = [runs[lr]["true"] / lr / (runs[lrs[0]]["true"] / lrs[0]) for runs in complete
                  if abs(runs[lrs[0]]["true"]) > 2 * runs[lrs[0]]["true_se"]]
        nan = float("nan")
        s_mean, _, s_se = mean_sd_se(slopes) if slopes else (nan, nan, nan)
        r_mean, _, r_se = mean_sd_se(ratios) if ratios else (nan, nan, nan)
        out.append({"lr": lr, "repeats": len(slopes), "slope": s_mean, "slope_se": s_se,
                    "ratio": r_mean, "ratio_se": r_se, "ratio_repeats": len(ratios)})
    return out


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


def known_se_fit(x: list[float], y: list[float], se: list[float]) -> dict[str, float]:
    """Weighted least squares y = a·x + b with weights 1/se² where the SEs are known.

    The covariance is the unscaled (XᵀWX)⁻¹: the SEs already say how far each y scatters,
    so rescaling by the residual variance would only add the noise of an estimate with
    n − 2 degrees of freedom (1–2 in a batch-scaling run). ``chi2`` (on ``dof`` = n − 2)
    is the residual sum of squares in units of the SEs, a check that the model fits.
    """
    w = [1.0 / (s * s) for s in se]
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    a = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y)) / sxx
    b = my - a * mx
    chi2 = sum(wi * (yi - a * xi - b) ** 2 for wi, xi, yi in zip(w, x, y))
    return {"slope": a, "intercept": b, "slope_se": math.sqrt(1 / sxx),
            "intercept_se": math.sqrt(1 / sw + mx * mx / sxx), "chi2": chi2, "dof": len(x) - 2}


def scaling_verdict(be_values: list[int], means: list[float], ses: list[float], alpha: float = 0.01) -> dict:
    """Fit mean δH₁ = c + k/B_E with the known SEs of the means (``known_se_fit``) and z-test k.

    Verdict "1/B_E trend" when |k|/SE_k exceeds the two-sided normal quantile of level
    ``alpha`` (default 0.01, |z| > 2.576): an unbiased estimator is then flagged in 1% of
    experiments. A trend is the signature of a biased (same-sample) baseline. "undetermined"
    when fewer than two B_E values or an SE is not positive and finite (no weight to give).
    """
    z_crit = NormalDist().inv_cdf(1 - alpha / 2)
    usable = len(be_values) >= 2 and len(set(be_values)) >= 2 and all(s > 0 and math.isfinite(s) for s in ses)
    if not usable:
        nan = float("nan")
        return {"verdict": "undetermined", "limit": nan, "limit_se": nan, "k": nan, "k_se": nan, "k_z": nan,
                "alpha": alpha, "z_crit": z_crit, "chi2": nan, "dof": len(be_values) - 2}
    fit = known_se_fit([1.0 / b for b in be_values], means, ses)
    k_z = fit["slope"] / fit["slope_se"]
    return {"verdict": "1/B_E trend" if abs(k_z) > z_crit else "converged", "limit": fit["intercept"],
            "limit_se": fit["intercept_se"], "k": fit["slope"], "k_se": fit["slope_se"], "k_z": k_z,
            "alpha": alpha, "z_crit": z_crit, "chi2": fit["chi2"], "dof": fit["dof"]}
