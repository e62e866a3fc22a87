"""Two ranks under torchrun (gloo) against one process on the same global batch."""

import json

import numpy as np
import pytest
import torch

from rl_training.config import load_config
from rl_training.dist import DistInfo
from rl_training.faults import RANK_STEP_ENV
from rl_training.session import build_session
from tests.helpers.runs import (
    TINY, adapter, run_cmd, run_in_process, run_torchrun, same_metrics, torchrun_cmd, train_log,
)

pytestmark = [pytest.mark.slow, pytest.mark.ports]

# Same global batch: 4 prompts × G=4 per step, drawn once and split over the ranks. Filtering
# is off because which groups a rank accepts depends on how prompts are split.
COMMON = ("train.total_steps=2", "train.buffer_size=16", "train.microbatch_size=4", "rollout.filter_groups=false")


def test_two_ranks_equal_one_process(tmp_path):
    two = run_torchrun(tmp_path / "two", 2, *COMMON, "rollout.prompts_per_round=2")
    one = run_in_process(tmp_path / "one", *COMMON, "rollout.prompts_per_round=4")
    a, b = adapter(two), adapter(one)
    assert a.keys() == b.keys()
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k), "the step must move the adapter"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # Cross-rank reduced metrics equal the one-process metrics.
    for ra, rb in zip(train_log(two), train_log(one), strict=True):
        keys = ["train/loss", "train/entropy", "rollout/reward_mean", "rollout/completion_len_mean", "train/grad_norm"]
        # fisher's cross-rank entries are sketched at two ranks: its own test below.
        probe_keys = [k for k in rb if k.startswith("probe/") and "/time" not in k and not k.startswith("probe/fisher/")]
        assert probe_keys, "cfg/tiny_test.yaml enables every probe kind"
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key
        # Two full runs reach θ_{k+1} through different float32 summation orders; SNIS ΔH is a
        # small difference of large entropies and amplifies that rounding (seen: 1e-4 to 2e-3
        # relative). The exact cross-rank check on one E-batch is the next test.
        snis = ("/true", "/true_se", "/true_df", "/true_tok", "/ratio", "/ess_frac")
        for key in probe_keys:
            if key.endswith("/sampler_gap_tok"):  # fp32 rounding of the decode, which batch composition changes
                assert 0 <= ra[key] < 1e-5 and 0 <= rb[key] < 1e-5, key
                continue
            rel = 1e-2 if key.endswith(snis) else 1e-5
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=1e-9), key
        for key in ("probe/gns/P", "probe/gns/sum_sq_groups", "probe/gns/g2", "probe/gns/s_w"):  # the reduced GNS sums
            assert ra[key] == pytest.approx(rb[key], rel=1e-6), key


def test_delta_h_two_ranks_equal_one_process_on_the_same_ebatch(tmp_path):
    """The logged δH₁ and ΔH_true of a 2-rank step equal one process's computation on the same
    E-batch, θ_k and θ_{k+1} (from the run's checkpoint): the cross-rank reduction is exact."""
    run = run_torchrun(tmp_path, 2, *COMMON, "rollout.prompts_per_round=2", "train.total_steps=1",
                       "checkpoint.save_every=1")
    (logged,) = train_log(run)
    cfg = load_config(run / "config.yaml")
    trainer = build_session(cfg, DistInfo()).trainer  # θ_0: the seeded LoRA init, as in the run
    theta_0 = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    probe = next(p for p in trainer.probes.probes if p.kind == "delta_h")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun workers (OMP_NUM_THREADS=1): same float32 kernels
    try:
        ebatch = probe.ebatches.sample(trainer.policy, step=1, spec=probe.spec)  # at θ_0, before the update
        trainer.load_checkpoint(run / "checkpoints" / "step_1")
        theta_1 = {n: p.detach().clone() for n, p in trainer.trainable.items()}
        probe.reset_stats()
        probe.measure(trainer.policy, theta_0, {n: theta_1[n] - theta_0[n] for n in theta_0}, ebatch, theta_new=theta_1)
        mine = probe.compute()
    finally:
        torch.set_num_threads(threads)
    for key in ("pred", "pred_se", "pred_stop", "true", "true_se", "ess_frac", "H", "H_se", "n", "prompts"):
        assert logged[f"probe/delta_h/{key}"] == pytest.approx(mine[key], rel=1e-6, abs=1e-12), key


