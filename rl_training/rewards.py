"""Answer extraction and scoring.

Two reward functions share one number grammar (a third, ``length_parity``, is for smoke tests):
- ``strict``: the completion must contain exactly one ``<answer>...</answer>`` block holding
  exactly one number, equal to the gold number (R1-style format + correctness reward);
- ``flexible``: the last number anywhere in the completion equals the gold number.

Numbers are compared exactly as ``fractions.Fraction`` values, so "1,234" == "1234",
"$18" == "18", "18.0" == "18." == "18" and "0.5" == ".5" == "1/2".
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Callable, Union

from rl_training.errors import ConfigError, DataError, import_dotted

Gold = Union[str, int, float]

# One number token: optional sign (before or after a "$"), a body with optional thousands
# separators and decimals, optionally "/ denominator". The look-behind keeps us from starting
# inside a word or another number (so "10-3" is 10 and 3, not 10 and -3). A trailing period
# is never part of a token because a decimal point must be followed by a digit.
_NUMBER_RE = re.compile(
    r"(?<![\w.])"
    r"(?=[-\u2212$\d.])"  # cheap first-character filter: about 30% faster scans
    r"(?P<s1>[-\u2212])?"
    r"(?:\$\s?)?"
    r"(?P<s2>[-\u2212])?"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<den>0*[1-9]\d*))?"
)
_ANSWER_BLOCK_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPEN_TAG, _CLOSE_TAG = "<answer>", "</answer>"


@dataclass(frozen=True)
class RewardBreakdown:
    """Result of scoring one completion."""

    format_ok: bool
    answer_ok: bool
    parsed: str | None  # normalised number extracted from the completion, if any
    reward: float

    def to_dict(self) -> dict:
        return asdict(self)


def _token_value(m: re.Match) -> Fraction:
    # Built from integers: Fraction(str) re-parses with its own regex and is ~3x slower.
    whole, _, frac = m.group("body").replace(",", "").partition(".")
    num, den = int(whole + frac or "0"), 10 ** len(frac)
    if m.group("den") is not None:
        den *= int(m.group("den"))
    if m.group("s1") or m.group("s2"):
        num = -num
    return Fraction(num, den)


def find_numbers(text: str) -> list[Fraction]:
    """All number tokens in ``text``, in order, as exact fractions."""
    return [_token_value(m) for m in _NUMBER_RE.finditer(text)]


def format_number(value: Fraction) -> str:
    """Canonical string: "12", "-0.25" for terminating decimals, else "1/3"."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    # A terminating decimal: enough precision to make the division exact.
    with localcontext() as ctx:
        ctx.prec = len(str(abs(value.numerator))) + max(twos, fives) + 2
        return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def parse_number(text: str) -> Fraction | None:
    """The value of ``text`` if it holds exactly one number token, else None."""
    matches = _NUMBER_RE.finditer(text)
    first = next(matches, None)
    if first is None or next(matches, None) is not None:
        return None
    return _token_value(first)


def last_number(text: str) -> Fraction | None:
    """The value of the last number token in ``text``, or None if there is none."""
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return None if last is None else _token_value(last)


def normalize_number(text: str) -> str | None:
    """Canonical string of the single number in ``text`` (None if zero or several)."""
    value = parse_number(text)
    return None if value is None else format_number(value)


def numbers_equal(a: str, b: str) -> bool:
    """True iff both strings hold exactly one number and the numbers are equal."""
    va, vb = parse_number(a), parse_number(b)
    return va is not None and vb is not None and va == vb


def gold_number(gold: Gold) -> str:
    """Normalised gold number from a GSM8K answer ("... #### 1,234") or a bare number."""
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise DataError(f"gold answer must be a string or a number, got {type(gold).__name__}")
    if isinstance(gold, int):
        return str(gold)
    # str(float) is the shortest repr that round-trips, e.g. 3.5 -> "3.5", not 3.4999...
    text = str(gold) if isinstance(gold, float) else gold.rsplit("####", 1)[-1]
    values = find_numbers(text)
    if len(values) != 1:
        what = "no number" if not values else f"{len(values)} numbers"
        raise DataError(f"gold answer has {what} (expected exactly one): {text.strip()[:80]!r}")
    return format_number(values[0])


def answer_block(completion: str) -> str | None:
    """Content of the single ``<answer>...</answer>`` block, or None if not exactly one."""
    if completion.count(_OPEN_TAG) != 1 or completion.count(_CLOSE_TAG) != 1:
        return None
    m = _ANSWER_BLOCK_RE.search(completion)
    return None if m is None else m.group(1)


def strict_reward(completion: str, gold: Gold) -> RewardBreakdown:
    """1.0 iff exactly one answer block holds exactly one number equal to gold."""
    target = Fraction(gold_number(gold))
    content = answer_block(completion)
    value = None if content is None else parse_number(content)
    answer_ok = value is not None and value == target
    return RewardBreakdown(
        format_ok=content is not None,
        answer_ok=answer_ok,
        parsed=None if value is None else format_number(value),
        reward=1.0 if answer_ok else 0.0,
    )


def flexible_reward(completion: str, gold: Gold) -> RewardBreakdown:
    """1.0 iff the last number anywhere in the completion equals gold.

    ``format_ok`` reports whether a strict answer block exists (informational only).
    """
    target = Fraction(gold_number(gold))
    value = last_number(completion)
    answer_ok = value is not None and value == target
    return RewardBreakdown(
        format_ok=answer_block(completion) is not None,
        answer_ok=answer_ok,
        parsed=None if value is None else format_number(value),
        reward=1.0 if answer_ok else 0.0,
    )


def length_parity_reward(completion: str, gold: Gold) -> RewardBreakdown:
    """Smoke tests only (``cfg/tiny_test.yaml``): 1.0 iff the completion has an even number of
    characters, whatever the gold answer. A tiny random model never answers correctly, so a
    real reward would give groups without reward variance and a loss without a gradient;
    this one is 1 for about half of the samples. Shipped in the package so that a documented
    config runs from an installed console script."""
    ok = len(completion) % 2 == 0
    return RewardBreakdown(format_ok=True, answer_ok=ok, parsed=str(len(completion)), reward=float(ok))


RewardFn = Callable[[str, Gold], RewardBreakdown]
REWARD_FNS: dict[str, RewardFn] = {
    "strict": strict_reward, "flexible": flexible_reward, "length_parity": length_parity_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """A registered reward (``strict``, ``flexible``, ``length_parity`` for smoke tests) or a
    user's function by dotted path.

    A user's function takes (completion, gold) and returns a ``RewardBreakdown``.
    """
    if name in REWARD_FNS:
        return REWARD_FNS[name]
    if "." in name:
        fn = import_dotted(name, "data.reward")
        if not callable(fn):
            raise ConfigError(f"data.reward '{name}' is not callable")
        return fn
    valid = ", ".join(sorted(REWARD_FNS))
    raise ConfigError(f"unknown reward {name!r}; valid: {valid}, or a dotted path module.function") from None
