"""E-batches: unfiltered samples from π_θk of a probe's prompt pool, shared by the probes of a step.

An E-batch is n pool prompts drawn without replacement and k completions each, keyed by
(seed, step) only: independent of the training batch and of the number of ranks, each rank
holding whole prompts. Generation is the expensive part of a probe, so the probes of a step
that ask for the same ``EBatchSpec`` get the same E-batch, generated once
(``EBatchSource.get``); ``sample`` generates a fresh one (offline experiments).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch

from rl_training.data.prompts import STOP_STRINGS
from rl_training.engine import RidingEngine
from rl_training.errors import ConfigError
from rl_training.policy import TokenBatch
from rl_training.sampling import Completions, eos_token_ids, sample, stable_seed
from rl_training.stops import StopRule

POOLS = ("eval", "train")
SAMPLER_CORRECTIONS = ("per_decision", "none")


@dataclass(frozen=True)
class EBatchSpec:
    pool: str = "eval"  # eval: held-out prompts; train: the training prompts
    batch_size: int = 16  # B_E, sequences over all ranks
    per_prompt: int = 2  # k, completions per prompt


def spec_from_options(options: dict, batch_size: int) -> EBatchSpec:
    """A probe's ``pool``, ``batch_size`` and ``completions_per_prompt`` options (defaults: eval, the given B_E, 2)."""
    return EBatchSpec(str(options.get("pool", "eval")), int(options.get("batch_size", batch_size)),
                      int(options.get("completions_per_prompt", 2)))


def sampler_correction(options: dict, probe: str) -> str:
    """A probe's ``sampler_correction`` option (per_decision | none, default per_decision), checked:
    whether its estimates importance-weight the E-batch's decisions from the sampler back to π_θk."""
    value = options.get("sampler_correction", "per_decision")
    if value not in SAMPLER_CORRECTIONS:
        raise ConfigError(f"probe '{probe}': sampler_correction must be {'|'.join(SAMPLER_CORRECTIONS)}, got {value!r}")
    return value


@dataclass
class EBatch:
    completions: Completions | None  # this rank's rows (None: this rank holds no prompt)
    prompt: torch.Tensor  # [B] int64, pool index of each row

    @property
    def tensors(self) -> TokenBatch:
        c = self.completions
        return TokenBatch(c.prompt_ids, c.prompt_mask, c.completion_ids, c.completion_mask)

    def __len__(self) -> int:
        return len(self.prompt)

    def sampler_log_ratios(self, rows: slice, lp: torch.Tensor) -> torch.Tensor | None:
        """[b, w] float64 on ``lp``'s device: log π(y_t) − log π_sampler(y_t) of the rows ``rows``,
        with ``lp`` [b, w] the evaluated policy's log-probs of their tokens, from the log-prob the
        sampler reports for each token it drew (0 past a row's end); None when it reports none."""
        sampled = self.completions.logp
        if sampled is None:
            return None
        mask = self.completions.completion_mask[rows, : lp.shape[1]].to(lp.device, torch.float64)
        return (lp.detach().double() - sampled[rows, : lp.shape[1]].to(lp.device, torch.float64)) * mask


