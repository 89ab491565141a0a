"""AdamW and global-norm gradient clipping for K members at once, one member per row.

The math is ``torch.optim.AdamW`` (single-tensor path) applied to each row of the flat
(K, P) buffers of :class:`~bench.pack.store.FlatParams`, with per-member learning rate,
betas, eps, weight decay and clipping threshold::

    g      ← g · min(1, clip / (‖g‖ + 1e-6))          (‖g‖: this member's global norm)
    θ      ← θ · (1 − lr·wd)                            (matrices only)
    m      ← lerp(m, g, 1 − β1)
    v      ← β2·v + (1 − β2)·g²
    θ      ← θ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)

Two implementations of the update, equal up to rounding:

- ``fused`` (default where available): ``torch._fused_adamw_`` — the kernel behind
  ``torch.optim.AdamW(fused=True)`` — called once per member on its contiguous row (twice
  with weight decay: matrices, then vectors). One pass over θ, g, m, v per member instead
  of ~8 full passes over the (K, P) buffers: measured 4× faster on a 2-core CPU
  (K = 8, 1.15 M parameters per member), where AdamW over large stacked buffers is
  memory-bound.
- ``vectorized``: the single-tensor AdamW's ops on the (K, P) buffers with (K, 1) columns
  of per-member step sizes, bias corrections and decay factors, computed as Python floats
  exactly as torch computes them. Used where the fused kernel is missing.

Both are row-wise: nothing flows between members.
"""
from __future__ import annotations

import math

import torch

from .store import FlatParams


def _has_fused(device: torch.device) -> bool:
    return hasattr(torch, "_fused_adamw_") and device.type in ("cpu", "cuda")


class PackedAdamW:
    def __init__(self, store: FlatParams, *, betas: list[tuple[float, float]], eps: list[float],
                 weight_decay: list[float], grad_clip: list[float], fused: bool | None = None):
        self.store = store
        self.fused = _has_fused(store.flat.device) if fused is None else fused
        self._step_t = torch.zeros((), dtype=torch.float32, device=store.flat.device)
        self.exp_avg = torch.zeros_like(store.flat)
        self.exp_avg_sq = torch.zeros_like(store.flat)
        self.betas, self.eps, self.wd = list(betas), list(eps), list(weight_decay)
        self.clip = [c if c > 0 else math.inf for c in grad_clip]
        self.t = 0
        self._refresh()

    def _col(self, values: list[float]) -> torch.Tensor | float:
        """A Python float when all members agree (torch's own scalar path), else a (K, 1) column."""
        if all(v == values[0] for v in values):
            return values[0]
        flat = self.store.flat
        return torch.tensor(values, dtype=flat.dtype, device=flat.device).unsqueeze(1)

    def _refresh(self) -> None:
        flat = self.store.flat
        self._clip = torch.tensor(self.clip, dtype=flat.dtype, device=flat.device)
        self._b1 = self._col([1 - b1 for b1, _ in self.betas])
        self._b2 = self._col([b2 for _, b2 in self.betas])
        self._1mb2 = self._col([1 - b2 for _, b2 in self.betas])
        self._eps = self._col(self.eps)

    def select(self, rows: torch.Tensor, keep: list[int]) -> None:
        """Keep members ``keep`` (positions in the current order); the store must be selected too."""
        self.exp_avg = self.exp_avg.index_select(0, rows)
        self.exp_avg_sq = self.exp_avg_sq.index_select(0, rows)
        for name in ("betas", "eps", "wd", "clip"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        self._refresh()

    def state_dict(self) -> dict:
        """Moments (K, P) and the step count; the hyperparameters come from the members' configs."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "t": self.t}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.t = int(state["t"])

    @torch.no_grad()
    def clip_grad_norm_(self) -> torch.Tensor:
        """Scale each member's gradient to global norm ≤ its clip; returns the norms before, (K,)."""
        g = self.store.grad
        norm = torch.linalg.vector_norm(g, dim=1)
        coef = torch.clamp(self._clip / (norm + 1e-6), max=1.0)
        if g.device.type != "cpu" or bool((coef != 1.0).any()):  # × 1 changes no bit; on CPU a test costs no sync
            g.mul_(coef.unsqueeze(1))
        return norm

    @torch.no_grad()
    def step(self, lrs: list[float]) -> None:
        """One update of every member; ``lrs`` the members' learning rates for this step."""
        self.t += 1
        if self.fused:
            self._step_fused(lrs)
        else:
            self._step_vectorized(lrs)

    def _step_fused(self, lrs: list[float]) -> None:
        self._step_t.fill_(self.t)  # the kernel reads the (already incremented) step count
        flat, g, m, v, nd = self.store.flat, self.store.grad, self.exp_avg, self.exp_avg_sq, self.store.n_decay
        for k, lr in enumerate(lrs):
            b1, b2 = self.betas[k]
            parts = [slice(0, nd), slice(nd, None)] if self.wd[k] != 0 else [slice(None)]
            for part, wd in zip(parts, (self.wd[k], 0.0)):
                torch._fused_adamw_([flat[k, part]], [g[k, part]], [m[k, part]], [v[k, part]], [], [self._step_t],
                                    lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=self.eps[k],
                                    amsgrad=False, maximize=False)

    def _step_vectorized(self, lrs: list[float]) -> None:
        t, flat, g = self.t, self.store.flat, self.store.grad
        m, v = self.exp_avg, self.exp_avg_sq
        nd = self.store.n_decay
        decay = [1 - lr * wd for lr, wd in zip(lrs, self.wd)]
        if any(d != 1 for d in decay):
            flat[:, :nd].mul_(self._col(decay))
        m.lerp_(g, self._b1)
        if isinstance(self._b2, float):
            v.mul_(self._b2).addcmul_(g, g, value=self._1mb2)
        else:
            v.mul_(self._b2).addcmul_(g, g * self._1mb2)
        # torch: step_size = lr / (1 - β1^t); denom = √v / √(1 - β2^t) + ε; θ += −step_size · m / denom
        step_size = self._col([-lr / (1 - b1 ** t) for lr, (b1, _) in zip(lrs, self.betas)])
        bc2_sqrt = self._col([(1 - b2 ** t) ** 0.5 for _, b2 in self.betas])
        denom = (v.sqrt() / bc2_sqrt).add_(self._eps)
        if isinstance(step_size, float):
            flat.addcdiv_(m, denom, value=step_size)
        else:  # addcdiv computes θ + (value·m)/denom; value·m first keeps the same rounding
            flat.addcdiv_(m * step_size, denom)
