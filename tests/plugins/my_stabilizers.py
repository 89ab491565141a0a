"""A third-party stabilizer, defined outside the bench package (used by test_external_stabilizer.py).

It penalizes the mean squared logit: λ · mean(l²). Nothing of stabench is changed to use it.
"""
from dataclasses import dataclass

import torch

from bench.stabilizers import LossInputs, Stabilizer


@dataclass(frozen=True)
class LogitL2(Stabilizer):
    name = "logit_l2"
    lam: float = 1e-3

    def loss_term(self, inputs: LossInputs) -> torch.Tensor:
        return self.lam * inputs.logits.square().mean()
