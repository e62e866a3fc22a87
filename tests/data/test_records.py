import hashlib
import json
import random
import re

import pytest

from rl_training.data.records import (
    Record,
    arithmetic_records,
    load_hub_gsm8k,
    load_jsonl_records,
    load_task,
    split_records,
    stable_id,
)
from rl_training.errors import ConfigError, DataError

_EXPR_RE = re.compile(r"[\d(][\d\s+\-*/()]*[\d)]")
_STEP_RE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (-?\d+)$")


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(q, a):
    return json.dumps({"question": q, "answer": a})


def test_real_gsm8k_loads_with_unique_ids(gsm8k_path):
    records = load_jsonl_records(gsm8k_path)
    assert len(records) == 7473
    assert len({r.id for r in records}) == 7473
    first = records[0]
    assert first.gold == "72" and first.question.startswith("Natalia")
    assert first.id == hashlib.sha1(first.question.encode()).hexdigest()[:16]


def test_gold_is_normalised(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl", [_row("q1", "x\n#### 1,200"), "", "   ", _row("q2", "#### -7")]
    )
    records = load_jsonl_records(path)
    assert [r.gold for r in records] == ["1200", "-7"]
    assert records[0] == Record(
        id=stable_id("q1"), question="q1", answer="x\n#### 1,200", gold="1200"
    )


@pytest.mark.parametrize(
    "bad_line, fragment",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"question": "q3"}), "'answer'"),
        (json.dumps({"question": "q3", "answer": 5}), "'answer'"),
        (_row("q3", "the answer is 5"), "####"),
        (_row("q3", "#### lots"), "no number"),
    ],
)
def test_malformed_line_names_path_and_line(tmp_path, bad_line, fragment):
    path = _write_jsonl(
        tmp_path / "d.jsonl", [_row("q1", "#### 1"), _row("q2", "#### 2"), bad_line]
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:3")) as info:
        load_jsonl_records(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_duplicate_question_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_row("q1", "#### 1"), _row("q1", "#### 2")])
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + ".*duplicate"):
        load_jsonl_records(path)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_jsonl_records(path)


def test_hub_failure_is_a_data_error(monkeypatch):
    import sys
    import types

    def fail(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fail))
    with pytest.raises(DataError, match="could not load hub dataset.*data.path"):
        load_hub_gsm8k("train")


def test_hub_rows_become_records(monkeypatch):
    import sys
    import types

    rows = [{"question": "q1", "answer": "#### 3"}]
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_hub_gsm8k("test") == [Record(stable_id("q1"), "q1", "#### 3", "3")]


# --- arithmetic ------------------------------------------------------------------------------


def _check_explanation(rec: Record) -> None:
    """Each step line is true arithmetic, steps chain, and the last result is the gold."""
    *steps, final = rec.answer.split("\n")
    assert final == f"#### {rec.gold}"
    for line in steps:
        a, op, b, c = _STEP_RE.match(line).groups()
        a, b, c = int(a), int(b), int(c)
        if op == "/":
            assert b != 0 and a % b == 0 and c == a // b
        else:
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert int(steps[-1].rsplit("= ", 1)[1]) == int(rec.gold)


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_arithmetic_golds_are_correct(level):
    records = arithmetic_records(300, seed=1, level=level)
    assert len(records) == 300
    assert len({r.id for r in records}) == 300 and len({r.question for r in records}) == 300
    for rec in records:
        _check_explanation(rec)
        assert int(rec.gold) >= 0
        if level <= 4:  # the question shows the expression: evaluate it independently
            expr = _EXPR_RE.search(rec.question).group(0)
            assert set(expr) <= set("0123456789 +-*/()")
            assert eval(expr) == int(rec.gold), rec  # noqa: S307 - checked charset above


def test_arithmetic_levels_differ_in_difficulty():
    ops = lambda recs: sum(len(r.answer.split("\n")) - 1 for r in recs) / len(recs)  # noqa: E731
    assert ops(arithmetic_records(200, 0, 1)) == 1
    assert ops(arithmetic_records(200, 0, 5)) == 2
    assert all(int(r.gold) <= 18 for r in arithmetic_records(200, 0, 1))


def test_arithmetic_is_deterministic_and_seeded():
    state = random.getstate()
    a = arithmetic_records(200, seed=7, level=3)
    random.seed(12345)  # the global RNG must not matter
    assert arithmetic_records(200, seed=7, level=3) == a
    assert arithmetic_records(200, seed=8, level=3) != a
    random.setstate(state)


def test_arithmetic_validation():
    with pytest.raises(ConfigError, match="level"):
        arithmetic_records(10, 0, 0)
    with pytest.raises(ConfigError, match="level"):
        arithmetic_records(10, 0, 6)
    with pytest.raises(ConfigError, match="data.num_records"):
        arithmetic_records(0, 0, 1)
    with pytest.raises(ConfigError, match="too few distinct questions"):
        arithmetic_records(1201, 0, 1)  # 100 digit pairs x 12 phrasings
    assert len(arithmetic_records(1200, 0, 1)) == 1200


# --- load_task and split ---------------------------------------------------------------------


def test_load_task(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(f"q{i}", f"#### {i}") for i in range(5)])
    assert [
        r.gold for r in load_task("gsm8k", path=str(path), split="train", n=3, seed=0, level=1)
    ] == ["0", "1", "2"]
    assert len(load_task("gsm8k", path=str(path), split="train", n=None, seed=0, level=1)) == 5
    assert len(load_task("arithmetic", path=None, split="train", n=None, seed=0, level=2)) == 1000
    assert load_task(
        "arithmetic", path=None, split="x", n=20, seed=3, level=4
    ) == arithmetic_records(20, 3, 4)
    with pytest.raises(ConfigError, match="'math'.*arithmetic"):
        load_task("math", path=None, split="train", n=None, seed=0, level=1)


def test_split_records_is_disjoint_deterministic_and_order_free():
    records = arithmetic_records(2000, seed=0, level=2)
    train, evals = split_records(records, 0.1, seed=0)
    ids = lambda rs: {r.id for r in rs}  # noqa: E731
    assert not ids(train) & ids(evals)
    assert ids(train) | ids(evals) == ids(records) and len(train) + len(evals) == len(records)
    assert 100 < len(evals) < 300  # ~200 expected
    assert split_records(records, 0.1, seed=0) == (train, evals)
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    train2, evals2 = split_records(shuffled, 0.1, seed=0)
    assert ids(train2) == ids(train) and ids(evals2) == ids(evals)
    assert ids(split_records(records, 0.1, seed=1)[1]) != ids(evals)


def test_split_records_validation():
    records = arithmetic_records(20, seed=0, level=2)
    assert split_records(records, 0.0, seed=0) == (records, [])
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="eval_fraction"):
            split_records(records, bad, seed=0)
    with pytest.raises(ConfigError, match="eval pool is empty"):
        split_records(records[:1], 0.01, seed=0)
