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
        E = inputs.output_embedding.float()
        # μ = Σ rows / V: the bits of E.mean(0) (ATen's mean is this sum and division), but its backward
        # broadcasts ∂/∂μ over the V rows as a view, added to E's gradient in one pass, where mean's
        # backward materializes a (V × H) tensor first
        mu = E.sum(dim=0) / E.shape[-2]  # (H,)
        return self.lam * mu.square().sum()

    def loss_term_with_grad(self, output_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ·‖μ‖², ∂/∂E = 2λμ/V for every row, (1, H)): ``loss_term``'s value, and its gradient with the
        roundings autograd gives it there (λ, then 2μ times it, then / V)."""
        E = output_embedding.float()
        V = E.shape[-2]
        mu = E.sum(dim=0, keepdim=True) / V  # (1, H)
        return self.lam * mu.square().sum(), (mu * 2).mul_(self.lam).div_(V)
