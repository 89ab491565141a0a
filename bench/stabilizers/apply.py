"""How an engine applies a stabilizer's hooks: written once for one model and for packs.

``SingleModule`` passes a stabilizer's bound hooks; ``PackedStabilizer`` passes the same hooks
vmapped over its members. A hook the stabilizer does not override is passed as None and costs
nothing. Order per step (see ``bench.stabilizers.base``)::

    logits = transform_logits(E·h)   →   ce, log Z = cross_entropy(logits)   →   reg = loss_term(...)
    backward, clip, optimizer step   →   params[name] ← after_step(params)[name]   (no grad)
"""
from __future__ import annotations

from typing import Callable

import torch

from ..losses import cross_entropy_lse
from .base import OUTPUT_EMBEDDING

Transform = Callable[[torch.Tensor], torch.Tensor]
LossTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
AfterStep = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def hooked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, hidden: torch.Tensor, output_embedding: torch.Tensor,
                         transform: Transform | None, loss_term: LossTerm | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token cross-entropy, log Z, the loss term (None without one) and the transformed logits.

    logits (..., T, V) in the compute dtype (raised to at least float32 here); y (..., T) int64
    targets of the same leading shape; hidden (..., T, H); output_embedding (..., V, H).
    ``loss_term(logits, lse, hidden, E)`` receives the transformed logits and the shared log Z.
    """
    lt = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if transform is not None:
        lt = transform(lt)
    ce_tok, lse = cross_entropy_lse(lt, y)
    reg = loss_term(lt, lse, hidden, output_embedding) if loss_term is not None else None
    return ce_tok, lse, reg, lt


@torch.no_grad()
def apply_after_step(after_step: AfterStep, params: dict[str, torch.Tensor], output_embedding_name: str) -> None:
    """Run ``after_step`` on detached ``params`` (plus E as ``OUTPUT_EMBEDDING``) and copy what it
    returns into those parameters, in place."""
    named = {n: p.detach() for n, p in params.items()}
    named[OUTPUT_EMBEDDING] = named[output_embedding_name]
    for name, value in after_step(named).items():
        named[output_embedding_name if name == OUTPUT_EMBEDDING else name].copy_(value)
