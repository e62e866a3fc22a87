"""Rollout engines: what turns (prompt, seed) pairs into completions, behind one small interface.

The trainer asks an engine for completions and never calls ``generate`` itself, so another
engine (vLLM, a compiled decode loop) plugs in by implementing ``RolloutEngine``. Whatever
the engine, a completion must depend only on its prompt, its seed and the policy (the
batch-composition, world-size and resume invariants the tests assert), and it reports the
log-probability it sampled each token with (``Completions.logp``): the trainer logs how far
that is from the policy its loss scores (``rollout/logp_mismatch_*``).

``HFEngine`` is transformers' ``generate`` with our exact sampler (``sampling.sample``). With
``compile_backend`` it decodes with a static KV cache and a compiled forward (CUDA graphs on a
GPU); a compile failure falls back to the eager path, once, with a warning. With
``merge_lora`` it decodes with the LoRA update merged into the generation weights: one matmul
per projection instead of three, the gain on a launch-bound GPU decode. The merged weights
W + s·B·A are rounded to the model's dtype, so the sampler's policy differs from the trainer's
by that rounding (measured by the mismatch metric); the training weights are restored bit for
bit after the call (from a copy: W + ΔW − ΔW is not W in bf16).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Protocol

import torch

from rl_training.sampling import Completions, sample

class RolloutEngine(Protocol):
    tokenizer: object

    def generate(self, prompts: list[str], seeds: list[int], *, max_new_tokens: int, temperature: float,
                 stop_strings: tuple[str, ...], max_prompt_tokens: int) -> Completions: ...


class HFEngine:
    def __init__(self, model, tokenizer, merge_lora: bool = False, compile_backend: str | None = None):
        self.model, self.tokenizer, self.merge_lora = model, tokenizer, merge_lora
        self.compile_backend = compile_backend  # None: eager decode with a dynamic cache

    def generate(self, prompts: list[str], seeds: list[int], **settings) -> Completions:
        with merged_lora(self.model) if self.merge_lora else contextlib.nullcontext():
            if self.compile_backend:
                try:
                    return sample(self.model, self.tokenizer, prompts, seeds, **settings,
                                  compile_backend=self.compile_backend)
                except AssertionError:
                    raise
                except Exception as e:  # noqa: BLE001 - any compile failure: the eager path is the same policy
                    print(f"warning: compiled decode failed ({type(e).__name__}: {str(e)[:200]}); "
                          f"decoding eagerly for the rest of the run", file=sys.stderr)
                    self.compile_backend = None
            return sample(self.model, self.tokenizer, prompts, seeds, **settings)


class RidingEngine:
    """An engine whose next ``generate`` call takes extra rows along (the probes' E-batches ride
    with the step's first rollout call: one decode pass instead of two), when that call's
    settings are theirs. Each row's completion depends only on its prompt and seed, so riding
    changes nothing but float rounding; ``delivered`` maps each rider's key to its rows."""

    def __init__(self, engine, riders: dict, settings: dict):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.riders = {key: rows for key, rows in riders.items() if rows[0]}  # key -> (prompts, seeds)
        self.settings = settings
        self.delivered: dict = {}

    def generate(self, prompts: list[str], seeds: list[int], **settings) -> Completions:
        if not self.riders or settings != self.settings:
            return self.engine.generate(prompts, seeds, **settings)
        spans, all_prompts, all_seeds = {}, list(prompts), list(seeds)
        for key, (p, s) in self.riders.items():
            spans[key] = slice(len(all_prompts), len(all_prompts) + len(p))
            all_prompts += p
            all_seeds += s
        self.riders = {}
        out = self.engine.generate(all_prompts, all_seeds, **settings)
        self.delivered = {key: out.rows(span) for key, span in spans.items()}
        return out.rows(slice(0, len(prompts)))


def build_engine(cfg, model, tokenizer) -> HFEngine:
    """``rollout.merge_lora`` and ``rollout.compile_decode``: always | never | auto (on where the
    model lives on a GPU; the CPU keeps the eager unmerged path, whose sampler and trainer see the
    same policy up to float rounding)."""
    on_gpu = next(model.parameters()).device.type == "cuda"

    def wanted(mode: str) -> bool:
        return mode == "always" or (mode == "auto" and on_gpu)

    backend = cfg.rollout.compile_backend if wanted(cfg.rollout.compile_decode) else None
    return HFEngine(model, tokenizer, merge_lora=wanted(cfg.rollout.merge_lora), compile_backend=backend)


@contextlib.contextmanager
def merged_lora(model):
    """Inside: every active LoRA layer's base weight holds W + ΔW and the adapters are bypassed."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                adapters = [a for a in layer.active_adapters if a in layer.lora_A]
                if not adapters:
                    continue
                if any(layer.use_dora.get(a, False) for a in adapters):
                    raise ValueError("merge_lora: DoRA adapters are not supported; set rollout.merge_lora=never")
                weight = layer.get_base_layer().weight
                saved.append((weight, weight.detach().clone()))
                delta = sum(layer.get_delta_weight(a).to(torch.float32) for a in adapters)
                weight.copy_((weight.to(torch.float32) + delta).to(weight.dtype))
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
