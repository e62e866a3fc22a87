"""Rollout engines (``rl_training/engine.py``): decoding with LoRA merged is the same policy up to
rounding, and leaves the training weights bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

from rl_training.config import load_config
from rl_training.engine import HFEngine, build_engine, merged_lora
from rl_training.errors import ConfigError
from rl_training.models import TINY_RANDOM, ModelSpec, apply_lora, load_tokenizer_and_model
from tests.helpers.runs import TINY

PROMPTS = ["What is 2 + 3?", "Count to three:", "x", "Anna has 7 apples."]
SETTINGS = dict(max_new_tokens=12, temperature=0.7, stop_strings=(), max_prompt_tokens=64)


def lora_model(dtype: torch.dtype):
    tokenizer, base = load_tokenizer_and_model(ModelSpec(TINY_RANDOM, seed=0))
    model = apply_lora(base.to(dtype), r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would merge nothing
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return tokenizer, model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merged_forward_is_the_adapter_forward_and_weights_come_back_exactly(dtype):
    tokenizer, model = lora_model(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(ids).logits.float()
        with merged_lora(model):
            merged = model(ids).logits.float()
        again = model(ids).logits.float()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(plain, again)
    assert float((merged - plain).abs().max()) > 0  # the merge really changed the computation
    tol = 1e-4 if dtype == torch.float32 else 0.1  # bf16: W + ΔW rounded to 8 bits of mantissa
    torch.testing.assert_close(merged, plain, atol=tol, rtol=0)


def test_merged_decode_samples_the_same_completions_in_fp32():
    tokenizer, model = lora_model(torch.float32)
    seeds = [11, 12, 13, 14]
    plain = HFEngine(model, tokenizer).generate(PROMPTS, seeds, **SETTINGS)
    merged = HFEngine(model, tokenizer, merge_lora=True).generate(PROMPTS, seeds, **SETTINGS)
    assert torch.equal(plain.completion_ids, merged.completion_ids)
    assert float((plain.logp - merged.logp).abs().max()) < 1e-4


def test_build_engine_merges_on_a_gpu_or_when_asked():
    tokenizer, model = lora_model(torch.float32)
    cfg = load_config(TINY)
    assert not build_engine(cfg, model, tokenizer).merge_lora  # auto on CPU: the exact path
    cfg.rollout.merge_lora = "always"
    assert build_engine(cfg, model, tokenizer).merge_lora
    with pytest.raises(ConfigError, match="rollout.merge_lora"):
        load_config(TINY, ["rollout.merge_lora=sometimes"])


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_compiled_static_cache_decode_samples_the_same_completions_in_fp32(merge):
    """Static KV cache, prompts padded to max_prompt_tokens, forward traced by dynamo (the
    "eager" backend: the inductor and CUDA-graph code generation below it is torch's, and minutes
    on these cores): the same tokens as the eager dynamic-cache decode."""
    tokenizer, model = lora_model(torch.float32)
    seeds = [11, 12, 13, 14]
    eager = HFEngine(model, tokenizer, merge_lora=merge).generate(PROMPTS, seeds, **SETTINGS)
    engine = HFEngine(model, tokenizer, merge_lora=merge, compile_backend="eager")
    dynamo_counters.clear()
    compiled = engine.generate(PROMPTS, seeds, **SETTINGS)
    assert engine.compile_backend == "eager", "no fallback was taken"
    assert dynamo_counters["stats"]["unique_graphs"] == 1, "the forward was traced into one graph"
    assert torch.equal(compiled.prompt_ids, eager.prompt_ids), "returned without the padding to max_prompt_tokens"
    assert torch.equal(eager.completion_ids, compiled.completion_ids)
    assert float((eager.logp - compiled.logp).abs().max()) < 1e-4


def test_a_failing_compile_falls_back_to_eager_decode_once(capsys):
    tokenizer, model = lora_model(torch.float32)
    seeds = [11, 12, 13, 14]
    eager = HFEngine(model, tokenizer).generate(PROMPTS, seeds, **SETTINGS)
    engine = HFEngine(model, tokenizer, compile_backend="no_such_backend")
    out = engine.generate(PROMPTS, seeds, **SETTINGS)
    assert "compiled decode failed" in capsys.readouterr().err
    assert engine.compile_backend is None
    assert torch.equal(eager.completion_ids, out.completion_ids)


def test_build_engine_compiles_decode_only_when_asked_on_cpu():
    tokenizer, model = lora_model(torch.float32)
    cfg = load_config(TINY, ["rollout.compile_decode=auto"])
    assert build_engine(cfg, model, tokenizer).compile_backend is None  # auto: GPU only
    cfg = load_config(TINY, ["rollout.compile_decode=always", "rollout.compile_backend=eager"])
    assert build_engine(cfg, model, tokenizer).compile_backend == "eager"
    with pytest.raises(ConfigError, match="rollout.compile_decode"):
        load_config(TINY, ["rollout.compile_decode=yes"])
