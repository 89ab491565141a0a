"""μ-centering: after each optimizer step, E ← E − μ for every row (Stollenwerk et al. 2026).

With an untied head this leaves loss and gradients unchanged in exact arithmetic
(the softmax ignores a shift shared by all logits of a token); with weight tying
the centred matrix is also the input embedding, so it changes the dynamics.
"""
from dataclasses import dataclass

import torch

from .base import OUTPUT_EMBEDDING, Stabilizer
from .rowmean import row_mean


@dataclass(frozen=True)
class MuCentering(Stabilizer):
    name = "mucentering"

    def after_step(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        E = params[OUTPUT_EMBEDDING]
        return {OUTPUT_EMBEDDING: E - E.mean(dim=0, keepdim=True)}

    def after_step_delta(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """E + (−μ), which is E − μ to the bit (IEEE subtraction is addition of the negation); μ by
        ``row_mean``, ``E.mean``'s bits read by blocks of rows (on CPU, right after AdamW's write)."""
        return {OUTPUT_EMBEDDING: row_mean(params[OUTPUT_EMBEDDING]).neg_()}
