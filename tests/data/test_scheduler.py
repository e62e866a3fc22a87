import json
import math

import pytest

from rl_training.data.records import Record, stable_id
from rl_training.data.scheduler import DifficultyScheduler, ema_update
from rl_training.errors import ConfigError


def _records(n):
    return [
        Record(id=stable_id(f"q{i}"), question=f"q{i}", answer=f"#### {i}", gold=str(i))
        for i in range(n)
    ]


def _ids(records):
    return [r.id for r in records]


def test_ranks_get_disjoint_prompts_and_stay_in_step():
    records = _records(100)
    rank0, rank1 = DifficultyScheduler(records, seed=3), DifficultyScheduler(records, seed=3)
    for step in range(5):
        a, b = rank0.sample(8, rank=0, world_size=2), rank1.sample(8, rank=1, world_size=2)
        assert len(a) == len(b) == 8 and len(set(_ids(a)) | set(_ids(b))) == 16
        rates = {r.id: (i % 5) / 4 for i, r in enumerate(a + b)}  # the all-gathered rates
        rank0.update(rates)
        rank1.update(rates)
        assert rank0.state_dict() == rank1.state_dict()


def test_sample_is_one_global_draw_sliced_by_rank():
    records = _records(50)
    whole = DifficultyScheduler(records, seed=1).sample(12, rank=0, world_size=1)
    parts = [DifficultyScheduler(records, seed=1).sample(4, rank=r, world_size=3) for r in range(3)]
    assert _ids(whole) == sum((_ids(p) for p in parts), [])


def test_sampling_is_seeded():
    records = _records(50)
    a = DifficultyScheduler(records, seed=1)
    b = DifficultyScheduler(records, seed=1)
    assert [_ids(a.sample(5, 0, 1)) for _ in range(3)] == [
        _ids(b.sample(5, 0, 1)) for _ in range(3)
    ]
    assert _ids(DifficultyScheduler(records, seed=2).sample(5, 0, 1)) != _ids(
        DifficultyScheduler(records, seed=1).sample(5, 0, 1)
    )


def test_ema_arithmetic_and_buckets():
    records = _records(3)
    s = DifficultyScheduler(records, seed=0, ema_decay=0.7, hard_threshold=0.2, easy_threshold=0.8)
    p = records[0].id
    assert s.bucket(p) == "normal" and s.bucket_counts() == {"hard": 0, "normal": 3, "easy": 0}
    s.update({p: 1.0})  # first observation is taken as is
    assert s.ema[p] == 1.0 and s.bucket(p) == "easy"
    expected = 1.0
    for observed, bucket in [
        (0.0, "normal"),
        (0.0, "normal"),
        (0.0, "normal"),
        (0.0, "normal"),
        (0.0, "hard"),
    ]:
        s.update({p: observed})
        expected = 0.7 * expected + 0.3 * observed  # 0.7, 0.49, 0.343, 0.2401, 0.16807
        assert math.isclose(s.ema[p], expected) and s.bucket(p) == bucket
    assert math.isclose(s.ema[p], 0.16807)
    assert s.bucket_counts() == {"hard": 1, "normal": 2, "easy": 0}
    assert ema_update(None, 0.25, 0.9) == 0.25 and math.isclose(ema_update(0.5, 1.0, 0.9), 0.55)


def test_unknown_id_is_a_bug():
    s = DifficultyScheduler(_records(3), seed=0)
    with pytest.raises(AssertionError):
        s.update({"deadbeefdeadbeef": 0.5})


def test_zero_weight_bucket_is_never_sampled():
    records = _records(60)
    s = DifficultyScheduler(records, seed=0, weights=(1.0, 1.0, 0.0))
    easy = {r.id for r in records[:40]}
    s.update({pid: 1.0 for pid in easy})
    assert s.bucket_counts()["easy"] == 40
    for _ in range(200):
        assert not easy & set(_ids(s.sample(10, 0, 1)))
    # Once the positive-weight prompts run out, zero-weight ones fill the draw.
    assert len(set(_ids(s.sample(30, 0, 1))) & easy) == 10


def test_weights_are_respected_statistically():
    records = _records(20)
    s = DifficultyScheduler(records, seed=0, weights=(4.0, 1.0, 1.0))
    hard = {r.id for r in records[:10]}
    s.update({pid: 0.0 for pid in hard})
    draws = 4000
    hits = sum(s.sample(1, 0, 1)[0].id in hard for _ in range(draws))
    # P(hard) = 10*4 / (10*4 + 10*1) = 0.8; binomial sd = 0.0063.
    assert abs(hits / draws - 0.8) < 0.03


def test_state_dict_round_trips_through_json_and_continues_identically():
    records = _records(40)
    a = DifficultyScheduler(records, seed=5)
    a.sample(4, 0, 2)
    a.update({r.id: 0.0 for r in records[:5]} | {r.id: 1.0 for r in records[5:15]})
    sd = json.loads(json.dumps(a.state_dict()))
    b = DifficultyScheduler(records, seed=999)
    b.load_state_dict(sd)
    assert b.state_dict() == a.state_dict() and b.bucket_counts() == a.bucket_counts()
    for _ in range(3):
        assert _ids(a.sample(4, 1, 2)) == _ids(b.sample(4, 1, 2))


def test_load_state_dict_rejects_foreign_ids():
    a = DifficultyScheduler(_records(5), seed=0)
    a.update({a.records[0].id: 0.5})
    b = DifficultyScheduler(_records(5)[1:], seed=0)
    with pytest.raises(ConfigError, match="not in the current train records"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ema_decay": 1.0},
        {"ema_decay": -0.1},
        {"hard_threshold": 0.9, "easy_threshold": 0.5},
        {"weights": (1.0, 1.0)},
        {"weights": (0.0, 0.0, 0.0)},
        {"weights": (1.0, -1.0, 1.0)},
        {"weights": (1.0, float("nan"), 1.0)},
        {"weights": ("a", 1, 1)},
    ],
)
def test_validation(kwargs):
    with pytest.raises(ConfigError):
        DifficultyScheduler(_records(3), seed=0, **kwargs)


def test_too_many_prompts_requested():
    s = DifficultyScheduler(_records(10), seed=0)
    with pytest.raises(ConfigError, match="cannot draw 6 prompts per rank x 2 ranks from 10"):
        s.sample(6, 0, 2)
    with pytest.raises(ConfigError):
        DifficultyScheduler([], seed=0)
