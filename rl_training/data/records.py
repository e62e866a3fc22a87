"""Task records: GSM8K (local jsonl or the hub) and a procedural arithmetic task.

Every record carries a stable id (sha1 of the question, never Python's salted ``hash()``),
so prompt ids, the train/eval split and the difficulty scheduler's state agree across
processes, ranks and resumes.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

from rl_training.errors import ConfigError, DataError
from rl_training.rewards import gold_number

DEFAULT_ARITHMETIC_N = 1000


@dataclass(frozen=True)
class Record:
    """One question with its reference answer and normalised gold number."""

    id: str
    question: str
    answer: str
    gold: str


def stable_id(question: str) -> str:
    """First 16 hex digits of the sha1 of the question text."""
    return hashlib.sha1(question.encode("utf-8")).hexdigest()[:16]


def make_record(question: str, answer: str) -> Record:
    """A record from a GSM8K-style answer ("... #### N"); raises DataError if malformed."""
    if "####" not in answer:
        raise DataError("answer has no '#### <number>' line")
    return Record(
        id=stable_id(question), question=question, answer=answer, gold=gold_number(answer)
    )


def _record_from_obj(obj: object) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("question", "answer"):
        if key not in obj:
            raise DataError(f"missing key {key!r}")
        if not isinstance(obj[key], str):
            raise DataError(f"key {key!r} must be a string, got {type(obj[key]).__name__}")
    return make_record(obj["question"], obj["answer"])


def _check_unique(records: Sequence[Record], where: Callable[[int], str]) -> None:
    # Ids key the scheduler and the split; a repeated question would silently merge two prompts.
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        if rec.id in seen:
            raise DataError(f"{where(i)}: duplicate question (same as {where(seen[rec.id])})")
        seen[rec.id] = i


def load_jsonl_records(path: str | Path) -> list[Record]:
    """GSM8K-format jsonl: one {"question", "answer"} object per line; blank lines skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read data file: {e}") from None
    records: list[Record] = []
    linenos: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON record: {e}") from None
        try:
            records.append(_record_from_obj(obj))
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        linenos.append(lineno)
    if not records:
        raise DataError(f"{path}: no records")
    _check_unique(records, lambda i: f"{path}:{linenos[i]}")
    return records


def load_hub_gsm8k(split: str) -> list[Record]:
    """GSM8K from the Hugging Face hub (``openai/gsm8k``, config ``main``)."""
    try:
        import datasets  # lazy: heavy, and only needed for hub loading

        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:  # network, cache, bad split: all end in the same advice
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not load hub dataset openai/gsm8k split {split!r} (offline?): {msg}; "
            "set data.path to a local GSM8K jsonl file"
        ) from None
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(_record_from_obj(dict(row)))
        except DataError as e:
            raise DataError(f"openai/gsm8k[{split}] row {i}: {e}") from None
    _check_unique(records, lambda i: f"openai/gsm8k[{split}] row {i}")
    return records


# ---------------------------------------------------------------------------------------------
# Procedural arithmetic. A problem is an expression tree (an int, or (op, left, right)); the
# question shows it (levels 1-4) or tells it as a story (level 5), and the answer walks through
# it one operation per line, GSM8K-style, ending in "#### N". Generators only build trees with
# non-negative integer intermediate results, so every step is exact.

Expr = Union[int, tuple]  # int | (op, Expr, Expr), op in "+-*/"

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert op == "/" and b != 0 and a % b == 0, f"inexact division {a} / {b}"
    return a // b


def render(expr: Expr) -> str:
    """Infix text with only the parentheses the precedence rules need."""
    if isinstance(expr, int):
        return str(expr)
    op, left, right = expr

    def side(child: Expr, is_right: bool) -> str:
        text = render(child)
        if isinstance(child, int):
            return text
        weaker = _PREC[child[0]] < _PREC[op]
        # a - (b - c) and a / (b * c) need parentheses even at equal precedence.
        same_but_right = is_right and _PREC[child[0]] == _PREC[op] and op in "-/"
        return f"({text})" if weaker or same_but_right else text

    return f"{side(left, False)} {op} {side(right, True)}"