def test_ranks_hold_identical_parameters_and_every_probe_runs_over_a_bf16_model(tmp_path):
    """The user's precision at two ranks: a bf16 base (LoRA in float32), every probe kind strict.
    The run compares every rank's LoRA parameters at the end (summary.json)."""
    run = run_torchrun(tmp_path, 2, *COMMON, "rollout.prompts_per_round=2", "model.dtype=bfloat16",
                       "probes.strict=true")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["rank_param_max_abs_diff"] == 0.0
    for row in train_log(run):
        probe = {k: v for k, v in row.items() if k.startswith("probe/")}
        assert {k.split("/")[1] for k in probe} == {"delta_h", "gns", "ess", "fisher"}, sorted(probe)
        assert all(np.isfinite(v) for v in probe.values()), probe
        d = lambda key: row[f"probe/delta_h/{key}"]  # noqa: E731
        assert d("theta_k_own_forward") == 0.0  # θ_k's values from the forward-mode pass, bf16 base too
        assert 0 < d("logp_gap_tok") < 1e-2  # the probe evaluates in float32, not in the model's bf16
        assert 0 < d("sampler_gap_tok") < 1e-2 and d("sampler_ess_frac") > 0.99  # a bf16 decode, weighted back
        assert abs(d("pred") - d("true")) < 4 * np.hypot(d("pred_se"), d("true_se")) and d("pred") != 0
        # the same estimand; Fisher's baseline is each rank's own E rows (probes/fisher.py)
        assert row["probe/fisher/pred"] == pytest.approx(d("pred"), rel=0.05)


def test_float16_at_two_ranks_trains_and_an_overflow_is_skipped_by_both(tmp_path):
    """Every probe kind over a float16 model (loss-scaled) at two ranks; then a scale that
    overflows: both ranks skip the update and drop the probes together (the gradients are
    synced when checked: a rank that went on alone would hang the next collective)."""
    run = run_torchrun(tmp_path / "ok", 2, *COMMON, "rollout.prompts_per_round=2", "model.dtype=float16",
                       "probes.strict=true")
    assert json.loads((run / "summary.json").read_text())["rank_param_max_abs_diff"] == 0.0
    for row in train_log(run):
        assert row["train/updates_skipped"] == 0.0 and row["train/loss_scale"] == 2.0**16
        probe = {k: v for k, v in row.items() if k.startswith("probe/")}
        assert {k.split("/")[1] for k in probe} == {"delta_h", "gns", "ess", "fisher"}, sorted(probe)
        assert all(np.isfinite(v) for v in probe.values()), probe
    run = run_torchrun(tmp_path / "overflow", 2, *COMMON, "rollout.prompts_per_round=2", "model.dtype=float16",
                       "probes.strict=true", f"train.loss_scale_init={2.0**100}")
    rows = train_log(run)
    assert [r["train/loss_scale"] for r in rows] == [2.0**99, 2.0**98]
    assert all(r["train/updates_skipped"] == 1.0 and not any(k.startswith("probe/") for k in r) for r in rows)
    assert all(float(t.abs().max()) == 0.0 for k, t in adapter(run).items() if "lora_B" in k)


def test_torchrun_resume_is_a_continuation(tmp_path):
    straight = run_torchrun(tmp_path / "a", 2, *COMMON, "rollout.prompts_per_round=2", "train.total_steps=4")
    half = run_torchrun(tmp_path / "b", 2, *COMMON, "rollout.prompts_per_round=2", "train.total_steps=2")
    run_cmd(torchrun_cmd(2, "resume_training.py", "--run-dir", str(half), "--additional-steps", "2"))
    a, b = adapter(straight), adapter(half)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, not just close
    for ra, rb in zip(train_log(straight), train_log(half), strict=True):
        assert same_metrics(ra, rb), (ra, rb)


