"""Per-question evaluation metrics and their means across questions.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code", arXiv:2107.03374, eq. 1): with n samples of which c are correct,
pass@k = 1 − C(n−c, k)/C(n, k), computed in their numerically stable product form
1 − Π_{i=n−c+1}^{n} (1 − k/i) (no large binomials).
"""

from __future__ import annotations

import math

import numpy as np

PASS_KS = (1, 2, 4, 8)


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from the n is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def question_row(qid: str, samples: list[dict]) -> dict:
    """One question's row from its samples (dicts with format_ok, answer_ok, reward, length,
    entropy_sum): rates, pass@k for every k ≤ n, lengths and per-token entropy."""
    n = len(samples)
    c = sum(bool(s["answer_ok"]) for s in samples)
    tokens = sum(s["length"] for s in samples)
    row = {"id": qid, "n": n, "correct": c,
           "format_rate": sum(bool(s["format_ok"]) for s in samples) / n, "answer_rate": c / n,
           "reward_mean": sum(s["reward"] for s in samples) / n,
           "length_mean": tokens / n, "length_max": max(s["length"] for s in samples),
           "entropy_per_token": sum(s["entropy_sum"] for s in samples) / tokens if tokens else float("nan")}
    for k in PASS_KS:
        row[f"pass@{k}"] = pass_at_k(n, c, k) if k <= n else float("nan")
    return row


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean over questions and its standard error (sample sd / √n; nan for one question)."""
    xs = [v for v in values if v == v]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
