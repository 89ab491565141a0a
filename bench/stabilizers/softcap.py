"""Logit soft-capping: l ← c · tanh(l / c) before the cross-entropy (Gemma 2)."""
from dataclasses import dataclass

import torch

from .base import Stabilizer, check_positive


@dataclass(frozen=True)
class SoftCap(Stabilizer):
    name = "softcap"
    cap: float = 30.0

    def __post_init__(self) -> None:
        check_positive(self, "cap")

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(logits / self.cap)
