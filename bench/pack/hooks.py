"""Run one-member stabilizer hooks for K members at once (vmap over per-member hyperparameters).

A stabilizer is a frozen dataclass whose fields are hyperparameters, and its hooks are
pure tensor functions (see ``bench.stabilizers.base``). Members of a pack share the class;
a field on which they disagree becomes a (K,) tensor, and the engine calls the unchanged
hook under ``torch.vmap`` with that field as a 0-d tensor of each member. Fields on which
all members agree stay the plain Python values, so such a hook computes exactly what it
computes in a single run.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from ..errors import PackError
from ..losses import cross_entropy_lse
from ..stabilizers import OUTPUT_EMBEDDING, LossInputs, Stabilizer, make_stabilizer


def _instance(cls: type[Stabilizer], values: dict[str, Any]) -> Stabilizer:
    """A ``cls`` with these field values, built without ``__post_init__``.

    Every member's values were validated when its own stabilizer was made; validation of
    a vmapped 0-d tensor could only fail (``float(tensor)`` inside vmap is not allowed).
    """
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj


class PackedStabilizer:
    """The members' stabilizers (one class, per-member hyperparameters) applied to stacked tensors."""

    def __init__(self, spec: str, hparams: list[dict[str, float]], dtype: torch.dtype, device: torch.device):
        self.members = [make_stabilizer(spec, **hp) for hp in hparams]
        self.cls = type(self.members[0])
        values = [s.hyperparameters() for s in self.members]
        names = list(values[0])
        self.shared = {n: values[0][n] for n in names if all(v[n] == values[0][n] for v in values)}
        self.varying = [n for n in names if n not in self.shared]
        self._dtype, self._device = dtype, device
        self._values = values
        self.tensors: tuple[torch.Tensor, ...] = ()
        self.select(list(range(len(values))))
        self.has_after_step = self.cls.has_hook("after_step")

    def select(self, keep: list[int]) -> None:
        """Keep members ``keep`` (positions in the current order)."""
        self._values = [self._values[i] for i in keep]
        self.members = [self.members[i] for i in keep]
        self.tensors = tuple(torch.tensor([float(v[n]) for v in self._values], dtype=self._dtype, device=self._device)
                             for n in self.varying)

    @contextmanager
    def _vmap_errors(self, hooks: str):
        """Name the stabilizer when its hooks cannot run under vmap (e.g. ``.item()`` or ``if tensor:``)."""
        try:
            yield
        except RuntimeError as e:
            if "vmap" not in str(e) and "Batched" not in str(e):
                raise
            raise PackError(f"stabilizer {self.cls.__name__}: {hooks} cannot be vectorized over pack members "
                            f"({e}); hooks must be pure tensor functions, or train these configs unpacked "
                            "(pack size 1)") from e

    def _member(self, varying: tuple) -> Stabilizer:
        return _instance(self.cls, {**self.shared, **dict(zip(self.varying, varying))})

    def loss(self, logits: torch.Tensor, hidden: torch.Tensor, output_embedding: torch.Tensor, y: torch.Tensor,
             rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-member ``trainer.stabilized_loss`` on stacked forward outputs of members ``rows``.

        logits (n, B, T, V), hidden (n, B, T, H), output_embedding (n, V, H), y (B, T) shared.
        Returns ce (n,), reg (n,), transformed logits (n, B, T, V) and lse (n, B, T).
        The hooks run under vmap; the cross-entropy (most of the work) runs once on the stacked
        logits, since vmap's log-softmax is ~2× slower than the plain kernel (measured on
        (4, 512, 2048) fp32 logits, 1 thread).
        """
        n = logits.shape[0]
        varying = tuple(t[rows] for t in self.tensors)
        lt = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.cls.has_hook("transform_logits"):
            def transform(lg, v):
                return self._member(v).transform_logits(lg)

            with self._vmap_errors("transform_logits"):
                lt = torch.vmap(transform)(lt, varying)
        ce_tok, lse = cross_entropy_lse(lt, y.expand(n, *y.shape))
        ce = ce_tok.mean(dim=tuple(range(1, ce_tok.dim())))
        reg = None
        if self.cls.has_hook("loss_term"):
            def term(lg, ls, h, E, v):
                r = self._member(v).loss_term(LossInputs(lg, ls, h, E))
                return torch.zeros((), device=lg.device) if r is None else r

            with self._vmap_errors("loss_term"):
                reg = torch.vmap(term)(lt, lse, hidden, output_embedding, varying)
        if reg is None:
            reg = torch.zeros(n, device=ce.device)
        return ce, reg, lt, lse

    @torch.no_grad()
    def after_step(self, params: dict[str, torch.Tensor], output_embedding_name: str) -> None:
        """Apply every member's ``after_step`` to the stacked parameters, in place."""
        if not self.has_after_step:
            return
        named = {n: p.detach() for n, p in params.items()}
        named[OUTPUT_EMBEDDING] = named[output_embedding_name]

        def one(ps, varying):
            return self._member(varying).after_step(ps)

        with self._vmap_errors("after_step"):
            new = torch.vmap(one)(named, self.tensors)
        for name, value in new.items():
            target = named[output_embedding_name if name == OUTPUT_EMBEDDING else name]
            target.copy_(value)
