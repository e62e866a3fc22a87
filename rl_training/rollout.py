"""Rollouts: G samples per prompt, rewards, group advantages, filtering -> RolloutBatch.

Groups whose rewards are all equal have A ≡ 0 and carry no Dr-GRPO gradient; they are
dropped and sampling goes on, round by round, until every rank holds its quota of
``buffer_size / world_size`` sequences or ``max_rounds`` is reached (then the quota is
topped up with rejected, zero-advantage groups and a warning is logged). Ranks run the same
number of rounds because the difficulty scheduler must see the same updates everywhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from rl_training import dist, policy
from rl_training.algs.dr_grpo import group_advantages, group_has_signal
from rl_training.data.prompts import STOP_STRINGS
from rl_training.sampling import Completions, stable_seed

log = logging.getLogger(__name__)


@dataclass
class RolloutStats:
    """Local sums over every generated sequence of the step (accepted or not)."""

    rounds: int = 0
    sequences: int = 0
    groups: int = 0
    groups_rejected: int = 0
    underfilled_groups: int = 0
    reward_sum: float = 0.0
    pass_sum: float = 0.0
    format_sum: float = 0.0
    completion_tokens: int = 0
    completion_len_max: int = 0
    seconds: float = 0.0


@dataclass
class RolloutBatch:
    """The sequences one rank trains on in one optimizer step, group by group."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, L] right-padded
    completion_mask: torch.Tensor  # [N, L]
    rewards: torch.Tensor  # [N] float32
    advantages: torch.Tensor  # [N] float32, r − group mean
    group_index: torch.Tensor  # [N] int64, group of each sequence (0 .. N/G − 1)
    record_ids: list[str]  # [N] stable prompt ids
    prompts: list[str]  # [N] prompt texts
    texts: list[str]  # [N] completion texts
    breakdowns: list[dict]  # [N] reward breakdowns
    old_logp: torch.Tensor | None = None  # [N, L] behaviour log-probs when ppo_epochs > 1
    ref_logp: torch.Tensor | None = None  # [N, L] reference (LoRA off) log-probs when kl_beta > 0
    sampler_logp: torch.Tensor | None = None  # [N, L] log π_T of each token as the sampler computed it
    stats: RolloutStats = field(default_factory=RolloutStats)

    def __len__(self) -> int:
        return self.rewards.numel()

    @property
    def tensors(self) -> policy.TokenBatch:
        return policy.TokenBatch(self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask)

    def select(self, idx: slice) -> RolloutBatch:
        """Rows ``idx`` (a microbatch), trimmed of all-padding columns."""
        p, pm, c, cm = policy.trim(*self.tensors.rows(idx))
        width = c.shape[1]
        cut = lambda t: None if t is None else t[idx, :width]  # noqa: E731
        return RolloutBatch(
            p, pm, c, cm, self.rewards[idx], self.advantages[idx], self.group_index[idx],
            self.record_ids[idx], self.prompts[idx], self.texts[idx], self.breakdowns[idx],
            old_logp=cut(self.old_logp), ref_logp=cut(self.ref_logp), sampler_logp=cut(self.sampler_logp),
            stats=self.stats,
        )


@dataclass
class _Group:
    record_id: str
    prompt: str
    completions: Completions  # G rows
    rewards: torch.Tensor  # [G]
    breakdowns: list[dict]


