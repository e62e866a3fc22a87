"""Float32-accurate products of float32 activations with a bf16 model's frozen weights, on bf16
tensor cores.

The δH probe evaluates a bf16 model in float32 (a small step's change is rounded away in bf16),
and a float32 GEMM without TF32 runs at a fifteenth of bf16's rate on an H100 or H200 (67 against
989 TFLOPS peak). But a bf16 weight W is exactly a float32 number, and three bf16 pieces hold a
float32 significand: x = x₁ + x₂ + x₃ with x₁ = bf16(x), x₂ = bf16(x − x₁), x₃ = bf16(x − x₁ − x₂).
Each xᵢWᵀ is then a bf16 GEMM whose products are exact in float32 and whose sums are float32
(``torch.mm(..., out_dtype=torch.float32)`` on CUDA), so Σᵢ xᵢWᵀ is the float32 GEMM's result up to
summation order, at three bf16 GEMMs' cost. Forward-mode derivatives go through the same split
(the tangent of xWᵀ along ẋ is ẋWᵀ; W is frozen), so the derivative pass gains as well.

``SplitLinearMode`` applies it inside a probe's forward: every ``linear`` of a float32 input with
a bf16 weight takes the split, and a bf16 embedding's output is widened to float32 (exactly).
Off CUDA the bf16 pieces are multiplied as float32 numbers: the same products and float32 sums,
three float32 GEMMs instead of one, which is for tests, not speed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.overrides import TorchFunctionMode

PIECES = 3  # bf16 carries 8 significand bits; float32 24


def split(x: torch.Tensor) -> list[torch.Tensor]:
    """bf16 pieces of a float32 tensor whose float32 sum is ``x``."""
    pieces = [x.to(torch.bfloat16)]
    rest = x
    for _ in range(PIECES - 1):
        rest = rest - pieces[-1].float()
        pieces.append(rest.to(torch.bfloat16))
    return pieces


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 matrices with float32 products and sums, as float32."""
    if a.is_cuda and _has_float32_output(str(a.device)):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight.float(), bias) of float32 ``x`` and bf16 ``weight``, by the split."""
    rows = x.reshape(-1, x.shape[-1])
    wt = weight.t()
    first, *rest = split(rows)
    out = _mm(first, wt)
    for piece in rest:
        out = out + _mm(piece, wt)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _SplitLinear(torch.autograd.Function):
    """``split_linear`` with its forward-mode rule (the probes' derivative pass) for a frozen
    weight; no backward."""

    @staticmethod
    def forward(x, weight, bias):
        return split_linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        # weight_t is not read: the weights that take this path are frozen (a probe's primals are
        # the trainable LoRA values), and functorch hands them a zero tangent
        (weight,) = ctx.saved_tensors
        out = split_linear(x_t, weight) if x_t is not None else None
        if bias_t is not None:
            out = bias_t if out is None else out + bias_t
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("split matmuls have no backward: probe forwards only")


class SplitLinearMode(TorchFunctionMode):
    """Inside: float32 ``linear`` with bf16 weights by the split; bf16 embeddings widened; and no
    bf16 partial sums in cuBLAS's bf16 GEMMs (the split's sums are float32 throughout)."""

    def __enter__(self):
        self._reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self._reduced
        return super().__exit__(exc_type, exc_value, traceback)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_args(*args, **kwargs)
            if weight.dtype == torch.bfloat16 and x.dtype == torch.float32:
                return _SplitLinear.apply(x, weight, bias)
        out = func(*args, **kwargs)
        if func is F.embedding and out.dtype == torch.bfloat16:
            return out.float()
        return out


def _linear_args(input, weight, bias=None):  # noqa: A002 - F.linear's own names
    return input, weight, bias


@functools.lru_cache(maxsize=None)
def _has_float32_output(device: str) -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def _works(device: str) -> bool:
    try:  # a value and a forward-mode derivative through the split, as a probe pass takes them
        weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, device=device)
        x = torch.tensor([[1.0, 1 / 3]], device=device)
        with SplitLinearMode():
            value, tangent = jvp(lambda a: F.linear(a, weight), (x,), (x,))
        exact = x.double().cpu() @ weight.double().cpu().t()  # not a float32 GEMM: TF32 may be on
        return torch.equal(value, tangent) and torch.allclose(value.double().cpu(), exact, rtol=1e-6, atol=0)
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def available(device: torch.device) -> bool:
    """Whether the split pays here: a GPU with bf16 GEMMs of float32 output (torch ≥ 2.8) through
    which a forward-mode derivative goes (tried once per device)."""
    return device.type == "cuda" and _has_float32_output(str(device)) and _works(str(device))
