import json

import pytest

from rl_training.data.prompts import render_completion
from rl_training.errors import ConfigError, DataError
from rl_training.rewards import (
    REWARD_FNS,
    RewardBreakdown,
    flexible_reward,
    get_reward_fn,
    gold_number,
    numbers_equal,
    strict_reward,
)


def _gsm8k_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _written_gold(answer: str) -> str:
    """The gold number exactly as written after '####' (e.g. '1,200')."""
    return answer.rsplit("####", 1)[1].strip()


def _bump(written: str) -> str:
    """written + 1, keeping thousands separators if the original had them."""
    value = int(written.replace(",", "")) + 1
    return f"{value:,}" if "," in written else str(value)


@pytest.mark.parametrize("fn", [strict_reward, flexible_reward])
def test_every_gsm8k_gold_scores_one_and_a_changed_number_zero(gsm8k_path, fn):
    rows = _gsm8k_rows(gsm8k_path)
    assert len(rows) == 7473
    for row in rows:
        reasoning, written = row["answer"].rsplit("####", 1)[0].strip(), _written_gold(
            row["answer"]
        )
        good = fn(render_completion(reasoning, written), row["answer"])
        bad = fn(render_completion(reasoning, _bump(written)), row["answer"])
        assert good.format_ok and good.answer_ok and good.reward == 1.0, (row, good)
        assert bad.format_ok and not bad.answer_ok and bad.reward == 0.0, (row, bad)
        assert good.parsed == gold_number(row["answer"])


@pytest.mark.parametrize(
    "a, b",
    [
        ("1,234", "1234"),
        ("$18", "18"),
        ("18.0", "18"),
        ("0.5", "1/2"),
        (".5", "0.5"),
        ("-3", "-3.00"),
        ("18.", "18"),
        ("$1,234.50", "1234.5"),
        ("-$7", "-7"),
        ("18 dollars", "18"),
    ],
)
def test_numbers_equal(a, b):
    assert numbers_equal(a, b) and numbers_equal(b, a)


@pytest.mark.parametrize(
    "a, b", [("18", "19"), ("-3", "3"), ("0.5", "1/3"), ("18", "abc"), ("1 2", "1")]
)
def test_numbers_not_equal(a, b):
    assert not numbers_equal(a, b)


@pytest.mark.parametrize(
    "gold, expected",
    [
        ("so #### 1,234", "1234"),
        ("#### -7", "-7"),
        (72, "72"),
        ("72", "72"),
        (3.5, "3.5"),
        ("3.50", "3.5"),
        ("1/4", "0.25"),
        ("1/3", "1/3"),
        (18.0, "18"),
    ],
)
def test_gold_number(gold, expected):
    assert gold_number(gold) == expected


@pytest.mark.parametrize("gold", ["#### none", "", "18 or 19", None, True])
def test_gold_number_rejects(gold):
    with pytest.raises(DataError):
        gold_number(gold)


@pytest.mark.parametrize(
    "answer", ["18", "$18", "18.", "18.0", " 18 dollars ", "18 apples", "The answer is 18."]
)
def test_strict_accepts_decorated_number(answer):
    r = strict_reward(f"reasoning </think> <answer>{answer}</answer>", "#### 18")
    assert r == RewardBreakdown(format_ok=True, answer_ok=True, parsed="18", reward=1.0)


def test_strict_fraction_and_negative():
    assert strict_reward("<answer>1/2</answer>", "0.5").reward == 1.0
    assert strict_reward("<answer>-3</answer>", "#### -3.00").reward == 1.0
    assert strict_reward("<answer>3</answer>", "#### -3").reward == 0.0


def test_strict_two_blocks_is_bad_format():
    r = strict_reward("x </think> <answer>18</answer> <answer>18</answer>", "18")
    assert not r.format_ok and r.reward == 0.0


def test_strict_no_block():
    r = strict_reward("I think it is 18", "18")
    assert r == RewardBreakdown(format_ok=False, answer_ok=False, parsed=None, reward=0.0)


def test_strict_unclosed_block_is_bad_format():
    assert not strict_reward("x </think> <answer>18", "18").format_ok


def test_strict_two_numbers_in_block():
    r = strict_reward("x </think> <answer>18 or 19</answer>", "18")
    assert r.format_ok and not r.answer_ok and r.parsed is None and r.reward == 0.0


def test_strict_wrong_number():
    r = strict_reward("x </think> <answer>17</answer>", "18")
    assert r.format_ok and not r.answer_ok and r.parsed == "17" and r.reward == 0.0


def test_think_tags_not_required():
    assert strict_reward("<answer>18</answer>", "18").reward == 1.0
    assert strict_reward("<think> 9+9 </think><answer>18</answer>", "18").reward == 1.0


def test_flexible_takes_last_number():
    assert flexible_reward("10 - 3 = 7, so 7 apples.", "7").reward == 1.0
    r = flexible_reward("The answer is 18, not 19", "18")
    assert r.reward == 0.0 and r.parsed == "19" and not r.format_ok
    r = flexible_reward("no numbers here", "18")
    assert r.parsed is None and r.reward == 0.0


def test_flexible_reports_format():
    r = flexible_reward("x </think> <answer> $1,234 </answer>", "#### 1,234")
    assert r.format_ok and r.answer_ok and r.parsed == "1234" and r.reward == 1.0


def test_to_dict_round_trips_json():
    d = strict_reward("<answer>18</answer>", "18").to_dict()
    assert json.loads(json.dumps(d)) == {
        "format_ok": True,
        "answer_ok": True,
        "parsed": "18",
        "reward": 1.0,
    }


def test_get_reward_fn():
    assert get_reward_fn("strict") is strict_reward and get_reward_fn("flexible") is flexible_reward
    assert set(REWARD_FNS) == {"strict", "flexible", "length_parity"}
    with pytest.raises(ConfigError, match="'exact'.*flexible, length_parity, strict"):
        get_reward_fn("exact")


def test_length_parity_is_a_builtin_smoke_test_reward():
    # cfg/tiny_test.yaml names it, so it must import from an installed console script.
    fn = get_reward_fn("length_parity")
    assert fn("ab", "7").reward == 1.0 and fn("abc", "7").reward == 0.0
