"""Forwards of the policy for probes: at given LoRA values, in the probe's precision, eval mode.

A probe compares the policy at θ_k and θ_{k+1}; with a bf16 base model the update of a small
learning rate is rounded away in a bf16 forward (measured: ΔH_true at lr 1e-6 was rounding
noise 100× larger than the change). So probes evaluate in ``precision``: "auto" (float32 when
the model is bf16/fp16, else the model's dtype), "float32", "float64" or "model". Every forward
of a probe goes through the same ``functional_call`` path with a full parameter dict in that
dtype (the frozen base cast once and cached: +4 bytes per base parameter on the model's device
when the model is bf16), so S(θ_k) and S(θ_{k+1}) differ only by Δθ; Δθ = 0 gives bit-identical
forwards. LoRA parameters are float32 (peft keeps adapters in float32 over a bf16 base).

Derivatives along Δθ use forward-mode AD (``torch.func.jvp``): one pass gives d/dε of every
per-position quantity (h_t, log π(y_t), P_S,t), so any baseline can be applied afterwards, and
the values themselves (its primal output), so θ_k needs no forward of its own. Fused attention
kernels have no forward-mode derivative, so every forward here runs with SDPA's math backend: the
plain forward at θ_{k+1} then takes the jvp's own code path. Whether its values equal the jvp's
bit for bit (they do on CPU, tested; a GPU library could pick other kernels under forward AD) is
checked once per evaluator; where they differ, θ_k gets a plain forward again, so that S(θ_k) and
S(θ_{k+1}) never differ by a change of kernel.

Over a bf16 model on a GPU the float32 products with the frozen weights are taken as sums of
bf16 GEMMs with float32 output (``split_matmul``: auto | always | never; ``probes/split_matmul.py``):
float32's accuracy at three bf16 GEMMs' cost (a fifth of one float32 GEMM's at peak rates) plus
the splitting's elementwise passes, and the frozen linear weights stay in bf16 (no float32 copy).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from probes import split_matmul as split
from probes.functional.delta_h import token_terms
from rl_training import policy

PRECISIONS = ("auto", "float32", "float64", "model")
SPLIT_MATMUL = ("auto", "always", "never")  # YAML reads on/off as booleans
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The sampled policy has no dropout; restore the caller's mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def exact_matmuls():
    """No TF32 while a probe evaluates: its rounding (10-bit mantissa) would swamp small Δθ."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


_NARROW = (torch.float32, torch.float16, torch.bfloat16)
_NARROWING_METHODS = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16}