def _pad_cat(tensors: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
        out.append(torch.cat([pad, t] if left else [t, pad], dim=1))
    return torch.cat(out, dim=0)


def _assemble(groups: list[_Group], group_size: int, pad_id: int, stats: RolloutStats) -> RolloutBatch:
    comps = [g.completions for g in groups]
    rewards = torch.cat([g.rewards for g in groups])
    return RolloutBatch(
        prompt_ids=_pad_cat([c.prompt_ids for c in comps], pad_id, left=True),
        prompt_mask=_pad_cat([c.prompt_mask for c in comps], 0, left=True),
        completion_ids=_pad_cat([c.completion_ids for c in comps], pad_id, left=False),
        completion_mask=_pad_cat([c.completion_mask for c in comps], 0, left=False),
        rewards=rewards,
        advantages=group_advantages(rewards, group_size),
        group_index=torch.arange(len(groups)).repeat_interleave(group_size),
        record_ids=[g.record_id for g in groups for _ in range(group_size)],
        prompts=[g.prompt for g in groups for _ in range(group_size)],
        texts=[t for c in comps for t in c.texts],
        breakdowns=[b for g in groups for b in g.breakdowns],
        stats=stats,
        sampler_logp=_pad_cat([c.logp for c in comps], 0, left=False),
    )


def generate_groups(engine, records, prompt_fn, reward_fn, cfg, *, seed_parts: tuple) -> list[_Group]:
    """G completions for each record, scored; generation runs in chunks of whole groups."""
    G = cfg.rollout.group_size
    per_call = max(1, cfg.rollout.generation_batch_size // G)
    groups = []
    for s in range(0, len(records), per_call):
        chunk = records[s : s + per_call]
        prompts = [prompt_fn(r.question) for r in chunk]
        comps = engine.generate(
            [p for p in prompts for _ in range(G)],
            [stable_seed(*seed_parts, r.id, j) for r in chunk for j in range(G)],
            max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            stop_strings=STOP_STRINGS,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
        )
        for k, (record, prompt) in enumerate(zip(chunk, prompts)):
            rows = slice(k * G, (k + 1) * G)
            scored = [reward_fn(t, record.gold) for t in comps.texts[rows]]
            groups.append(
                _Group(
                    record_id=record.id,
                    prompt=prompt,
                    completions=comps.rows(rows),
                    rewards=torch.tensor([b.reward for b in scored], dtype=torch.float32),
                    breakdowns=[b.to_dict() for b in scored],
                )
            )
    return groups


def collect(engine, scheduler, prompt_fn, reward_fn, cfg, *, step: int, world: dist.DistInfo) -> RolloutBatch:
    """Sample, score and filter until this rank holds buffer_size / world_size sequences."""
    G = cfg.rollout.group_size
    quota_groups = cfg.train.buffer_size // world.world_size // G
    stats = RolloutStats()
    accepted: list[_Group] = []
    rejected: list[_Group] = []
    t0 = time.perf_counter()
    for round_ in range(cfg.rollout.max_rounds):
        records = scheduler.sample(cfg.rollout.prompts_per_round, world.rank, world.world_size)
        pass_rates: dict[str, float] = {}
        if len(accepted) < quota_groups:
            stats.rounds += 1
            groups = generate_groups(
                engine, records, prompt_fn, reward_fn, cfg,
                seed_parts=(cfg.seed, "rollout", step, round_),
            )
            for g in groups:
                keep = not cfg.rollout.filter_groups or bool(group_has_signal(g.rewards, G).item())
                (accepted if keep and len(accepted) < quota_groups else rejected).append(g)
                _add_group_stats(stats, g, rejected=not keep)
                pass_rates[g.record_id] = sum(b["answer_ok"] for b in g.breakdowns) / G
        # One collective a round: the scheduler update and whether every rank is done.
        gathered = world.all_gather_object((pass_rates, len(accepted) >= quota_groups))
        scheduler.update({k: v for rates, _ in gathered for k, v in rates.items()})
        if all(done for _, done in gathered):
            break
    if len(accepted) < quota_groups:
        missing = quota_groups - len(accepted)
        log.warning(
            "rank %d step %d: only %d of %d groups had reward variance after %d rounds; "
            "topping up with %d zero-advantage groups (raise rollout.max_rounds)",
            world.rank, step, len(accepted), quota_groups, stats.rounds, missing,
        )
        stats.underfilled_groups = missing
        accepted += rejected[-missing:]
    stats.seconds = time.perf_counter() - t0
    batch = _assemble(accepted, G, engine.tokenizer.pad_token_id, stats)
    # validate() guarantees both; the loss divides by the full buffer_size whatever we return.
    quota = cfg.train.buffer_size // world.world_size
    assert len(batch) == quota, f"rank {world.rank} collected {len(batch)} sequences, not the {quota} of its quota"
    return batch


def _add_group_stats(stats: RolloutStats, g: _Group, rejected: bool) -> None:
    lengths = g.completions.completion_mask.sum(dim=1)
    stats.sequences += len(g.breakdowns)
    stats.groups += 1
    stats.groups_rejected += int(rejected)
    stats.reward_sum += float(g.rewards.sum())
    stats.pass_sum += sum(float(b["answer_ok"]) for b in g.breakdowns)
    stats.format_sum += sum(float(b["format_ok"]) for b in g.breakdowns)
    stats.completion_tokens += int(lengths.sum())
    stats.completion_len_max = max(stats.completion_len_max, int(lengths.max()))


def add_logprobs(model, batch: RolloutBatch, cfg) -> None:
    """Behaviour (ppo_epochs > 1) and reference (kl_beta > 0) log-probs, no grad."""
    T, mb = cfg.rollout.temperature, cfg.train.microbatch_size
    if cfg.train.ppo_epochs > 1:
        batch.old_logp, _ = policy.score(model, batch.tensors, T, mb)
    if cfg.train.kl_beta > 0:
        with model.disable_adapter():
            batch.ref_logp, _ = policy.score(model, batch.tensors, T, mb)
