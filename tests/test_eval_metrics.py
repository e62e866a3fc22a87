"""pass@k against the brute-force average over every k-subset; question rows; means and SEs."""

import itertools
import math

import pytest

from rl_training.eval_metrics import mean_se, pass_at_k, question_row


@pytest.mark.parametrize("n, c", [(8, 0), (8, 1), (8, 3), (8, 7), (8, 8), (5, 2), (4, 1), (1, 1), (1, 0)])
def test_pass_at_k_is_the_mean_over_all_k_subsets(n, c):
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow():
    # C(2000, 1000) overflows a float; the product form does not.
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-12)
    assert 0 < pass_at_k(2000, 3, 10) < 1


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_question_row_and_mean_se():
    samples = [{"format_ok": True, "answer_ok": a, "reward": float(a), "length": n, "entropy_sum": 2.0 * n}
               for a, n in ((True, 3), (False, 5), (False, 4), (True, 4))]
    row = question_row("q", samples)
    assert row["correct"] == 2 and row["answer_rate"] == 0.5 and row["format_rate"] == 1.0
    assert row["pass@1"] == pytest.approx(0.5) and row["pass@2"] == pytest.approx(1 - 1 / 6)
    assert row["pass@4"] == 1.0 and math.isnan(row["pass@8"])
    assert row["length_mean"] == 4.0 and row["length_max"] == 5 and row["entropy_per_token"] == 2.0
    m, se = mean_se([1.0, 2.0, 3.0, float("nan")])
    assert m == 2.0 and se == pytest.approx(1 / math.sqrt(3))
