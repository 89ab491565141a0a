"""No stabilization: plain cross-entropy training."""
from dataclasses import dataclass

from .base import Stabilizer


@dataclass(frozen=True)
class Baseline(Stabilizer):
    name = "baseline"
