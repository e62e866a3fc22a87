import dataclasses
import re
from pathlib import Path

import pytest

import rl_training.config as C
from probes.manager import registered_kinds, resolve_kind
from rl_training.config import grad_accum, load_config, parse_overrides, validate
from rl_training.errors import ConfigError

CFG = Path(__file__).resolve().parents[1] / "cfg"


@pytest.mark.parametrize("name", ["tiny_test.yaml", "smollm2_cpu_demo.yaml", "qwen2_5_1_5b_gsm8k_2xh100.yaml"])
def test_shipped_configs_validate(name):
    load_config(CFG / name)


def test_qwen_config_is_the_original_setting():
    cfg = load_config(CFG / "qwen2_5_1_5b_gsm8k_2xh100.yaml")
    assert (cfg.train.buffer_size, cfg.train.microbatch_size, cfg.train.lr) == (256, 4, 1e-6)
    assert cfg.rollout.max_new_tokens == 200 and cfg.model.dtype == "bfloat16"
    assert grad_accum(cfg, 2) == 32


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'train.learning_rate'"):
        load_config(f)


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError, match="'rollout.top_q'"):
        load_config(CFG / "tiny_test.yaml", ["rollout.top_q=0.5"])


def test_wrong_type_names_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  total_steps: many\n")
    with pytest.raises(ConfigError, match="'train.total_steps' must be int"):
        load_config(f)
    with pytest.raises(ConfigError, match="'logging.progress_bar' must be true/false"):
        load_config(CFG / "tiny_test.yaml", ["logging.progress_bar=3"])


def test_overrides_are_typed_and_ints_accepted_for_floats():
    cfg = load_config(CFG / "tiny_test.yaml", ["train.lr=1e-4", "train.eps_high=1", "model.lora.target_modules=[q_proj]"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.eps_high, float)
    assert cfg.model.lora.target_modules == ["q_proj"]
    assert parse_overrides(["a.b=[1, 2]", "c=null"]) == [("a.b", [1, 2]), ("c", None)]
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_truncated_sampling_is_refused():
    with pytest.raises(ConfigError, match="rollout.top_p"):
        load_config(CFG / "tiny_test.yaml", ["rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match="rollout.top_k"):
        load_config(CFG / "tiny_test.yaml", ["rollout.top_k=50"])


def test_sampler_correction_mode_and_clip_range_are_checked():
    cfg = load_config(CFG / "tiny_test.yaml", ["train.sampler_correction=sequence_mask", "train.sampler_clip_max=3"])
    assert cfg.train.sampler_correction == "sequence_mask" and cfg.train.sampler_clip_max == 3.0
    with pytest.raises(ConfigError, match=r"'train.sampler_correction' must be none\|token_truncate\|.*got 'tis'"):
        load_config(CFG / "tiny_test.yaml", ["train.sampler_correction=tis"])
    with pytest.raises(ConfigError, match=r"'train.sampler_clip_min' \(2.0\) must be >= 0 and below .* \(2.0\)"):
        load_config(CFG / "tiny_test.yaml", ["train.sampler_clip_min=2"])


def test_float16_and_its_loss_scale_are_checked():
    cfg = load_config(CFG / "tiny_test.yaml", ["model.dtype=float16", "train.loss_scale_init=1024"])
    assert cfg.model.dtype == "float16" and cfg.train.loss_scale_init == 1024.0
    with pytest.raises(ConfigError, match=r"'model.dtype' must be float32\|bfloat16\|float16\|float64, got 'half'"):
        load_config(CFG / "tiny_test.yaml", ["model.dtype=half"])
    with pytest.raises(ConfigError, match="'train.loss_scale_init' must be a power of two .*got 1000"):
        load_config(CFG / "tiny_test.yaml", ["train.loss_scale_init=1000"])


def test_buffer_not_divisible_is_an_error():
    cfg = load_config(CFG / "tiny_test.yaml", ["train.buffer_size=12"])
    with pytest.raises(ConfigError, match="train.buffer_size.*divisible"):
        grad_accum(cfg, 2)


def test_each_rank_holds_whole_prompt_groups():
    # 8 sequences over 4 ranks is 2 per rank: half a group of 4 (today: floor division gave
    # every rank zero groups, and the loss still divided by the full N).
    cfg = load_config(CFG / "tiny_test.yaml", ["train.microbatch_size=2"])
    validate(cfg, 1)
    with pytest.raises(ConfigError, match=r"^'train.buffer_size' \(8\) / world_size \(4\) = 2 .*rollout.group_size \(4\)"):
        validate(cfg, 4)


def test_sampling_rounds_must_be_able_to_fill_the_buffer():
    # 1 prompt × 1 round × G=4 is 4 sequences: at most half of this rank's 8, even with top-up.
    cfg = load_config(CFG / "tiny_test.yaml", ["rollout.prompts_per_round=1", "rollout.max_rounds=1"])
    with pytest.raises(ConfigError, match=r"^'rollout.max_rounds' \(1\) × rollout.prompts_per_round \(1\) × "
                                          r"rollout.group_size \(4\) = 4 sequences cannot fill"):
        validate(cfg, 1)
    validate(load_config(CFG / "tiny_test.yaml", ["rollout.prompts_per_round=1", "rollout.max_rounds=2"]), 1)


@pytest.mark.parametrize("micro, ok", [(1, True), (2, True), (4, True), (8, True), (3, False), (6, False)])
def test_microbatches_hold_whole_groups_or_split_one_group(micro, ok):
    overrides = [f"train.microbatch_size={micro}", "train.buffer_size=24", "rollout.group_size=4",
                 "rollout.prompts_per_round=6"]
    if ok:
        load_config(CFG / "tiny_test.yaml", overrides)
    else:
        with pytest.raises(ConfigError, match=rf"^'train.microbatch_size' \({micro}\) must be a multiple or a divisor "
                                              r"of rollout.group_size \(4\)"):
            load_config(CFG / "tiny_test.yaml", overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config("nope.yaml")


# Keys read only to refuse any value but the default (a TRL habit that would change the policy).
PINNED = {"RolloutConfig.top_p", "RolloutConfig.top_k"}


def test_every_config_key_is_read_outside_the_config():
    """The research code had keys that were parsed and never used (KL "enabled", never added to
    the loss): each field is read as an attribute somewhere in the package, or pinned above."""
    repo = CFG.parent
    code = "\n".join(p.read_text() for pkg in ("rl_training", "probes", "runners") for p in (repo / pkg).rglob("*.py")
                     if p.name != "config.py")
    sections = [c for c in vars(C).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    assert len(sections) >= 9
    unread = {f"{c.__name__}.{f.name}" for c in sections for f in dataclasses.fields(c)
              if not re.search(rf"\.{f.name}\b", code)}
    assert unread == PINNED


def test_every_probe_option_is_read():
    repo = CFG.parent
    for kind in registered_kinds():
        module = __import__(resolve_kind(kind).__module__, fromlist=["OPTIONS"])
        source = (repo / "probes" / "ebatch.py").read_text() + Path(module.__file__).read_text()
        source = re.sub(r"^OPTIONS = \{.*?\}\n", "", source, flags=re.S | re.M)  # not the declaration itself
        for option in getattr(module, "OPTIONS", ()):
            assert re.search(rf"(\.get\(|\[)\"{option}\"", source), f"{kind}: option {option!r} is never read"
