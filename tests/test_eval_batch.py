"""rl-eval on a 2-checkpoint tiny run: the files and columns, resumability, torchrun = one process."""

import csv
import gzip
import json

import pytest

from runners.eval_batch import COLUMNS, METRICS, main
from tests.helpers.runs import run_cmd, run_in_process, torchrun_cmd

ARGS = ("--num-samples", "4", "--quiet")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_in_process(tmp_path_factory.mktemp("eval"), "train.total_steps=2", "checkpoint.save_every=1")


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_checkpoint_is_evaluated_and_consolidated(run_dir, tmp_path):
    out = tmp_path / "ev"
    assert main(["--run-dir", str(run_dir), "--output-dir", str(out), *ARGS]) == 0
    rows = _csv(out / "consolidated_metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert {m for m in METRICS} | {f"{m}_se" for m in METRICS} <= set(rows[0])
    per_q = _csv(out / "step_2" / "metrics.csv")
    assert list(per_q[0]) == list(COLUMNS) and len(per_q) == int(rows[1]["questions"]) > 1
    for q in per_q:
        assert int(q["n"]) == 4 and 0 <= float(q["pass@1"]) <= float(q["pass@2"]) <= float(q["pass@4"]) <= 1
        assert float(q["pass@1"]) == pytest.approx(float(q["answer_rate"]))
    with gzip.open(out / "step_2" / "records.jsonl.gz", "rt") as f:
        recs = [json.loads(x) for x in f]
    assert len(recs) == 4 * len(per_q) and {"id", "sample", "text", "breakdown", "length", "entropy_sum"} <= set(recs[0])
    meta = json.loads((out / "step_1" / "run_meta.json").read_text())
    assert meta["num_samples"] == 4 and meta["split"] == "test" and meta["step"] == 1
    # A second call does no work: nothing is rewritten.
    stamp = (out / "step_1" / "metrics.csv").stat().st_mtime_ns
    assert main(["--run-dir", str(run_dir), "--output-dir", str(out), *ARGS]) == 0
    assert (out / "step_1" / "metrics.csv").stat().st_mtime_ns == stamp
    # Other settings on the same folder are refused, not mixed in.
    assert main(["--run-dir", str(run_dir), "--output-dir", str(out), "--num-samples", "2", "--quiet"]) == 2


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path), "--quiet"]) == 2
    assert main(["--run-dir", str(run_dir), "--steps", "7", "--output-dir", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no config.yaml" in err[0] and "no checkpoint for step(s) [7]" in err[1]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.ports
def test_two_ranks_write_the_one_process_csv(run_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--run-dir", str(run_dir), "--steps", "2", "--output-dir", str(one), *ARGS]) == 0
    cmd = torchrun_cmd(2, "eval_batch.py", "--run-dir", str(run_dir), "--steps", "2", "--output-dir", str(two), *ARGS)
    run_cmd(cmd)
    for name in ("step_2/metrics.csv", "consolidated_metrics.csv"):
        a, b = _csv(one / name), _csv(two / name)
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):  # the same samples; entropies through other padding: float32 rounding
            assert ra.keys() == rb.keys()
            for k in ra:
                assert ra[k] == rb[k] or float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-5), (name, k)
    assert json.loads((two / "step_2" / "run_meta.json").read_text())["world_size"] == 2
