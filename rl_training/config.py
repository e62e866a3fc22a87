"""Typed run configuration: YAML file + dotted ``key=value`` overrides.

Every key is a dataclass field; an unknown key or a value of the wrong type is a
``ConfigError`` naming the key (and the file it came from). ``validate`` checks the
cross-field rules (divisibility of the buffer, full-vocabulary sampling, ...), so a config
that loads is a config that can run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rl_training.algs.dr_grpo import SAMPLER_CORRECTIONS
from rl_training.errors import ConfigError


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-random"  # hub id | local dir | .gguf | smollm2-135m-instruct | tiny-random
    dtype: str = "float32"  # float32 | bfloat16 | float16 (trained with loss scaling) | float64
    # the lm_head's output in float32 (a bf16 model's logits unrounded; models.set_float32_logits)
    float32_logits: bool = False
    cache_dir: str | None = None  # where converted GGUF models live
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    task: str = "arithmetic"  # arithmetic | gsm8k
    path: str | None = None  # local GSM8K jsonl; None with task=gsm8k means the hub
    split: str = "train"
    num_records: int | None = None
    level: int = 1  # arithmetic difficulty, 1..5
    eval_fraction: float = 0.1  # held-out prompts for E-batches (probes), disjoint from training
    reward: str = "flexible"  # strict | flexible | dotted.path.to.function
    use_chat_template: bool = True
    max_prompt_tokens: int = 256


@dataclass
class SchedulerConfig:
    ema_decay: float = 0.7
    hard_threshold: float = 0.2
    easy_threshold: float = 0.8
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.3])  # hard, normal, easy


@dataclass
class RolloutConfig:
    group_size: int = 4  # G samples per prompt
    prompts_per_round: int = 4  # per rank, per sampling round
    max_new_tokens: int = 64  # also L_budget, the loss normaliser
    temperature: float = 1.0  # part of the policy: log-probs are computed from logits / T
    top_p: float = 1.0  # must stay 1.0: probes need the full-vocabulary policy
    top_k: int = 0  # must stay 0 (off)
    filter_groups: bool = True  # drop groups whose rewards are all equal
    max_rounds: int = 8  # sampling rounds per step before training on what was accepted
    generation_batch_size: int = 16  # sequences per generate() call
    merge_lora: str = "auto"  # always | never | auto (merged for a GPU model): decode with LoRA merged (rl_training/engine.py)
    # always | never | auto (on a GPU): static KV cache + compiled forward (CUDA graphs). "never"
    # until bench/gpu_step.py has measured it on a GPU: compiling costs minutes per new shape.
    compile_decode: str = "never"
    compile_backend: str = "inductor"  # torch.compile backend of compile_decode ("eager": trace only, for tests)


@dataclass
class TrainConfig:
    total_steps: int = 4
    buffer_size: int = 8  # accepted sequences per optimizer step, global over ranks
    microbatch_size: int = 4  # sequences per forward/backward, per rank
    ppo_epochs: int = 1
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "const"  # const | cosine
    warmup_steps: int = 0
    grad_clip: float = 1.0  # <= 0 disables
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_beta: float = 0.0  # k3 KL to the base model (LoRA disabled); added only when > 0
    # Importance weights π_trainer/π_sampler on the loss (rollout-training mismatch;
    # algs/dr_grpo.sampler_weights): none | token_truncate | token_mask | sequence_truncate | sequence_mask
    sampler_correction: str = "none"
    sampler_clip_min: float = 0.0  # weights below are raised to it (truncate) or zeroed (mask)
    sampler_clip_max: float = 2.0  # weights above are cut to it (truncate) or zeroed (mask); verl's default
    backend: str = "auto"  # auto | gloo | nccl
    loss_scale_init: float = 65536.0  # model.dtype float16: the first loss scale, a power of two (loss_scale.py)


@dataclass
class LoggingConfig:
    rollout_fraction: float = 1.0  # fraction of completions written to logs/rollouts.jsonl
    rollout_gzip: bool = False
    text_samples: int = 2  # completions per step shown in TensorBoard as text
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    save_every: int = 0  # steps between checkpoints; 0: only at the end and on SIGTERM/SIGINT
    keep_last_n: int = 3  # 0 keeps every checkpoint


@dataclass
class ProbeSpec:
    name: str = ""
    kind: str = ""
    every_n_steps: int = 1
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbesConfig:
    strict: bool = False  # re-raise probe errors (tests) instead of disabling the probe
    probes: list[ProbeSpec] = field(default_factory=list)


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = "runs"  # runs/run_<timestamp>/ is created below it
    run_name: str | None = None  # overrides run_<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads "1e-5" without a dot as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be an int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{where}: unknown config key '{dotted}' (valid: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], dotted, where)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-5", "model.lora.target_modules=[q_proj]"]`` -> typed YAML values."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML file (or the defaults when ``path`` is None), apply overrides, validate."""
    tree: dict = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    if overrides:
        where = f"{where} + overrides"
    cfg = _build(RunConfig, tree, "", where)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict, where: str = "config") -> RunConfig:
    cfg = _build(RunConfig, tree, "", where)
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {msg}")


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Cross-field rules. ``world_size`` (known only at launch) adds the divisibility rule."""
    m, d, r, t = cfg.model, cfg.data, cfg.rollout, cfg.train
    _check(m.dtype in ("float32", "bfloat16", "float16", "float64"), "model.dtype",
           f"must be float32|bfloat16|float16|float64, got {m.dtype!r}")
    _check(m.lora.r > 0, "model.lora.r", "must be > 0")
    _check(0.0 <= m.lora.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)")
    _check(len(m.lora.target_modules) > 0, "model.lora.target_modules", "must name at least one module")
    _check(d.task in ("arithmetic", "gsm8k"), "data.task", f"must be arithmetic|gsm8k, got {d.task!r}")
    _check(d.reward in ("strict", "flexible", "length_parity") or "." in d.reward, "data.reward",
           f"must be strict|flexible|length_parity or a dotted path module.function, got {d.reward!r}")
    _check(1 <= d.level <= 5, "data.level", "must be in 1..5")
    _check(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
    _check(d.num_records is None or d.num_records > 0, "data.num_records", "must be > 0")
    _check(len(cfg.scheduler.weights) == 3, "scheduler.weights", "must list 3 weights: hard, normal, easy")
    _check(r.group_size >= 2, "rollout.group_size", "must be >= 2 (the group mean is the baseline)")
    _check(r.prompts_per_round >= 1, "rollout.prompts_per_round", "must be >= 1")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature", "must be > 0")
    _check(r.top_p == 1.0, "rollout.top_p", "must be 1.0: the probes need the full-vocabulary policy (use temperature)")
    _check(r.top_k == 0, "rollout.top_k", "must be 0 (off): the probes need the full-vocabulary policy (use temperature)")
    _check(r.merge_lora in ("auto", "always", "never"), "rollout.merge_lora", f"must be auto|always|never, got {r.merge_lora!r}")
    _check(r.compile_decode in ("auto", "always", "never"), "rollout.compile_decode",
           f"must be auto|always|never, got {r.compile_decode!r}")
    _check(r.max_rounds >= 1, "rollout.max_rounds", "must be >= 1")
    _check(r.generation_batch_size >= 1, "rollout.generation_batch_size", "must be >= 1")
    _check(t.total_steps >= 1, "train.total_steps", "must be >= 1")
    _check(t.microbatch_size >= 1, "train.microbatch_size", "must be >= 1")
    # Whole groups per microbatch, or one group over consecutive microbatches: per-group
    # statistics (GNS) accumulate a group while its rows are in hand.
    _check(t.microbatch_size % r.group_size == 0 or r.group_size % t.microbatch_size == 0, "train.microbatch_size",
           f"({t.microbatch_size}) must be a multiple or a divisor of rollout.group_size ({r.group_size}): "
           "a microbatch holds whole prompt groups, or a group spans consecutive microbatches")
    _check(t.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")
    _check(t.lr >= 0, "train.lr", "must be >= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1)")
    _check(t.schedule in ("const", "cosine"), "train.schedule", f"must be const|cosine, got {t.schedule!r}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(t.eps_low >= 0 and t.eps_high >= 0, "train.eps_low", "and eps_high must be >= 0")
    _check(t.kl_beta >= 0, "train.kl_beta", "must be >= 0")
    _check(t.sampler_correction in SAMPLER_CORRECTIONS, "train.sampler_correction",
           f"must be {'|'.join(SAMPLER_CORRECTIONS)}, got {t.sampler_correction!r}")
    _check(0.0 <= t.sampler_clip_min < t.sampler_clip_max, "train.sampler_clip_min",
           f"({t.sampler_clip_min}) must be >= 0 and below train.sampler_clip_max ({t.sampler_clip_max})")
    _check(t.loss_scale_init > 0 and math.log2(t.loss_scale_init).is_integer(), "train.loss_scale_init",
           f"must be a power of two (scaling by it is exact), got {t.loss_scale_init}")
    _check(t.backend in ("auto", "gloo", "nccl"), "train.backend", f"must be auto|gloo|nccl, got {t.backend!r}")
    _check(0.0 <= cfg.logging.rollout_fraction <= 1.0, "logging.rollout_fraction", "must be in [0, 1]")
    _check(cfg.checkpoint.save_every >= 0, "checkpoint.save_every", "must be >= 0")
    _check(cfg.checkpoint.keep_last_n >= 0, "checkpoint.keep_last_n", "must be >= 0")
    names = [p.name for p in cfg.probes.probes]
    for i, p in enumerate(cfg.probes.probes):
        _check(bool(p.name) and bool(p.kind), f"probes.probes[{i}]", "needs a name and a kind")
        _check(p.every_n_steps >= 1, f"probes.probes[{i}].every_n_steps", "must be >= 1")
    _check(len(set(names)) == len(names), "probes.probes", f"has duplicate names: {names}")
    if world_size is not None:
        grad_accum(cfg, world_size)
        _check_rank_quota(cfg, world_size)


def _check_rank_quota(cfg: RunConfig, world_size: int) -> None:
    """Each rank trains on buffer_size / world_size sequences of whole groups (the loss divides
    by the full N), and its sampling rounds can produce that many, top-up included."""
    r, per_rank = cfg.rollout, cfg.train.buffer_size // world_size
    _check(per_rank % r.group_size == 0, "train.buffer_size",
           f"({cfg.train.buffer_size}) / world_size ({world_size}) = {per_rank} sequences per rank is not a multiple "
           f"of rollout.group_size ({r.group_size}): each rank trains on whole prompt groups")
    most = r.max_rounds * r.prompts_per_round * r.group_size
    _check(most >= per_rank, "rollout.max_rounds",
           f"({r.max_rounds}) × rollout.prompts_per_round ({r.prompts_per_round}) × rollout.group_size "
           f"({r.group_size}) = {most} sequences cannot fill train.buffer_size / world_size = {per_rank} per rank; "
           "raise one of them")


def grad_accum(cfg: RunConfig, world_size: int) -> int:
    """Microbatches per optimizer step on each rank: buffer / (world × microbatch)."""
    t = cfg.train
    per_step = world_size * t.microbatch_size
    if t.buffer_size % per_step:
        raise ConfigError(
            f"'train.buffer_size' ({t.buffer_size}) must be divisible by world_size × "
            f"train.microbatch_size ({world_size} × {t.microbatch_size} = {per_step})"
        )
    return t.buffer_size // per_step
