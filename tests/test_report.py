"""rl-report on a short tiny run: every PNG is an image, and its series are the log's."""

import json

import matplotlib.image
import pytest

from runners.eval_batch import main as eval_main
from runners.report import main
from tests.helpers.runs import run_in_process, train_log


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = run_in_process(tmp_path_factory.mktemp("report"), "train.total_steps=3", "checkpoint.save_every=1",
                         "probes.probes=[{name: delta_h, kind: delta_h, options: {batch_size: 8}}, {name: gns, kind: gns},"
                         " {name: ess, kind: ess}, {name: fisher, kind: fisher, every_n_steps: 2, options: {batch_size: 8}}]")
    assert eval_main(["--run-dir", str(run), "--num-samples", "2", "--steps", "1,3", "--quiet"]) == 0
    return run


def test_report_draws_the_logged_series(run):
    assert main(["--run-dir", str(run)]) == 0
    out = run / "report"
    drawn = json.loads((out / "series.json").read_text())
    assert set(drawn) == {"reward_entropy", "precision", "delta_h_delta_h", "gns_gns", "ess_ess", "fisher_fisher", "eval_test"}
    for name in drawn:
        img = matplotlib.image.imread(out / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0, name
    rows = train_log(run)
    assert drawn["reward_entropy"] == {"reward": 3, "pass rate": 3, "entropy / token (training batch)": 3}
    assert drawn["precision"] == {"mean / token": 3, "max": 3}  # float32: no loss scale
    assert drawn["delta_h_delta_h"]["δH₁ (predicted)"] == sum("probe/delta_h/pred" in r for r in rows) == 3
    assert drawn["delta_h_delta_h"]["H₀ + Σ δH₁"] == 3
    assert drawn["fisher_fisher"]["Σ_j c_j"] == 1, "fisher is due at step 2 only"
    assert drawn["ess_ess"]["loss weights"] == 3
    resolved = sum("probe/gns/b_simple" in r for r in rows)
    assert drawn["gns_gns"].get("B_simple (prompts)", 0) == resolved
    assert ("note" in drawn["gns_gns"]) == (resolved == 0), "an empty critical-batch panel says why"
    assert drawn["eval_test"]["pass@1"] == 2 and drawn["eval_test"]["pass@2"] == 2 and "pass@4" not in drawn["eval_test"]
    page = (out / "report.html").read_text()
    assert all(f'src="{name}.png"' in page for name in drawn) and "reward" in page and "δH₁ (step 3)" in page
    assert list((run / "tensorboard").glob("*.layout")), "the custom-scalars layout"


def test_a_float16_run_shows_its_loss_scale_and_skipped_updates(tmp_path):
    rows = [{"step": s, "rollout/logp_mismatch_tok": 0.005, "rollout/logp_mismatch_max": 0.06,
             "train/loss_scale": scale, "train/updates_skipped": skipped}
            for s, scale, skipped in ((1, 2.0**15, 1.0), (2, 2.0**15, 0.0), (3, 2.0**14, 1.0))]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--run-dir", str(tmp_path)]) == 0
    drawn = json.loads((tmp_path / "report" / "series.json").read_text())
    assert drawn["precision"] == {"mean / token": 3, "max": 3, "loss scale after the step": 3, "update skipped": 2}


def test_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