def test_torchrun_restarts_from_latest_checkpoint_after_a_rank_dies(tmp_path):
    # Rank 1 is SIGKILLed when it starts step 3 (first attempt only); torchrun restarts both
    # workers, which find the run directory and resume from the step-2 checkpoint.
    overrides = (*COMMON, "rollout.prompts_per_round=2", "train.total_steps=4", "checkpoint.save_every=1")
    run = run_torchrun(tmp_path / "killed", 2, *overrides, env={RANK_STEP_ENV: "1:3"},
                       torchrun_args=("--max-restarts=1",))
    assert [r["step"] for r in train_log(run)] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    clean = run_torchrun(tmp_path / "clean", 2, *overrides)
    a, b = adapter(clean), adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_probe_failing_in_compute_on_one_rank_is_disabled_on_both(tmp_path):
    """Rank 1's compute() raises at step 1; rank 0's works. Both drop the probe at step 2's
    reduce, no collective hangs (the layouts stay equal), the other probe keeps logging."""
    trace = tmp_path / "trace.txt"
    probes = (f"probes.probes=[{{name: ess, kind: ess}}, {{name: flaky, kind: tests.helpers.toy_probes.ComputeFailsOnRank,"
              f" options: {{rank: 1, trace: '{trace}'}}}}]")
    out = tmp_path / "runs"
    run_cmd(torchrun_cmd(2, "rl_runner.py", "--cfg", str(TINY), f"output_dir={out}", "run_name=run", *COMMON,
                         "rollout.prompts_per_round=2", "train.total_steps=3", "probes.strict=false", probes), timeout=300)
    rows = train_log(out / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["probe/flaky/x"] == 2.0  # rank 0 computed step 1 from both ranks' sums
    for r in rows:
        assert "probe/ess/loss_ess" in r
    for r in rows[1:]:
        assert not any(k.startswith("probe/flaky/") for k in r), r["step"]
    ran = sorted(tuple(map(int, line.split())) for line in trace.read_text().splitlines())
    assert ran == [(0, 1), (0, 2), (1, 1)]  # rank 1 stopped after its failure, rank 0 after the reduce


def _rows_by_key(keys) -> dict:
    """(key, occurrence) -> row: the same sequence in a 2-rank and a 1-process run."""
    seen, out = {}, {}
    for i, k in enumerate(keys):
        seen[k] = seen.get(k, -1) + 1
        out[(k, seen[k])] = i
    return out


def _fisher_blocks_two_ranks_and_one(tmp_path, fisher: tuple, logs: list | None = None):
    """Per block (uu, ee): the 1-process kernel in the 2-rank run's row order, and both npz files;
    ``logs`` gets the two runs' logged rows (two ranks, then one process)."""
    two = run_torchrun(tmp_path / "two", 2, *COMMON, "rollout.prompts_per_round=2", *fisher)
    one = run_in_process(tmp_path / "one", *COMMON, "rollout.prompts_per_round=4", *fisher)
    if logs is not None:
        logs += [train_log(two)[0], train_log(one)[0]]
    z2, z1 = np.load(two / "fisher" / "step_1.npz"), np.load(one / "fisher" / "step_1.npz")
    for block, keys in (("uu", "u_ids"), ("ee", None)):
        k2 = z2[keys].tolist() if keys else z2["meta_e"][:, 2].tolist()
        k1 = z1[keys].tolist() if keys else z1["meta_e"][:, 2].tolist()
        m1 = _rows_by_key(k1)
        perm = [m1[key] for key in _rows_by_key(k2)]  # 2-rank row -> 1-process row
        yield block, z1[f"K_{block}"][np.ix_(perm, perm)], z1, z2


def test_fisher_exact_blocks_equal_one_process_and_sketched_ones_hold_their_variance(tmp_path):
    """Same-rank entries are exact (≤ 1e-6 of the kernel's scale); cross-rank entries are
    sketch inner products whose error is within 4 SD of (K_ii K_jj + K_ij²)/k. The training
    sequences' contributions c_j are exact at two ranks too (F is summed over the ranks, not
    sketched, and built with the baseline of every rank's E rows): δH₁ and Σ_j c_j are the one
    process's, and at Adam's first step they add up to δH₁ of the update (through sketches: off
    by ±20 % in a TRL run of this size)."""
    fisher = ("probes.probes=[{name: fisher, kind: fisher, options: {batch_size: 8, preconditioner: adam,"
              " sketch_dim: 256}}]", "train.total_steps=1")
    logs = []
    for block, K1, z1, z2 in _fisher_blocks_two_ranks_and_one(tmp_path, fisher, logs):
        K2, exact = z2[f"K_{block}"], z2[f"exact_{block}"]
        assert z1[f"exact_{block}"].all() and exact.any() and not exact.all()
        scale = np.abs(K1).max()
        assert np.abs(K2 - K1)[exact].max() <= 1e-6 * scale, block
        sd = np.sqrt((np.outer(np.diag(K1), np.diag(K1)) + K1 ** 2) / 256)
        z = ((K2 - K1) / sd)[~exact]
        assert np.abs(z).max() < 4, (block, np.abs(z).max())
        assert np.abs(z).mean() > 0.1, "cross-rank entries are sketched, not exact"
    for row in logs:
        assert row["probe/fisher/preconditioned"] == 1.0
        assert row["probe/fisher/contrib_ratio"] == pytest.approx(1.0, abs=1e-4)
    two, one = logs
    for key in ("pred", "contrib_sum"):
        assert two[f"probe/fisher/{key}"] == pytest.approx(one[f"probe/fisher/{key}"], rel=1e-5), key


def test_fisher_sketch_mode_at_two_ranks_is_the_one_process_sketch(tmp_path):
    """mode sketch: a sequence's sketch depends on its gradient and the step's seed only, so two
    ranks assemble the kernel one process does (fp32 rounding of differently batched passes),
    every entry marked sketched. The c_j meet F summed over both ranks, with the baseline of
    every rank's E rows: δH₁ and Σ_j c_j are the one process's (each rank's own F alone would give
    50 % of it; a baseline of each rank's own E rows moved it by 0.9 %)."""
    fisher = ("probes.probes=[{name: fisher, kind: fisher, options: {batch_size: 8, preconditioner: none,"
              " mode: sketch, sketch_factors: [4, 4]}}]", "train.total_steps=1")
    logs = []
    for block, K1, z1, z2 in _fisher_blocks_two_ranks_and_one(tmp_path, fisher, logs):
        assert not z1[f"exact_{block}"].any() and not z2[f"exact_{block}"].any()
        assert np.abs(z2[f"K_{block}"] - K1).max() <= 1e-4 * np.abs(K1).max(), block
    two, one = logs
    for key in ("pred", "contrib_sum"):
        assert two[f"probe/fisher/{key}"] == pytest.approx(one[f"probe/fisher/{key}"], rel=1e-5), key
