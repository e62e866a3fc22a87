"""Bad input: one clear line on stderr, exit code 2, and no run directory left behind."""

import pytest

from runners.rl_runner import main
from tests.helpers.runs import TINY


def run_bad(tmp_path, capsys, *overrides, cfg=TINY):
    out = tmp_path / "runs"
    code = main(["--cfg", str(cfg), f"output_dir={out}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not out.exists(), "a failed start must not leave a run directory"
    return err[-1]


def test_unknown_key(tmp_path, capsys):
    assert "unknown config key 'train.lrate'" in run_bad(tmp_path, capsys, "train.lrate=1")


def test_missing_config_file(tmp_path, capsys):
    assert "config file not found" in run_bad(tmp_path, capsys, cfg=tmp_path / "nope.yaml")


def test_buffer_not_divisible(tmp_path, capsys):
    assert "'train.buffer_size' (10) must be divisible" in run_bad(tmp_path, capsys, "train.buffer_size=10")


def test_missing_model_path(tmp_path, capsys):
    line = run_bad(tmp_path, capsys, f"model.name_or_path={tmp_path}/no_such_model")
    assert "no_such_model" in line


def test_broken_gguf(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    line = run_bad(tmp_path, capsys, f"model.name_or_path={bad}", f"model.cache_dir={tmp_path}/cache")
    assert "broken.gguf" in line


def test_missing_data_path(tmp_path, capsys):
    line = run_bad(tmp_path, capsys, "data.task=gsm8k", f"data.path={tmp_path}/missing.jsonl")
    assert "missing.jsonl" in line


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    good = '{"question": "What is 1 + 1?", "answer": "1 + 1 = 2 #### 2"}'
    data.write_text(good + "\n" + good.replace("1 + 1", "2 + 2").replace("#### 2", "#### 4") + "\n{not json\n")
    line = run_bad(tmp_path, capsys, "data.task=gsm8k", f"data.path={data}")
    assert f"{data}:3" in line


@pytest.mark.parametrize("override", ["rollout.top_p=0.95", "rollout.top_k=20"])
def test_truncated_sampling_refused(tmp_path, capsys, override):
    assert "full-vocabulary" in run_bad(tmp_path, capsys, override)


def test_prompt_longer_than_budget_is_refused(tmp_path, capsys):
    line = run_bad(tmp_path, capsys, "data.max_prompt_tokens=20")
    assert "'data.max_prompt_tokens' (20) is shorter than" in line


def test_delta_h_batch_below_two_is_refused(tmp_path, capsys):
    probes = "probes.probes=[{name: d, kind: delta_h, options: {batch_size: 1}}]"
    assert "batch_size (B_E) must be >= 2" in run_bad(tmp_path, capsys, probes)


def test_unknown_probe_kind_and_option_are_refused(tmp_path, capsys):
    assert "unknown probe kind 'nope'" in run_bad(tmp_path, capsys, "probes.probes=[{name: x, kind: nope}]")
    bad_opt = "probes.probes=[{name: d, kind: delta_h, options: {batchsize: 8}}]"
    assert "unknown option(s) ['batchsize']" in run_bad(tmp_path, capsys, bad_opt)


def test_ddp_is_freed_before_the_process_group_is_destroyed(tmp_path, monkeypatch):
    """DDP's reducer holds the process group; freed after destroy_process_group it destroys the
    group holding the GIL, which gloo's threads may wait for (a hang at exit seen in CI)."""
    import weakref

    from rl_training import trainer as trainer_module
    from runners import common

    alive, real_shutdown = [], common.dist.shutdown

    class TrackedDDP(trainer_module.DDP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.append(weakref.ref(self))

    def shutdown():
        assert alive and all(ref() is None for ref in alive), "DDP still alive when the process group is destroyed"
        real_shutdown()

    monkeypatch.setattr(trainer_module, "DDP", TrackedDDP)
    monkeypatch.setattr(common.dist, "shutdown", shutdown)
    monkeypatch.setenv("RL_TRAINING_FORCE_COLLECTIVES", "1")  # a 1-rank gloo group in memory: DDP, no port
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert main(["--cfg", str(TINY), f"output_dir={tmp_path}", "run_name=run", "train.total_steps=1",
                 "train.backend=gloo"]) == 0
