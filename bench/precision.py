"""Numeric precision of a run: fp32, fp64, bf16 autocast, or bf16 rounding emulated in fp32.

``precision`` (a RunConfig field) is one of

- ``fp32``: everything in float32.
- ``fp64``: everything in float64 (exactness checks, e.g. the μ-centering invariance test).
- ``bf16``: ``torch.autocast(dtype=bfloat16)``: matmuls and attention take bf16 inputs,
  accumulate in fp32 and return bf16 outputs; the fast path on CUDA and on CPUs with native
  bf16 matmul (AVX512-BF16 / AMX).
- ``bf16-emu``: the same rounding, emulated: every matmul / linear / attention call rounds
  its floating inputs to the nearest bf16 value, computes in fp32 (fp32 accumulation, as
  autocast's kernels do) and rounds its output to bf16, all kept in float32 tensors. On a CPU
  without native bf16 (AVX2 only) autocast's bf16 matmul is ~100× slower than fp32
  (`stabench perf` measures both peaks), so this is how a CPU study sees bf16's effect on
  logits at fp32 speed (~10-20 % overhead for the casts). It differs from autocast in one
  way: elementwise ops between matmuls (SwiGLU's product, residual adds of bf16 outputs) run
  on bf16-valued fp32 tensors without re-rounding, so it is slightly *more* precise than
  autocast there; the logits, where the study's precision argument lives, are rounded alike.
  Gradients flowing back through a rounded tensor are rounded to bf16 too, as in autocast.
- ``auto``: bf16 on CUDA and on CPUs with native bf16 matmul, else fp32.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from . import provenance

def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision of ``precision`` on ``device`` ('auto' resolved)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or provenance.cpu_supports_bf16() else "fp32"


def param_dtype(precision: str) -> torch.dtype:
    """dtype of parameters and optimizer state (autocast keeps fp32 master weights)."""
    return torch.float64 if precision == "fp64" else torch.float32


def bf16_round(t: Any) -> Any:
    """t rounded to the nearest bf16 value, same dtype (non-float32 values pass through)."""
    if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
        return t.to(torch.bfloat16).to(torch.float32)
    return t


class BF16Rounding(TorchFunctionMode):
    """Torch-function mode that rounds the inputs and outputs of matmul-like ops to bf16.

    The ops are those CPU/CUDA autocast runs in bf16 for this model: ``F.linear``,
    ``torch.matmul`` / ``@`` / ``mm`` / ``bmm`` / ``baddbmm`` / ``addmm`` and
    ``F.scaled_dot_product_attention``. Re-enterable: one instance serves every step.
    """

    OPS: frozenset[Callable] = frozenset({
        F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
        torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm,
        F.scaled_dot_product_attention})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS:
            return func(*args, **kwargs)
        out = func(*tree_map(bf16_round, args), **tree_map(bf16_round, kwargs))
        return tree_map(bf16_round, out)


def precision_context(precision: str, device: torch.device) -> AbstractContextManager:
    """The context the forward pass runs in for a resolved ``precision``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "bf16-emu":
        return BF16Rounding()
    return nullcontext()


class ExactFP32:
    """fp32 as written: no autocast, no emulation, and on CUDA no TF32 inside (restored on exit).
    Re-enterable, like the other precision contexts (one instance serves every batch)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.saved: list[tuple[bool, bool]] = []

    def __enter__(self) -> None:
        if self.cuda:
            self.saved.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved.pop()