class Float64Mode(TorchFunctionMode):
    """Inside: no float64 tensor is narrowed to float32 or lower. transformers computes RMSNorm in
    float32 whatever the model's dtype (``hidden_states.to(torch.float32)``; eager attention's
    softmax and the rotary embedding too), so a "float64" forward rounds every layer's normalised
    state to float32: a noise of ~1e-8 relative that depends on θ and floors the difference of
    two forwards (measured on tiny-random: finite differences along a direction off by 1.1× the
    change they measure at ε = 1e-4, 6× at 1e-5). Inside, these casts keep float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source.dtype == torch.float64:
            if func in _NARROWING_METHODS:
                return source
            if kwargs.get("dtype") in _NARROW:  # x.to(dtype=...), softmax(x, dim, dtype=...)
                kwargs = {**kwargs, "dtype": torch.float64}
            if func is torch.Tensor.to:  # x.to(torch.float32), x.to(device, torch.float32)
                args = tuple(torch.float64 if a in _NARROW else a for a in args)
        return func(*args, **kwargs)


# transformers, peft and TRL all name it so (PreTrainedModel.enable_input_require_grads and copies)
_INPUT_GRAD_HOOKS = {"make_inputs_require_grads", "make_inputs_require_grad"}


@contextlib.contextmanager
def without_input_grad_hooks(model: torch.nn.Module):
    """Forward hooks that call ``requires_grad_`` on the input embeddings' output (TRL's gradient
    checkpointing, its default, brings them: three by the end of a run) are taken off while a probe
    evaluates and put back after: a functorch transform refuses ``requires_grad_``, and the
    probes differentiate only along the LoRA parameters. Found by name, since a second
    registration leaves the first one's handle unreferenced (``disable_input_require_grads``
    then removes only the last)."""
    saved = []
    for m in model.modules():
        drop = [k for k, h in m._forward_hooks.items() if getattr(h, "__name__", "") in _INPUT_GRAD_HOOKS]
        if drop:
            saved.append((m, m._forward_hooks.copy()))  # to restore the hooks in their order
            for k in drop:
                del m._forward_hooks[k]
    try:
        yield
    finally:
        for m, hooks in saved:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)


def _wrapped_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "_original_forward" in vars(m) and "forward" in vars(m)]


def trainer_wraps_forward(model: torch.nn.Module) -> bool:
    """Whether a trainer (accelerate's prepare) runs this model's forward under a wrapper."""
    return bool(_wrapped_modules(model))


@contextlib.contextmanager
def unwrapped_forward(model: torch.nn.Module):
    """accelerate's ``prepare`` (TRL's Trainer with bf16=True, its default) replaces a model's
    ``forward`` by one that runs under bf16 autocast, so a probe's forwards would round at bf16
    whatever its precision says. While a probe evaluates, the original forward, which accelerate
    keeps as ``_original_forward``, stands in."""
    patched = _wrapped_modules(model)
    wrapped = [vars(m)["forward"] for m in patched]
    for m in patched:
        m.forward = m._original_forward
    try:
        yield
    finally:
        for m, forward in zip(patched, wrapped):
            m.forward = forward


@contextlib.contextmanager
def probe_model(model: torch.nn.Module, own_forward: bool = True):
    """The model as every probe pass sees it: eval mode, its own forward (not a trainer's
    autocast wrapper; ``own_forward=False`` keeps the wrapper, to measure how far the trainer's
    forward is from the probe's), no hook that makes the embeddings' output require a gradient."""
    with eval_mode(model), unwrapped_forward(model) if own_forward else contextlib.nullcontext(), \
            without_input_grad_hooks(model):
        yield


@contextlib.contextmanager
def probe_forward(model: torch.nn.Module, own_forward: bool = True, split_matmuls: bool = False,
                  float64: bool = False):
    """The one setting of every probe forward without a backward (δH's): ``probe_model``, no
    TF32, SDPA's math backend (the one with a forward-mode derivative), with ``split_matmuls``
    float32 products with bf16 weights as split bf16 GEMMs, and with ``float64`` no float32 step
    inside a float64 forward (``Float64Mode``)."""
    with probe_model(model, own_forward), exact_matmuls(), sdpa_kernel([SDPBackend.MATH]), \
            split.SplitLinearMode() if split_matmuls else contextlib.nullcontext(), \
            Float64Mode() if float64 else contextlib.nullcontext():
        yield


def resolve_dtype(model: torch.nn.Module, precision: str) -> torch.dtype:
    model_dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    if precision == "model":
        return model_dtype
    if precision == "auto":
        return torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else model_dtype
    return _DTYPES[precision]


class PolicyEvaluator:
    """``terms``/``terms_jvp``: per-token h, log π(y_t), P_S of completions at given LoRA values."""

    def __init__(self, model: torch.nn.Module, precision: str, temperature: float, trainer_forward: bool = False,
                 split_matmul: str = "auto"):
        self.model, self.temperature = model, temperature
        self.own_forward = not trainer_forward  # trainer_forward: through a trainer's autocast wrapper
        self.dtype = resolve_dtype(model, precision)
        assert split_matmul in SPLIT_MATMUL, split_matmul
        base = next(p for p in model.parameters() if not p.requires_grad)
        splittable = self.dtype == torch.float32 and base.dtype == torch.bfloat16
        auto_on_gpu = split_matmul == "auto" and base.device.type == "cuda"
        self.split = splittable and (split_matmul == "always" or (auto_on_gpu and split.available(base.device)))
        if splittable and auto_on_gpu and not self.split:
            warnings.warn(f"probe forwards: bf16 GEMMs with float32 output do not work here (torch {torch.__version__}); "
                          "float32 GEMMs instead (slower, as accurate)", stacklevel=2)
        self._frozen: dict[str, torch.Tensor] | None = None
        self.primal_is_plain: bool | None = None  # the jvp's values == ``terms``, bit for bit (checked once)

    def _forward_setting(self):
        return probe_forward(self.model, self.own_forward, self.split, float64=self.dtype == torch.float64)

    def _params(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._frozen is None:
            cast = any(p.dtype != self.dtype for p in self.model.parameters() if p.is_floating_point())
            kept = _matmul_weights(self.model) if self.split else set()  # the split reads them in bf16
            self._frozen = {
                n: p.detach() if n in kept else p.detach().to(self.dtype)
                for n, p in self.model.named_parameters() if not p.requires_grad
            } if cast else {}
        return {**self._frozen, **{n: t.to(self.dtype) for n, t in trainable.items()}}

    def _terms(self, tensors: policy.TokenBatch, stops, params) -> dict[str, torch.Tensor]:
        def forward(**kw):
            return functional_call(self.model, params, args=(), kwargs=kw, strict=False)

        logits = policy.completion_logits(self.model, *tensors, self.temperature, forward=forward)
        device = logits.device
        always, extra, extra_mask = (t.to(device) for t in stops)
        return token_terms(logits, tensors.completion_ids.to(device), always, extra, extra_mask)

    @torch.no_grad()
    def terms(self, tensors: policy.TokenBatch, stops, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._forward_setting():
            return self._terms(tensors, stops, self._params(trainable))

    def terms_jvp(self, tensors: policy.TokenBatch, stops, trainable, direction) -> tuple[dict, dict]:
        """(``terms`` at trainable, d/dε at ε = 0 of ``terms`` at trainable + ε·direction)."""
        names = list(trainable)
        primals = tuple(trainable[n].to(self.dtype) for n in names)
        tangents = tuple(direction[n].to(self.dtype) for n in names)
        base = self._params({})

        def fn(*values):
            return self._terms(tensors, stops, {**base, **dict(zip(names, values))})

        with self._forward_setting():
            values, tangent_out = jvp(fn, primals, tangents)
        if self.primal_is_plain is False:
            return self.terms(tensors, stops, trainable), tangent_out
        if self.primal_is_plain is None:  # once: the plain forward it is checked against is then the one used
            plain = self.terms(tensors, stops, trainable)
            self.primal_is_plain = same_bits(values, plain)
            if not self.primal_is_plain:
                warnings.warn("probe forwards: the derivative pass's values differ from a plain forward's "
                              "on this device; θ_k gets a forward of its own (one more forward a microbatch)", stacklevel=2)
                return plain, tangent_out
        return values, tangent_out


def _matmul_weights(model: torch.nn.Module) -> set[str]:
    """Names of the frozen bf16 weights of Linear and Embedding modules (the embedding of a
    tied lm_head included)."""
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, kinds) and not m.weight.requires_grad and m.weight.dtype == torch.bfloat16}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal keys and equal values, NaN where NaN (padding positions may hold any value)."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k].isnan(), b[k].isnan()) and torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)
