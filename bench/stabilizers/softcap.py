"""Logit soft-capping: l ← c · tanh(l / c) before the cross-entropy (Gemma 2)."""
from dataclasses import dataclass

import torch

from .base import Stabilizer, check_positive


SLOW_CPU_TANH = torch.backends.cpu.get_cpu_capability() == "AVX2"
"""Whether ATen's CPU kernels are its AVX2 build, whose tanh is ~3.5× slower than its sigmoid
(measured: 8.7 vs 2.4 ms for 512 × 8192 fp32 values on 2 AVX2 cores). Its AVX-512 build's tanh
costs what its sigmoid does (2.3 vs 2.6 ms on one Xeon core, with the division). A module constant,
not a cached call: ``torch.compile`` reads it as a constant (a cached function it warns about)."""


def _tanh_of_quotient(x: torch.Tensor, cap) -> torch.Tensor:
    """tanh(x / cap) in one fresh buffer. Where the CPU's tanh is slow (``SLOW_CPU_TANH``) computed
    in place as 2·sigmoid(2·(x/cap)) − 1, within a few fp32 ulps of tanh (absolute error ≤ 2⁻²³
    near 0, ~1e-7 relative elsewhere), three passes more but faster there; else as tanh."""
    if x.device.type == "cpu" and SLOW_CPU_TANH:
        return torch.div(x, cap).mul_(2).sigmoid_().mul_(2).sub_(1)
    return torch.div(x, cap).tanh_()


_ONE = torch.ones(())


class _SoftCap(torch.autograd.Function):
    """c·tanh(l/c) with d/dl = 1 − tanh²(l/c): one transcendental pass forward, one fused
    pass backward (autograd's chain of div, tanh, mul would take three)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor, cap):
        t = _tanh_of_quotient(logits, cap)
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

    def transform_logits_with_slope(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c·t, 1 − t²) with t = tanh(l/c), bit for bit what ``transform_logits`` and its backward
        compute: t as ``_SoftCap`` forms it, and the slope by one addcmul into t's own buffer, which
        times the gradient equals ATen's ``tanh_backward`` exactly (so the chunked and the unchunked
        head differ only in the order of their sums). One fused pass when compiled."""
        t = _tanh_of_quotient(logits, self.cap)
        return t * self.cap, torch.addcmul(_ONE.to(t), t, t, value=-1, out=t)
