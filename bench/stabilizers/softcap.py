"""Logit soft-capping: l ← c · tanh(l / c) before the cross-entropy (Gemma 2)."""
from dataclasses import dataclass

import torch

from .base import Stabilizer, check_positive


SIGMOID_FORM_ON_CPU = True
"""Whether tanh(x/c) is formed on CPU as 2·sigmoid(2x/c) − 1 rather than by ATen's tanh. Measured, the
division included, fp32: ATen's tanh took ~3.5× the time of the sigmoid form on 2 AVX2 EPYC cores (8.7 vs
2.4 ms for 512 × 8192 values), ~6× on an AVX-512 EPYC core (5.7 vs 0.9 ms for 256 × 8192), and about the
same on an AVX-512 Xeon core (2.3 vs 2.6 ms, against the five-pass form of earlier versions). One form
on every CPU also keeps a run's bits the same on AVX2 and AVX-512 machines; the committed results were
trained in it. CUDA takes the tanh form; tests patch this constant to check it."""


def _tanh_of_quotient(x: torch.Tensor, cap) -> torch.Tensor:
    """tanh(x / cap) in one fresh buffer (x is not written). On CPU (``SIGMOID_FORM_ON_CPU``) as
    2·sigmoid(2x/cap) − 1, computed in place after the division — x / (cap/2), then sigmoid, ·2 and −1 —,
    within a few fp32 ulps of tanh (absolute error ≤ 2⁻²³ near 0, ~1e-7 relative elsewhere); elsewhere
    by ATen's tanh. x / (cap/2) equals (x / cap)·2 bit for bit (scaling by 2 is exact), so this has the
    bits of the five-pass (x / cap)·2 → sigmoid → ·2 → −1 that trained the committed results, one pass
    fewer. (2s − 1 in one ``add`` would save one more, 0.06–0.3 ms per 512 × 8192 values, but only with
    ``out=``, which has no vmap rule, and packs vmap this; into a fresh buffer it measured slower.)"""
    if x.device.type == "cpu" and SIGMOID_FORM_ON_CPU:
        return torch.div(x, cap / 2).sigmoid_().mul_(2).sub_(1)
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

    def logit_cap(self) -> float:
        return self.cap

    def transform_logits_with_slope(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c·t, 1 − t²) with t = tanh(l/c), bit for bit what ``transform_logits`` and its backward
        compute: t as ``_SoftCap`` forms it, and the slope by one addcmul into t's own buffer, which
        times the gradient equals ATen's ``tanh_backward`` exactly (so the chunked and the unchunked
        head differ only in the order of their sums). One fused pass when compiled."""
        t = _tanh_of_quotient(logits, self.cap)
        return t * self.cap, torch.addcmul(_ONE.to(t), t, t, value=-1, out=t)