def evaluate(expr: Expr, steps: list[str] | None = None) -> int:
    """Value of ``expr``; appends one "a op b = c" line per operation to ``steps``."""
    if isinstance(expr, int):
        return expr
    op, left, right = expr
    a, b = evaluate(left, steps), evaluate(right, steps)
    value = _apply(op, a, b)
    if steps is not None:
        steps.append(f"{a} {op} {b} = {value}")
    return value


def explain(expr: Expr) -> str:
    """GSM8K-style answer: one line per operation, then "#### N"."""
    steps: list[str] = []
    value = evaluate(expr, steps)
    return "\n".join(steps + [f"#### {value}"])


# Phrasings around a written expression (levels 1-4). Several phrasings widen the space of
# distinct questions at level 1 (only 100 digit pairs) and keep the model from keying on one.
_PHRASINGS = (
    "What is {e}?",
    "Compute {e}.",
    "Calculate {e}.",
    "Evaluate {e}.",
    "What does {e} equal?",
    "Find the value of {e}.",
    "Work out {e}.",
    "What is the result of {e}?",
    "Solve: {e} =",
    "How much is {e}?",
    "Give the value of {e}.",
    "What number is {e}?",
)
_NAMES = tuple(
    "Ava Ben Chen Dana Eli Fatima Gus Hana Ivan Jada Kofi Lena Mateo Nora Omar Priya".split()
)
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells")


def _phrase(rng: random.Random, expr: Expr) -> tuple[str, Expr]:
    return rng.choice(_PHRASINGS).format(e=render(expr)), expr


def _level1(rng: random.Random) -> tuple[str, Expr]:
    """Single-digit addition."""
    return _phrase(rng, ("+", rng.randint(0, 9), rng.randint(0, 9)))


