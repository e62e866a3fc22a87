"""Sampling from the full-vocabulary policy π_T with HF ``generate``.

Every sequence draws its tokens from its own counter-based random stream, keyed by its seed
and the token's position (an exact inverse-CDF draw from softmax(logits/T), see ``RowSampler``). So a sequence depends only on its seed and the
model, not on which rank or batch it was generated in: a run on two ranks and a run on one process draw the same global batch, and a resumed
run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

import torch
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from rl_training.counter_rng import counter_uniforms
from rl_training.policy import trim
from rl_training.stops import completion_length


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, identical across processes and Python runs."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RowSampler(LogitsProcessor):
    """Turns greedy decoding into exact sampling from softmax(logits / T), one random stream per row.

    At its i-th call (the i-th generated token) row r takes u = ``counter_uniforms(seed_r, i)``,
    drawn on the logits' device for all rows at once, and the token where the cumulative
    distribution (float64) crosses u: an exact inverse-CDF sample that depends only on the row's
    seed and the model. The returned scores are −inf except at that token, so greedy decoding
    picks it. It must be the only logits processor: ``sample`` passes neutral settings so that
    HF adds none of its own. ``logps`` keeps log π_T of each sampled token (the sampler's side of
    the rollout–training mismatch).
    """

    def __init__(self, seeds: list[int], temperature: float):
        self.temperature = temperature
        self.keys = torch.tensor(seeds, dtype=torch.int64)
        self.calls = 0
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        assert scores.shape[0] == len(self.keys), "one seed per generated row"
        if self.keys.device != scores.device:
            self.keys = self.keys.to(scores.device)
        u = counter_uniforms(self.keys, self.calls)
        self.calls += 1
        logp = torch.log_softmax(scores.double() / self.temperature, dim=-1)
        cdf = logp.exp().cumsum(dim=-1)
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).clamp(max=scores.shape[1] - 1)
        self.logps.append(logp.gather(1, token).squeeze(1).float())
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


@dataclass
class Completions:
    prompt_ids: torch.Tensor  # [N, P] int64, left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on prompt tokens
    completion_ids: torch.Tensor  # [N, L] int64, right-padded with pad_token_id
    completion_mask: torch.Tensor  # [N, L] 1 up to and including the stop token
    texts: list[str]  # decoded completions (up to the stop)
    logp: torch.Tensor | None = None  # [N, L] float32 log π_T of each token as the sampler saw it, 0 on padding

    def rows(self, idx: slice) -> Completions:
        """Rows ``idx``, trimmed of columns that are padding in all of them."""
        p, pm, c, cm = trim(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx], self.completion_mask[idx])
        logp = None if self.logp is None else self.logp[idx, : c.shape[1]]
        return Completions(p, pm, c, cm, self.texts[idx], logp)


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids


_STOP_CRITERIA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {stop strings: criteria}


def stop_string_criteria(tokenizer, stop_strings: tuple[str, ...]) -> StopStringCriteria:
    """HF's matcher of stop strings on token ids (a table of where each token's bytes can sit in
    a stop string, then a few vectorised ops a decode step, on the device), built once per
    tokenizer and stop strings. ``generate(stop_strings=...)`` builds it at every call, and
    building it walks the whole vocabulary: 0.5 s a call at SmolLM2's 49,152 tokens on these
    cores (HF caches it, but the cache never hits: its key is ``get_vocab()``'s order, which a
    fast tokenizer's hash map changes from call to call)."""
    per_tokenizer = _STOP_CRITERIA.setdefault(tokenizer, {})
    if stop_strings not in per_tokenizer:
        per_tokenizer[stop_strings] = StopStringCriteria(tokenizer, list(stop_strings))
    return per_tokenizer[stop_strings]


def compiled_generation(backend: str, device: torch.device) -> dict:
    """``generate`` arguments for a static KV cache and a compiled forward on any device (HF
    compiles on its own only on accelerators; CUDA graphs where the device has them)."""
    config = CompileConfig(backend=backend, fullgraph=False, dynamic=False,
                           mode="reduce-overhead" if device.type == "cuda" and backend == "inductor" else None)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    seeds: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    stop_strings: tuple[str, ...],
    max_prompt_tokens: int,
    compile_backend: str | None = None,
) -> Completions:
    """One completion per (prompt, seed) pair; repeat a prompt G times for a group.

    ``compile_backend`` (e.g. "inductor"): decode with a static KV cache and the model's forward
    compiled by that torch.compile backend (on a GPU with CUDA graphs: the decode is
    launch-bound). Prompts are then left-padded to ``max_prompt_tokens`` so that every call of a
    run has the same shapes and compiles once.
    """
    assert len(prompts) == len(seeds)
    device = next(model.parameters()).device
    enc = tokenizer(
        prompts,
        return_tensors="pt",
        padding="max_length" if compile_backend else True,
        max_length=max_prompt_tokens if compile_backend else None,
        add_special_tokens=False,
    ).to(device)
    # Prompts were checked against the budget when the run was set up; never cut one here.
    assert enc["input_ids"].shape[1] <= max_prompt_tokens, "prompt longer than data.max_prompt_tokens"
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    sampler = RowSampler(seeds, temperature)
    try:
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=1.0,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([stop_string_criteria(tokenizer, tuple(stop_strings))])
            if stop_strings else None,
            eos_token_id=sorted(eos),
            pad_token_id=pad_id,
            use_cache=True,
            **(compiled_generation(compile_backend, device) if compile_backend else {}),
        )
    finally:
        model.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    gen = out[:, prompt_len:].cpu()
    lengths = [completion_length(row.tolist(), tokenizer, eos, stop_strings) for row in gen]
    width = max(1, max(lengths))
    completion_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    sampled = torch.stack(sampler.logps, dim=1).cpu()
    logp = torch.zeros((len(prompts), width), dtype=torch.float32)
    for i, n in enumerate(lengths):
        completion_ids[i, :n] = gen[i, :n]
        completion_mask[i, :n] = 1
        logp[i, :n] = sampled[i, :n]
    texts = [tokenizer.decode(completion_ids[i, :n], skip_special_tokens=True) for i, n in enumerate(lengths)]
    comps = Completions(
        prompt_ids=enc["input_ids"].cpu(),
        prompt_mask=enc["attention_mask"].cpu(),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        texts=texts,
        logp=logp,
    )
    return comps.rows(slice(None))  # without the padding to max_prompt_tokens of a compiled decode
