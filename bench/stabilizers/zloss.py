"""z-loss: λ · mean over tokens of (log Z)², Z the softmax normalizer (PaLM)."""
from dataclasses import dataclass

import torch

from .base import LossInputs, Stabilizer, check_nonnegative


@dataclass(frozen=True)
class ZLoss(Stabilizer):
    name = "zloss"
    lam: float = 1e-4

    def __post_init__(self) -> None:
        check_nonnegative(self, "lam")

    def loss_term(self, inputs: LossInputs) -> torch.Tensor:
        # inputs.lse is the logsumexp the cross-entropy already computed: one pass over V.
        return self.lam * inputs.lse.square().mean()
