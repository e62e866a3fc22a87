"""bench/stop_matcher.py runs end to end (its fast setting, few rows): both ways of building the
stop matcher time a rollout call, and the figures it reports are finite."""

from __future__ import annotations

import math

import pytest

from tests.helpers.runs import run_bench


@pytest.mark.slow
def test_stop_matcher_bench_smoke(tmp_path):
    proc, r = run_bench("stop_matcher.py", tmp_path / "stop_matcher.json", "--settings", "fast", "--rows", "8", "--reps", "1")
    fast = r["settings"]["fast"]
    assert fast["rows"] == 8 and len(fast["seconds"]["once"]) == len(fast["seconds"]["per_call"]) == 1
    assert r["vocab"] == 49152 and 0 < r["build_s_median"] < 60
    assert math.isfinite(fast["per_call_over_once"]) and fast["once_s_median"] > 0
