"""Divergence detection: the rules of ``DivergenceConfig`` applied to per-step losses."""
from __future__ import annotations

import math
from collections import deque

from .config import DivergenceConfig


class DivergenceMonitor:
    """Feed it (step, train loss, grad norm) in step order; it returns a reason when the run diverged."""

    def __init__(self, cfg: DivergenceConfig, L0: float, warmup: int):
        self.cfg, self.L0, self.warmup = cfg, L0, warmup
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.spike_score = 0.0

    def update(self, step: int, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nonfinite"
        reason = None
        if step > self.warmup:
            if loss > self.L0 + self.cfg.loss_margin:
                reason = "loss_above_L0"
            elif len(self.window) >= max(8, self.cfg.spike_window // 4):
                n = len(self.window)
                mean = sum(self.window) / n
                std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / (n - 1))
                z = (loss - mean) / max(std, 1e-12)
                self.spike_score = max(self.spike_score, z)
                if (self.cfg.stop_on_spike and z > self.cfg.spike_sigma
                        and loss - mean > self.cfg.spike_min_jump):
                    reason = "loss_spike"
        self.window.append(loss)
        return reason

    def state_dict(self) -> dict:
        return {"window": list(self.window), "spike_score": self.spike_score}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state["window"])
        self.spike_score = state["spike_score"]
