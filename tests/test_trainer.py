import json
import logging
import math

import pytest
import torch

from tests.helpers.runs import TINY, adapter, run_in_process, train_log


def test_tiny_run_trains_logs_and_saves(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=2")
    for name in ("config.yaml", "summary.json", "logs/train_log.jsonl", "logs/rollouts.jsonl", "final_adapter"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = train_log(run)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("train/loss", "train/entropy", "train/surprisal", "train/clip_frac", "train/kl", "train/grad_norm",
                "train/lr", "rollout/reward_mean", "rollout/pass_rate", "rollout/format_rate",
                "rollout/completion_len_mean", "rollout/completion_len_max", "rollout/groups_rejected_frac",
                "rollout/rounds", "time/step_s", "time/rollout_s", "time/tokens_per_s"):
        assert key in rows[0] and rows[0][key] is not None and math.isfinite(rows[0][key]), key
    # The summary carries each probe's last headline values.
    last = json.loads((run / "summary.json").read_text())["probes_last"]
    assert last["probe/delta_h/pred"] == rows[-1]["probe/delta_h/pred"] and "probe/ess/loss_ess_frac" in last
    # A full-vocabulary entropy of a near-uniform tiny model is close to log(vocab) and positive.
    assert 0 < rows[0]["train/entropy"] <= math.log(1024)
    # The LoRA B matrices start at zero; a step with nonzero advantages moves them.
    assert any(t.abs().sum() > 0 for k, t in adapter(run).items() if "lora_B" in k)
    rollouts = [json.loads(x) for x in (run / "logs" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 8
    assert {"prompt", "completion", "reward", "advantage", "format_ok", "answer_ok"} <= set(rollouts[0])
    # Accepted groups have reward variance, and advantages are r − group mean.
    by_group = {}
    for r in rollouts:
        by_group.setdefault((r["step"], r["group"]), []).append(r)
    for rows_g in by_group.values():
        mean = sum(r["reward"] for r in rows_g) / len(rows_g)
        assert len({r["reward"] for r in rows_g}) > 1
        for r in rows_g:
            assert abs(r["advantage"] - (r["reward"] - mean)) < 1e-6


def test_same_seed_same_run(tmp_path):
    a = adapter(run_in_process(tmp_path / "a", "train.total_steps=1"))
    b = adapter(run_in_process(tmp_path / "b", "train.total_steps=1"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kl_and_ppo_epochs_are_wired(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=2", "train.kl_beta=0.1", "train.ppo_epochs=2", "train.lr=0.05")
    first, second = train_log(run)
    # Step 1 starts at the reference (LoRA B = 0): KL is exactly 0; after a large step it is not.
    assert first["train/kl"] == 0 and second["train/kl"] > 0
    # The second PPO epoch is off-policy after a large step: the clip engages.
    assert first["train/clip_frac"] > 0


def _session(*overrides):
    from rl_training.config import load_config
    from rl_training.dist import DistInfo
    from rl_training.session import build_session
    from tests.helpers.runs import TINY

    return build_session(load_config(TINY, list(overrides)), DistInfo())


def test_lr_schedule_counts_trainer_steps_not_ppo_epochs(tmp_path):
    # Warmup factor (s + 1) / (warmup + 1) at trainer step s (0-based), then constant; the
    # scheduler used to advance once per PPO epoch, twice per step here.
    run = run_in_process(tmp_path, "train.total_steps=3", "train.ppo_epochs=2", "train.warmup_steps=2",
                         "train.lr=1e-3", "probes.probes=[]")
    assert [r["train/lr"] for r in train_log(run)] == [1e-3 * 1 / 3, 1e-3 * 2 / 3, 1e-3]


def test_scheduler_bucket_counts_are_logged_and_prompts_move_between_buckets(tmp_path):
    # Narrow "normal" so that a group's pass rate of 1/4 (or 3/4) moves its prompt to hard (easy).
    run = run_in_process(tmp_path, "train.total_steps=3", "probes.probes=[]", "scheduler.hard_threshold=0.4",
                         "scheduler.easy_threshold=0.6")
    counts = [(r["scheduler/hard"], r["scheduler/normal"], r["scheduler/easy"]) for r in train_log(run)]
    assert len({sum(c) for c in counts}) == 1, counts  # every train prompt is in one bucket
    # Every prompt starts "normal" (unseen); observed prompts leave it, to both sides.
    hard, normal, easy = zip(*counts)
    assert normal[0] < sum(counts[0]) and len(set(counts)) >= 2 and hard[-1] > 0 and easy[-1] > 0, counts


def test_collect_returns_exactly_the_rank_quota():
    from rl_training import rollout

    s = _session("probes.probes=[]")
    tr, cfg = s.trainer, s.cfg
    batch = rollout.collect(tr.engine, tr.scheduler, tr.prompt_fn, tr.reward_fn, cfg, step=1, world=s.world)
    assert len(batch) == cfg.train.buffer_size
    # One prompt in one round cannot fill 8 sequences (validate refuses such a config; the
    # assertion guards the invariant the loss normaliser relies on).
    cfg.rollout.prompts_per_round, cfg.rollout.max_rounds = 1, 1
    with pytest.raises(AssertionError, match="4 sequences, not the 8"):
        rollout.collect(tr.engine, tr.scheduler, tr.prompt_fn, tr.reward_fn, cfg, step=2, world=s.world)


def test_a_trainable_parameter_without_grad_does_not_crash_the_step():
    s = _session("probes.probes=[]", "train.grad_clip=0")
    tr = s.trainer
    unused = torch.nn.Parameter(torch.ones(3))  # trainable, outside the forward: never gets a grad
    tr.trainable["unused"] = unused
    out = tr.train_step()
    assert math.isfinite(out.metrics["train/grad_norm"]) and out.metrics["train/grad_norm"] > 0
    s.cfg.train.grad_clip = 1.0
    assert math.isfinite(tr.train_step().metrics["train/grad_norm"])
    assert unused.grad is None and torch.equal(unused.detach(), torch.ones(3))


def test_param_snapshot_is_taken_once_per_step_before_the_first_epoch():
    s = _session("probes.probes=[{name: snap, kind: tests.helpers.toy_probes.SnapshotProbe}]", "train.ppo_epochs=2",
                 "train.lr=1e-2")
    tr = s.trainer
    theta_k = {n: p.detach().clone() for n, p in tr.trainable.items()}
    out = tr.train_step()
    (probe,) = tr.probes.probes
    (step0, epoch0, snap0), (step1, epoch1, snap1) = probe.seen
    assert (step0, epoch0, step1, epoch1) == (1, 0, 1, 1)
    assert snap0 is snap1, "one snapshot per step, handed to every epoch"
    assert all(torch.equal(snap0[n], theta_k[n]) for n in theta_k)
    assert any(not torch.equal(p, theta_k[n]) for n, p in tr.trainable.items())
    assert out.metrics["probe/snap/time_s"] > 0


def test_a_step_reduces_trainer_and_probe_stats_in_one_sum_collective():
    s = _session()  # the tiny config's probes: delta_h (cat-stats), ess, gns (max-stats), fisher (a min-stat)
    tr = s.trainer
    calls = []

    class Spy:  # DistInfo is frozen: wrap it
        def __getattr__(self, name, world=tr.world):
            attr = getattr(world, name)
            if name.startswith("all_"):
                return lambda *a: (calls.append(name), attr(*a))[1]
            return attr

    tr.world = Spy()
    out = tr.train_step()
    # rollout: one all_gather_object of pass rates per round; before the update: fisher's
    # exchange in two rounds (its baseline totals, then F); reduce: sum, max, min, the cat-gather.
    rounds = int(out.metrics["rollout/rounds"])
    want = ["all_reduce_sum"] * 3 + ["all_reduce_max", "all_reduce_min"] + ["all_gather_object"] * (rounds + 1)
    assert sorted(calls) == sorted(want), calls
    assert out.metrics["rollout/completion_len_max"] > 0 and math.isfinite(out.metrics["train/loss"])
    assert out.metrics["probe/gns/P"] > 0 and "probe/delta_h/pred" in out.metrics


@pytest.mark.parametrize("merge", ["never", "always"])
def test_rollout_training_mismatch_is_logged_and_is_rounding_in_fp32(tmp_path, merge):
    # fp32, no dropout: the sampler's log π of each token and the loss forward's differ only by
    # float rounding (KV-cache decode vs full forward; with merge_lora, W + s·B·A rounded).
    run = run_in_process(tmp_path, "train.total_steps=1", "probes.probes=[]", f"rollout.merge_lora={merge}")
    row = train_log(run)[0]
    assert 0.0 <= row["rollout/logp_mismatch_tok"] < 1e-5, row["rollout/logp_mismatch_tok"]
    assert row["rollout/logp_mismatch_tok"] <= row["rollout/logp_mismatch_max"] < 1e-4


def test_a_bf16_run_with_float32_logits_trains_and_every_probe_measures(tmp_path):
    """model.float32_logits over a bf16 model: sampler, loss and probes all through the widened
    head (the mismatch it cuts is measured on a real model: bench/bf16_mismatch.py)."""
    rows = train_log(run_in_process(tmp_path, "train.total_steps=2", "model.dtype=bfloat16", "model.float32_logits=true",
                                    "probes.strict=true"))
    for r in rows:
        assert math.isfinite(r["rollout/logp_mismatch_tok"]) and math.isfinite(r["train/loss"])
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("probe/"))
    assert any(k.startswith("probe/delta_h/pred") for k in rows[-1]) and any(k.startswith("probe/gns/") for k in rows[-1])


def test_sampler_correction_weights_the_loss(tmp_path):
    """train.sampler_correction reaches the loss. In fp32 the sampler and the trainer agree to
    rounding: weights 1, the same loss as uncorrected; a clip range that every ratio misses
    masks every token: loss 0, no gradient."""
    common = ("train.total_steps=1", "probes.probes=[{name: ess, kind: ess}]")
    (plain,) = train_log(run_in_process(tmp_path / "plain", *common))
    (tis,) = train_log(run_in_process(tmp_path / "tis", *common, "train.sampler_correction=token_truncate"))
    assert "train/sampler_weight_mean" not in plain
    assert tis["train/sampler_weight_mean"] == pytest.approx(1.0, abs=1e-5) and tis["train/sampler_outside_frac"] == 0.0
    assert tis["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-4, abs=1e-9)
    assert tis["probe/ess/loss_ess"] == pytest.approx(plain["probe/ess/loss_ess"], rel=1e-4)
    (masked,) = train_log(run_in_process(tmp_path / "mask", *common, "train.sampler_correction=sequence_mask",
                                         "train.sampler_clip_min=5", "train.sampler_clip_max=6"))
    assert masked["train/sampler_outside_frac"] == 1.0 and masked["train/sampler_weight_mean"] == 0.0
    assert masked["train/loss"] == 0.0 and masked["train/grad_norm"] == 0.0
    assert masked["probe/ess/loss_ess"] is None  # every weight 0: ESS undefined (nan, logged as null)


FP16_PROBES = ("probes.probes=[{name: gns, kind: gns}, {name: ess, kind: ess}, {name: dh, kind: delta_h, options: {batch_size: 4}}, "
               "{name: fisher, kind: fisher, options: {batch_size: 4}}]")


def test_float16_training_does_not_depend_on_the_loss_scale(tmp_path):
    """Two loss scales 16× apart: the run reads the same to float16 rounding (a power-of-two
    scale is exact, but the float16 backward's subnormals are not). The GNS probe's captured
    rows carry S: not dividing them by S² would move its sums 256×."""
    common = ("train.total_steps=2", "model.dtype=float16", "probes.strict=true", FP16_PROBES)
    a = train_log(run_in_process(tmp_path / "a", *common, "train.loss_scale_init=1024"))
    b = train_log(run_in_process(tmp_path / "b", *common, "train.loss_scale_init=16384"))
    for ra, rb in zip(a, b):
        assert (ra["train/loss_scale"], rb["train/loss_scale"]) == (1024.0, 16384.0)
        assert ra["train/updates_skipped"] == rb["train/updates_skipped"] == 0.0
        assert ra["train/loss"] == rb["train/loss"]  # the same forward
        keys = ["train/grad_norm", "probe/gns/g2", "probe/gns/trS", "probe/gns/s_w_ema", "probe/ess/loss_ess",
                "probe/dh/pred", "probe/dh/true", "probe/fisher/pred"]
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=2e-3), k
        d = lambda key: ra[f"probe/dh/{key}"]  # noqa: E731
        assert abs(d("pred") - d("true")) < 4 * math.hypot(d("pred_se"), d("true_se")) and d("pred") != 0
        assert 0 < d("logp_gap_tok") < 1e-2 and d("sampler_ess_frac") > 0.99  # a float16 forward, the probe's float32


def test_float16_overflow_skips_the_update_and_the_probes_and_resumes_with_its_scale(tmp_path):
    from runners.resume_training import main as resume_main
    from tests.helpers.runs import adapter

    run = run_in_process(tmp_path, "train.total_steps=1", "model.dtype=float16", "probes.strict=true", FP16_PROBES,
                         f"train.loss_scale_init={2.0**100}")
    (row,) = train_log(run)
    assert row["train/updates_skipped"] == 1.0 and row["train/loss_scale"] == 2.0**99
    assert not any(k.startswith("probe/") for k in row)  # the due probes dropped the step
    assert all(float(t.abs().max()) == 0.0 for k, t in adapter(run).items() if "lora_B" in k)  # never updated
    assert resume_main(["--run-dir", str(run), "--additional-steps", "1"]) == 0
    assert train_log(run)[-1]["train/loss_scale"] == 2.0**98  # the checkpoint's scale, halved again


def test_sampler_correction_names_the_figures_that_leave_its_weights_out(caplog):
    from rl_training import dist
    from rl_training.config import load_config
    from rl_training.session import build_session

    cfg = load_config(TINY, ["train.sampler_correction=token_truncate"])  # tiny_test.yaml has every probe kind
    with caplog.at_level(logging.WARNING, logger="rl_training"):
        build_session(cfg, dist.DistInfo())
    (msg,) = [r.getMessage() for r in caplog.records if "sampler_correction" in r.getMessage()]
    assert "delta_h's cov_pred" in msg and "fisher's the c_j and contrib_ratio" in msg and "ess" not in msg
