"""The stabilizer submission interface.

A stabilizer is a frozen dataclass whose fields are its typed hyperparameters,
with up to four hooks. Every hook is a *pure tensor function*: it returns new
tensors, edits nothing in place and never syncs with the host (no ``.item()``),
so the engine can vectorize it over sweep members. The trainer applies what the
hooks return, in this order, every step::

    logits = stab.transform_logits(E·h)                     # (B, T, V), elementwise
    loss   = cross_entropy(logits)                          # mean over tokens
           + mean_tokens(stab.token_loss(log Z))            # per-token penalty of log Z
           + stab.loss_term(inputs)                          # scalar
    loss.backward(); clip; optimizer.step()
    for name, new in stab.after_step(params).items():        # no grad
        params[name] <- new

Implement only the hooks you need; the defaults do nothing. Three optional hooks give the same
work in a faster form (``transform_logits_with_slope``, ``loss_term_with_grad``, ``after_step_delta``).

The loss head runs in chunks of tokens (``bench.head``: it never holds all B·T × V logits)
when the stabilizer lets it: ``transform_logits`` must be elementwise (each logit's new value
depends on that logit only), a penalty of log Z goes in ``token_loss`` (per token), and
``loss_term`` declares in ``loss_term_uses`` which inputs it reads. A ``loss_term`` that reads
``logits`` or ``lse`` (the default declaration, safe for any code) gets the unchunked head.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, FrozenSet

import torch

OUTPUT_EMBEDDING = "output_embedding"
"""Key of E ∈ R^{V×H} in the ``params`` dict given to ``after_step`` (tied or not)."""


LOSS_INPUTS: FrozenSet[str] = frozenset({"logits", "lse", "hidden", "output_embedding"})


@dataclass(frozen=True)
class LossInputs:
    """What ``loss_term`` may use. All tensors are part of the autograd graph.

    logits: (B, T, V) logits after ``transform_logits``, in the compute dtype
            (None in the chunked head, given only to a term that does not declare it).
    lse:    (B, T) float32 logsumexp of those logits (log Z), shared with the cross-entropy
            (None in the chunked head, as logits).
    hidden: (B, T, H) final hidden states h.
    output_embedding: (V, H) the LM-head matrix E (the shared matrix with weight tying).
    """

    logits: torch.Tensor | None
    lse: torch.Tensor | None
    hidden: torch.Tensor
    output_embedding: torch.Tensor


@dataclass(frozen=True)
class Stabilizer:
    """Base class: subclass it, set ``name``, add hyperparameters as float fields."""

    name: ClassVar[str] = "base"
    loss_term_uses: ClassVar[FrozenSet[str]] = LOSS_INPUTS
    """The ``LossInputs`` fields ``loss_term`` reads; without "logits" and "lse" the chunked head serves it."""

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Map logits (B, T, V) to the logits the cross-entropy sees."""
        return logits

    def transform_logits_with_slope(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional, for speed: (transform_logits(logits), its elementwise derivative), both (..., V),
        in plain tensor ops. With it the chunked head applies the transform without an autograd graph
        over the logits (the gradient is multiplied by the slope), and compiled CUDA runs fuse it into
        the head's two compiled passes; without it the transform runs through autograd. Must agree
        with ``transform_logits`` (tests/test_head.py checks the built-in one)."""
        raise NotImplementedError

    def logit_cap(self) -> float:
        """Optional, for speed, beside a ``transform_logits`` that is soft-capping, c·tanh(l/c): the cap c
        (a positive float). With it a chunked head that multiplies in oneDNN (fp32 on x86 CPUs) takes
        σ(2l/c) from its logit GEMM's epilogue, c·tanh(l/c) = 2c·σ(2l/c) − c, and the slope by one
        ``sigmoid_backward`` pass, instead of the transform's own passes (``bench.head``); elsewhere
        ``transform_logits`` (and its slope) serve. Must agree with ``transform_logits``: the preflight of a
        plug-in checks it on small random inputs."""
        raise NotImplementedError

    def token_loss(self, lse: torch.Tensor) -> torch.Tensor:
        """Per-token penalty of log Z: lse (..., T) float32 → a tensor of the same shape, whose
        mean over tokens is added to the loss (z-loss: λ·lse²). Runs inside the chunked head."""
        return torch.zeros_like(lse)

    def loss_term(self, inputs: LossInputs) -> torch.Tensor | None:
        """Scalar regularization added to the cross-entropy, or None."""
        return None

    def loss_term_with_grad(self, output_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional, for speed, beside a ``loss_term`` that reads only ``output_embedding``: (its value, a
        scalar; its gradient with respect to E (V, H), a tensor that broadcasts to (V, H)), in plain tensor
        ops on the detached E. With it the chunked head adds the value to its loss and, in its backward, the
        gradient to E's, with no autograd graph (μ-loss's hooks at ``micro``: 116 vs 184 µs a step); the
        unchunked head and packs of unchunked heads keep ``loss_term``. Must agree with ``loss_term``: the
        preflight of a plug-in checks both on small random inputs."""
        raise NotImplementedError

    def after_step(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values for some parameters after the optimizer step.

        ``params`` maps parameter names (as in ``model.named_parameters()``) to
        detached tensors, plus ``OUTPUT_EMBEDDING`` for E. Return {name: new tensor}.
        """
        return {}

    def after_step_delta(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Optional, for speed, alongside ``after_step``: the same update as increments,
        {name: delta} with params[name] ← params[name] + delta, where delta broadcasts to the
        parameter's shape (μ-centering: −μ, (1, H)). With it an unpacked run adds each delta in
        place instead of forming a parameter-sized new value and copying it over the parameter
        (μ-centering at ``micro``: ~0.1 vs ~0.4 ms a step). Must agree with ``after_step``:
        the preflight of a plug-in checks it on small random inputs."""
        raise NotImplementedError

    # -- engine side ---------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def has_hook(cls, hook: str) -> bool:
        """True when ``cls`` overrides ``hook`` (the trainer skips hooks that do nothing)."""
        return getattr(cls, hook) is not getattr(Stabilizer, hook)

    @classmethod
    def chunkable(cls) -> bool:
        """True when the chunked loss head can serve ``cls``: no ``loss_term``, or one that reads
        neither the full logits nor log Z (``loss_term_uses``)."""
        return not cls.has_hook("loss_term") or not ({"logits", "lse"} & set(cls.loss_term_uses))

    @classmethod
    def loss_term_of_embedding_alone(cls) -> bool:
        """True when ``cls`` has a ``loss_term`` that reads only E (``loss_term_uses``): the only kind a
        ``loss_term_with_grad`` may stand in for."""
        return cls.has_hook("loss_term") and set(cls.loss_term_uses) <= {"output_embedding"}


def check_nonnegative(stab: Stabilizer, field: str) -> None:
    """Raise ValueError unless ``stab.field`` is a finite number >= 0 (tensors pass: packed runs)."""
    value = getattr(stab, field)
    if isinstance(value, torch.Tensor):
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{stab.name}.{field} must be a finite number >= 0, got {value!r}")


def check_positive(stab: Stabilizer, field: str) -> None:
    check_nonnegative(stab, field)
    value = getattr(stab, field)
    if not isinstance(value, torch.Tensor) and value <= 0:
        raise ValueError(f"{stab.name}.{field} must be a finite number > 0, got {value!r}")
