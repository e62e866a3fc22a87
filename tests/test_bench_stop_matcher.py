"""bench/stop_matcher.py runs end to end (its fast setting, few rows): both ways of building the
stop matcher time a rollout call, and the figures it reports are finite."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO


@pytest.mark.slow
def test_stop_matcher_bench_smoke(tmp_path):
    out = tmp_path / "stop_matcher.json"
    cmd = [sys.executable, "bench/stop_matcher.py", "--settings", "fast", "--rows", "8", "--reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    fast = r["settings"]["fast"]
    assert fast["rows"] == 8 and len(fast["seconds"]["once"]) == len(fast["seconds"]["per_call"]) == 1
    assert r["vocab"] == 49152 and 0 < r["build_s_median"] < 60
    assert math.isfinite(fast["per_call_over_once"]) and fast["once_s_median"] > 0
