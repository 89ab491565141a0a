"""Logit soft-capping: l ← c · tanh(l / c) before the cross-entropy (Gemma 2)."""
from dataclasses import dataclass

import torch

from .base import Stabilizer, check_positive


class _SoftCap(torch.autograd.Function):
    """c·tanh(l/c) with d/dl = 1 − tanh²(l/c): 3 passes forward, 1 backward (autograd's chain takes 3)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, cap):
        t = torch.tanh(logits / cap)
        return t * cap, t

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_t):
        (t,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, t), None


def softcap(logits: torch.Tensor, cap) -> torch.Tensor:
    """c · tanh(logits / c), elementwise; ``cap`` a float or a tensor broadcastable to logits."""
    return _SoftCap.apply(logits, cap)[0]


@dataclass(frozen=True)
class SoftCap(Stabilizer):
    name = "softcap"
    cap: float = 30.0

    def __post_init__(self) -> None:
        check_positive(self, "cap")

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits, self.cap)
