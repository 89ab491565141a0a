"""μ-loss: λ · ‖μ‖², μ the mean of the output-embedding rows (Stollenwerk et al. 2026)."""
from dataclasses import dataclass

import torch

from .base import LossInputs, Stabilizer, check_nonnegative


@dataclass(frozen=True)
class MuLoss(Stabilizer):
    name = "muloss"
    lam: float = 1e-4
    loss_term_uses = frozenset({"output_embedding"})  # E only: the chunked head serves it

    def __post_init__(self) -> None:
        check_nonnegative(self, "lam")

    def loss_term(self, inputs: LossInputs) -> torch.Tensor:
        mu = inputs.output_embedding.float().mean(dim=0)  # (H,)
        return self.lam * mu.square().sum()
