"""Run one-member stabilizer hooks for K members at once (vmap over per-member hyperparameters).

A stabilizer is a frozen dataclass whose fields are hyperparameters, and its hooks are
pure tensor functions (see ``bench.stabilizers.base``). Members of a pack share the class;
a field on which they disagree becomes a (K,) tensor, and the pack calls the unchanged
hook under ``torch.vmap`` on an instance whose field is that member's 0-d tensor. A hook
(or a ``__post_init__``) that cannot run under vmap raises ``PackError``; the sweep worker
then trains those trials one at a time. Fields on which
all members agree stay the plain Python values, so such a hook computes exactly what it
computes in a single run.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import PackError
from ..stabilizers import LossInputs, Stabilizer, make_stabilizer
from ..stabilizers.apply import apply_after_step as apply_hook, hooked_cross_entropy, label

__all__ = ["PackError", "PackedStabilizer"]


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
        """The stabilizer of one member inside vmap: built by its own constructor, so its
        ``__post_init__`` validation runs on the (batched) values too. Every member was also
        built and validated with plain numbers (``self.members``)."""
        return self.cls(**self.shared, **dict(zip(self.varying, varying)))

    def loss(self, logits: torch.Tensor, hidden: torch.Tensor, output_embedding: torch.Tensor, y: torch.Tensor,
             rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-member ``train_module.stabilized_loss`` on stacked forward outputs of members ``rows``.

        logits (n, B, T, V), hidden (n, B, T, H), output_embedding (n, V, H), y (B, T) shared.
        Returns ce (n,), reg (n,), transformed logits (n, B, T, V) and lse (n, B, T).
        The hooks run under vmap; the cross-entropy (most of the work) runs once on the stacked
        logits, since vmap's log-softmax is ~2× slower than the plain kernel (measured on
        (4, 512, 2048) fp32 logits, 1 thread).
        """
        n = logits.shape[0]
        varying = tuple(t[rows] for t in self.tensors)
        transform = term = tok = None
        if self.cls.has_hook("token_loss"):
            vmapped_tok = torch.vmap(lambda ls, v: self._member(v).token_loss(ls))
            tok = self._checked("token_loss", lambda lse: vmapped_tok(lse, varying))
        if self.cls.has_hook("transform_logits"):
            vmapped = torch.vmap(lambda lg, v: self._member(v).transform_logits(lg))
            transform = self._checked("transform_logits", lambda lt: vmapped(lt, varying))
        if self.cls.has_hook("loss_term"):
            def one(lg, ls, h, E, v):
                r = self._member(v).loss_term(LossInputs(lg, ls, h, E))
                return torch.zeros((), device=lg.device) if r is None else r

            vmapped_term = torch.vmap(one)
            term = self._checked("loss_term", lambda lt, lse, h, E: vmapped_term(lt, lse, h, E, varying))
        ce_tok, lse, reg, lt = hooked_cross_entropy(logits, y.expand(n, *y.shape), hidden, output_embedding,
                                                    transform, term, label(self.cls), tok)
        ce = ce_tok.mean(dim=tuple(range(1, ce_tok.dim())))
        if reg is None:
            reg = torch.zeros(n, device=ce.device)
        return ce, reg, lt, lse

    def _checked(self, hook: str, fn):
        """``fn`` with vmap failures reported as PackError naming the stabilizer and ``hook``."""
        def call(*args):
            with self._vmap_errors(hook):
                return fn(*args)
        return call

    def after_step(self, params: dict[str, torch.Tensor], output_embedding_name: str) -> None:
        """Apply every member's ``after_step`` to the stacked parameters, in place."""
        if not self.has_after_step:
            return
        vmapped = torch.vmap(lambda ps, v: self._member(v).after_step(ps))
        apply_hook(self._checked("after_step", lambda named: vmapped(named, self.tensors)), params,
                   output_embedding_name, label(self.cls))
