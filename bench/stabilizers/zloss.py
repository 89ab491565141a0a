"""z-loss: λ · mean over tokens of (log Z)², Z the softmax normalizer (PaLM)."""
from dataclasses import dataclass

import torch

from .base import Stabilizer, check_nonnegative


@dataclass(frozen=True)
class ZLoss(Stabilizer):
    name = "zloss"
    lam: float = 1e-4

    def __post_init__(self) -> None:
        check_nonnegative(self, "lam")

    def token_loss(self, lse: torch.Tensor) -> torch.Tensor:
        # lse is the logsumexp the cross-entropy already computed: no extra pass over V.
        return self.lam * lse.square()
