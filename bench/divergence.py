"""Divergence detection: the rules of ``DivergenceConfig`` applied to per-step losses."""
from __future__ import annotations

import math
from collections import deque

from .config import DivergenceConfig

REASONS = {"nonfinite": "nonfinite", "loss_above_L0": "loss_above_L0", "spike": "loss_spike"}
"""Rule name (a ``DivergenceConfig`` field) -> the reason recorded when it fires."""


class DivergenceMonitor:
    """Feed it (step, train loss, grad norm) in step order; it returns the reason of a rule in
    ``stop`` mode that fired (the run diverged), else None. ``events`` holds the first step at
    which each rule in ``stop`` or ``record`` mode fired, by reason."""

    def __init__(self, cfg: DivergenceConfig, L0: float, warmup: int):
        self.cfg, self.L0, self.warmup = cfg, L0, warmup
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.spike_score = 0.0
        self.events: dict[str, int] = {}

    def _fired(self, rule: str, step: int) -> str | None:
        mode = getattr(self.cfg, rule)
        if mode == "off":
            return None
        self.events.setdefault(REASONS[rule], step)
        return REASONS[rule] if mode == "stop" else None

    def update(self, step: int, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self._fired("nonfinite", step)
        reason = None
        if step > self.warmup:
            if loss > self.L0 + self.cfg.loss_margin:
                reason = self._fired("loss_above_L0", step)
            if len(self.window) >= max(8, self.cfg.spike_window // 4):
                n = len(self.window)
                mean = sum(self.window) / n
                std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / (n - 1))
                z = (loss - mean) / max(std, 1e-12)
                self.spike_score = max(self.spike_score, z)
                if z > self.cfg.spike_sigma and loss - mean > self.cfg.spike_min_jump:
                    spike = self._fired("spike", step)  # recorded even when another rule stops the run
                    reason = reason or spike
        self.window.append(loss)
        return reason

    def events_text(self) -> str:
        """``reason@step`` of every rule that fired, in step order (e.g. ``loss_spike@412``), '' if none."""
        return ",".join(f"{r}@{s}" for r, s in sorted(self.events.items(), key=lambda kv: kv[1]))

    def state_dict(self) -> dict:
        return {"window": list(self.window), "spike_score": self.spike_score, "events": dict(self.events)}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state["window"])
        self.spike_score = state["spike_score"]
        self.events = dict(state.get("events", {}))