def _level2(rng: random.Random) -> tuple[str, Expr]:
    """Two-digit addition or subtraction (non-negative result)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return _phrase(rng, ("+", a, b))
    return _phrase(rng, ("-", max(a, b), min(a, b)))


def _level3(rng: random.Random) -> tuple[str, Expr]:
    """Single-digit multiplication, or three operands with + and -."""
    if rng.random() < 0.3:
        return _phrase(rng, ("*", rng.randint(2, 9), rng.randint(2, 9)))
    a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
    op1 = rng.choice("+-") if a >= b else "+"
    ab = _apply(op1, a, b)
    op2 = rng.choice("+-") if ab >= c else "+"
    return _phrase(rng, (op2, (op1, a, b), c))


def _level4(rng: random.Random) -> tuple[str, Expr]:
    """Two-digit multiplication, or mixed operations with parentheses."""
    kind = rng.randrange(5)
    if kind == 0:
        return _phrase(rng, ("*", rng.randint(10, 99), rng.randint(10, 99)))
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 12)
    if kind == 1:  # (a +- b) * c
        inner = ("-", max(a, b), min(a, b)) if rng.random() < 0.5 and a != b else ("+", a, b)
        return _phrase(rng, ("*", inner, c))
    if kind == 2:  # c * (a +- b)
        inner = ("-", max(a, b), min(a, b)) if rng.random() < 0.5 and a != b else ("+", a, b)
        return _phrase(rng, ("*", c, inner))
    if kind == 3:  # a * c +- b
        prod = ("*", a, c)
        return _phrase(rng, ("-", prod, b) if rng.random() < 0.5 and a * c >= b else ("+", prod, b))
    # (x + y) / c with an exact quotient
    total = c * rng.randint(2, 20)
    x = rng.randint(1, total - 1)
    return _phrase(rng, ("/", ("+", x, total - x), c))


def _level5(rng: random.Random) -> tuple[str, Expr]:
    """A short multi-step word problem."""
    name, item, kind = rng.choice(_NAMES), rng.choice(_ITEMS), rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        c = rng.randint(1, a * b - 1)
        return (
            f"{name} buys {a} packs of {item} with {b} {item} in each pack, then gives away "
            f"{c} {item}. How many {item} does {name} have left?",
            ("-", ("*", a, b), c),
        )
    if kind == 1:
        a, b, c = rng.randint(1, 40), rng.randint(2, 9), rng.randint(3, 12)
        return (
            f"{name} has {a} {item} and buys {b} more packs with {c} {item} in each. "
            f"How many {item} does {name} have now?",
            ("+", a, ("*", b, c)),
        )
    if kind == 2:
        price, qty = rng.randint(2, 15), rng.randint(2, 6)
        bill = next(x for x in (20, 50, 100, 200) if x > price * qty)
        return (
            f"A shop sells {item} for ${price} each. {name} buys {qty} {item} and pays with "
            f"a ${bill} bill. How many dollars of change does {name} get?",
            ("-", bill, ("*", price, qty)),
        )
    if kind == 3:
        k, each = rng.randint(2, 6), rng.randint(3, 12)
        c = rng.randint(1, each - 1)
        return (
            f"{name} shares {k * each} {item} equally among {k} friends. Each friend then "
            f"gives {c} of their {item} away. How many {item} does each friend have now?",
            ("-", ("/", k * each, k), c),
        )
    a, b, c = rng.randint(5, 40), rng.randint(2, 9), rng.randint(1, 30)
    return (
        f"{name} reads {a} pages a day for {b} days, then {c} more pages the next day. "
        f"How many pages does {name} read in total?",
        ("+", ("*", a, b), c),
    )


_LEVELS: dict[int, Callable[[random.Random], tuple[str, Expr]]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
}


def arithmetic_records(n: int, seed: int, level: int) -> list[Record]:
    """``n`` distinct procedural arithmetic problems; deterministic given (n, seed, level)."""
    if isinstance(level, bool) or not isinstance(level, int) or level not in _LEVELS:
        raise ConfigError(f"data.level must be an integer in 1..{len(_LEVELS)}, got {level!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"data.num_records must be a positive integer, got {n!r}")
    rng = random.Random(seed)  # never the global RNG: records must not depend on other code
    gen = _LEVELS[level]
    questions: dict[str, Expr] = {}  # insertion-ordered, so the output order is deterministic
    for _ in range(20 * n + 1000):
        if len(questions) == n:
            break
        question, expr = gen(rng)
        questions.setdefault(question, expr)
    if len(questions) < n:
        raise ConfigError(
            f"arithmetic level {level} has too few distinct questions for data.num_records={n} "
            f"(found {len(questions)}); lower data.num_records or raise data.level"
        )
    return [make_record(q, explain(e)) for q, e in questions.items()]


TASKS = ("gsm8k", "arithmetic")


def load_task(
    task: str, *, path: str | None, split: str, n: int | None, seed: int, level: int
) -> list[Record]:
    """Records for ``task``.

    gsm8k: the local jsonl at ``path`` if given, else the hub ``split``; first ``n`` if given.
    arithmetic: ``arithmetic_records(n or 1000, seed, level)``; ``split`` is ignored, so
    carve an eval pool with ``split_records``.
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"data.num_records must be a positive integer or null, got {n!r}")
    if task == "gsm8k":
        records = load_jsonl_records(path) if path else load_hub_gsm8k(split)
        return records if n is None else records[:n]
    if task == "arithmetic":
        return arithmetic_records(n or DEFAULT_ARITHMETIC_N, seed, level)
    raise ConfigError(f"unknown data.task {task!r}; valid: {', '.join(TASKS)}")


def split_records(
    records: Sequence[Record], eval_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """(train, eval) pools, disjoint, decided per record by a hash of (seed, id).

    Membership depends only on each record's id, not on the order of ``records``; each
    returned list keeps the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {eval_fraction!r}")
    train: list[Record] = []
    evals: list[Record] = []
    for rec in records:
        digest = hashlib.sha1(f"{seed}:{rec.id}".encode()).hexdigest()
        u = int(digest[:15], 16) / 16**15  # uniform in [0, 1)
        (evals if u < eval_fraction else train).append(rec)
    if not train:
        raise ConfigError(f"train pool is empty after split (eval_fraction={eval_fraction})")
    if eval_fraction > 0 and not evals:
        raise ConfigError(
            f"eval pool is empty after split ({len(records)} records, "
            f"eval_fraction={eval_fraction}); raise data.eval_fraction or the number of records"
        )
    return train, evals
