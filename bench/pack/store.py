"""Stacked parameters of K members as views into one flat (K, P) buffer, and their gradients.

Each member's parameters are one row of ``flat``; ``params[name]`` is a (K, *shape) view
into it, and ``grad`` the (K, P) buffer that ``write_grads`` fills from autograd's
per-parameter gradients. The optimizer and the per-member gradient norm are then a
handful of row-wise ops on (K, P) tensors instead of a Python loop over parameters.
Matrices (weight-decayed) come first, columns ``[0, n_decay)`` of a row; the parameter
named ``first`` (the output embedding) leads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model import GPT


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class FlatParams:
    """The trainable state of a pack: ``flat`` (K, P), ``grad`` (K, P) and named views of both."""

    def __init__(self, slots: list[Slot], flat: torch.Tensor, n_decay: int):
        self.slots, self.n_decay = slots, n_decay
        self.flat = flat
        self.grad = torch.empty_like(flat)
        self.params: dict[str, torch.Tensor] = {}
        self._bind()

    @classmethod
    def from_models(cls, models: list[GPT], first: str | None = None) -> "FlatParams":
        """Stack the parameters of K identically shaped models (member k = models[k])."""
        named = list(models[0].named_parameters())  # a tied matrix appears once
        order = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
        if first is not None:
            order.remove(first)
            order.insert(0, first)
        shapes = dict((n, tuple(p.shape)) for n, p in named)
        slots, off = [], 0
        for n in order:
            slots.append(Slot(n, shapes[n], off))
            off += slots[-1].numel
        n_decay = sum(s.numel for s in slots if len(s.shape) >= 2)
        p0 = named[0][1]
        flat = torch.empty(len(models), off, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for k, m in enumerate(models):
                mp = dict(m.named_parameters())
                for s in slots:
                    flat[k, s.offset:s.offset + s.numel].copy_(mp[s.name].reshape(-1))
        return cls(slots, flat, n_decay)

    def _bind(self) -> None:
        K = self.flat.shape[0]
        self.params = {}
        for s in self.slots:
            sl = slice(s.offset, s.offset + s.numel)
            p = self.flat[:, sl].view(K, *s.shape)
            p.requires_grad_(True)
            self.params[s.name] = p
        self.leaves = [self.params[s.name] for s in self.slots]

    def grad_columns(self, names: list[str]) -> torch.Tensor:
        """The (K, n) block of ``grad`` holding the parameters ``names`` (consecutive slots)."""
        slots = {s.name: s for s in self.slots}
        start = slots[names[0]].offset
        end = slots[names[-1]].offset + slots[names[-1]].numel
        if end - start != sum(slots[n].numel for n in names):
            raise ValueError(f"parameters {names} are not consecutive in the flat buffer")
        return self.grad[:, start:end]

    @staticmethod
    def write_grads(block: torch.Tensor, grads: list[torch.Tensor], add: bool) -> None:
        """Store (or add) per-parameter gradients (K, *shape) into a (K, n) block, in slot order."""
        K = block.shape[0]
        flat = grads[0].reshape(K, -1) if len(grads) == 1 else torch.cat([g.reshape(K, -1) for g in grads], dim=1)
        if add:
            block += flat
        else:
            block.copy_(flat)

    @property
    def k(self) -> int:
        return self.flat.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only members ``rows`` (1-D index tensor), in that order."""
        self.flat = self.flat.index_select(0, rows)
        self.grad = torch.empty_like(self.flat)
        self._bind()

    @torch.no_grad()
    def load_into(self, model: GPT, k: int) -> GPT:
        """Copy member k's parameters into ``model`` (same architecture); returns it."""
        for name, p in model.named_parameters():
            p.copy_(self.params[name][k])
        return model