def ebatch_plan(pool_size: int, batch_size: int, per_prompt: int, seed: int, step: int) -> list[tuple[int, int]]:
    """(pool index, completion index) of the global E-batch: n = min(N, B_E // k) prompts drawn
    without replacement, B_E completions spread over them as evenly as possible."""
    n = min(pool_size, max(1, batch_size // per_prompt))
    prompts = random.Random(stable_seed(seed, "ebatch-prompts", step)).sample(range(pool_size), n)
    counts = [batch_size // n + (1 if p < batch_size % n else 0) for p in range(n)]
    return [(prompts[p], j) for p in range(n) for j in range(counts[p])]


class EBatchSource:
    """Samples E-batches for the probes of a run; ``generations`` counts calls that generated.

    ``stop_strings`` is part of the sampled policy (where a completion ends): the trainer's
    rollouts stop at ``STOP_STRINGS``; a host trainer that stops at EOS only passes ().
    """

    def __init__(self, cfg, world, tokenizer, prompt_fn, pools: dict[str, list],
                 stop_strings: tuple[str, ...] = STOP_STRINGS):
        self.cfg, self.world, self.tokenizer, self.prompt_fn = cfg, world, tokenizer, prompt_fn
        self.pools = pools
        self.stop_strings = tuple(stop_strings)
        self.generations = 0
        self._stop_rule: StopRule | None = None
        self._step: int | None = None
        self._cache: dict[EBatchSpec, EBatch] = {}

    def pool(self, spec: EBatchSpec) -> list:
        return self.pools[spec.pool]

    def stop_rule(self, model) -> StopRule:
        """The stop sets of this sampler's completions (built once: it decodes the vocabulary)."""
        if self._stop_rule is None:
            self._stop_rule = StopRule(self.tokenizer, eos_token_ids(model, self.tokenizer), self.stop_strings)
        return self._stop_rule

    def check(self, spec: EBatchSpec, who: str) -> None:
        """A spec that gives a standard error: ≥ 2 prompts, or the whole pool with ≥ 2 completions."""
        if spec.pool not in POOLS:
            raise ConfigError(f"{who}: pool must be {'|'.join(POOLS)}, got {spec.pool!r}")
        N = len(self.pool(spec))
        if not N:
            raise ConfigError(f"{who}: the {spec.pool} prompt pool is empty (data.eval_fraction = 0?)")
        if spec.batch_size < 2 or spec.per_prompt < 1:
            raise ConfigError(f"{who}: batch_size (B_E) must be >= 2 and completions_per_prompt >= 1, "
                              f"got {spec.batch_size} and {spec.per_prompt}")
        n = min(N, max(1, spec.batch_size // spec.per_prompt))
        if n < 2 and n != N:
            raise ConfigError(f"{who}: batch_size {spec.batch_size} with completions_per_prompt {spec.per_prompt} "
                              f"draws 1 of {N} prompts: no standard error; raise batch_size or lower completions_per_prompt")

    def get(self, model, step: int, spec: EBatchSpec) -> EBatch:
        """The step's E-batch for ``spec``, generated at the first request of the step (call it
        before the optimizer step: the E-batch samples π_θk) unless it rode with the rollouts."""
        if step != self._step:
            self._step, self._cache = step, {}
        if spec not in self._cache:
            self._cache[spec] = self.sample(model, step, spec)
        return self._cache[spec]

    def requests(self, step: int, spec: EBatchSpec) -> tuple[list[str], list[int], list[int]]:
        """(prompts, seeds, pool indices) of this rank's share (whole prompts) of the global
        E-batch, which depends only on (seed, step)."""
        seed, pool = self.cfg.seed, self.pool(spec)
        plan = ebatch_plan(len(pool), spec.batch_size, spec.per_prompt, seed, step)
        order = list(dict.fromkeys(p for p, _ in plan))  # prompts in draw order
        mine = {p for i, p in enumerate(order) if i % self.world.world_size == self.world.rank}
        rows = [(p, j) for p, j in plan if p in mine]
        return ([self.prompt_fn(pool[p].question) for p, _ in rows],
                [stable_seed(seed, "ebatch", step, p, j) for p, j in rows], [p for p, _ in rows])

    def settings(self) -> dict:
        """The sampler settings of every E-batch (a rollout call with others cannot carry one)."""
        return dict(max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=self.cfg.rollout.temperature,
                    stop_strings=self.stop_strings, max_prompt_tokens=self.cfg.data.max_prompt_tokens)

    def sample(self, model, step: int, spec: EBatchSpec) -> EBatch:
        """A fresh E-batch of this rank, generated now by the exact sampler."""
        prompts, seeds, idx = self.requests(step, spec)
        self.generations += 1
        comps = sample(model, self.tokenizer, prompts, seeds, **self.settings()) if prompts else None
        return EBatch(comps, torch.tensor(idx, dtype=torch.long))

    @contextlib.contextmanager
    def riding(self, engine, step: int, specs: set[EBatchSpec]):
        """An engine for the step's rollouts that also generates the E-batches of ``specs`` in its
        first call; on exit they are the step's E-batches. With any engine: LoRA-merged or
        compiled decoding samples the evaluated policy up to rounding, as a separate pass by the
        bf16 model does, and the δH probe measures how far (``sampler_gap_tok``, ``sampler_ess_frac``)."""
        if not specs:
            yield engine
            return
        wanted = {spec: self.requests(step, spec) for spec in specs}
        rider = RidingEngine(engine, {spec: (p, s) for spec, (p, s, _) in wanted.items()}, self.settings())
        yield rider
        if step != self._step:
            self._step, self._cache = step, {}
        for spec, comps in rider.delivered.items():
            self.generations += 1
            self._cache[spec] = EBatch(comps, torch.tensor(wanted[spec][2], dtype=torch.long))
