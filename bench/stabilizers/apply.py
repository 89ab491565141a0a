"""How an engine applies a stabilizer's hooks: written once for one model and for packs.

``SingleModule`` passes a stabilizer's bound hooks; ``PackedStabilizer`` passes the same hooks
vmapped over its members. A hook the stabilizer does not override is passed as None and costs
nothing. Order per step (see ``bench.stabilizers.base``)::

    logits = transform_logits(E·h)   →   ce, log Z = cross_entropy(logits)
    reg = mean_tokens(token_loss(log Z)) + loss_term(...)
    backward, clip, optimizer step   →   params[name] ← after_step(params)[name]   (no grad)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..errors import StabilizerError
from ..losses import cross_entropy_lse
from .base import OUTPUT_EMBEDDING

Transform = Callable[[torch.Tensor], torch.Tensor]
LossTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TokenLoss = Callable[[torch.Tensor], torch.Tensor]
AfterStep = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def label(cls: type) -> str:
    """How errors name a stabilizer class: ``module:Class``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _fault(stabilizer: str, hook: str, message: str) -> StabilizerError:
    return StabilizerError(f"stabilizer {stabilizer!r}: {hook} {message}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} tensor"
    return f"{type(value).__name__} {value!r}"[:120]


def _versions(tensors) -> list[int]:
    """Version counters of ``tensors`` (bumped by every in-place edit; reading them never syncs)."""
    return [t._version for t in tensors]


def _check_unedited(stabilizer: str, hook: str, names: list[str], tensors: list[torch.Tensor],
                    before: list[int]) -> None:
    edited = [n for n, t, v in zip(names, tensors, before) if t._version != v]
    if edited:
        raise _fault(stabilizer, hook, f"edited its input(s) {', '.join(edited)} in place; hooks must return new "
                     "tensors (e.g. x = x * 2, not x.mul_(2) or x[...] = ...)")


def check_tensor(stabilizer: str, hook: str, what: str, value: Any, shape: tuple[int, ...]) -> None:
    """A hook's result must be a floating-point tensor of ``shape`` (structure only: no host sync)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != tuple(shape):
        raise _fault(stabilizer, hook, f"must return {what}: a floating-point tensor of shape {tuple(shape)}, "
                     f"got {_describe(value)}")


def hooked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, hidden: torch.Tensor, output_embedding: torch.Tensor,
                         transform: Transform | None, loss_term: LossTerm | None, stabilizer: str = "stabilizer",
                         token_loss: TokenLoss | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token cross-entropy, log Z, the regularization (None without one) and the transformed logits.

    logits (..., T, V) in the compute dtype (raised to at least float32 here); y (..., T) int64
    targets of the same leading shape; hidden (..., T, H); output_embedding (..., V, H).
    ``loss_term(logits, lse, hidden, E)`` receives the transformed logits and the shared log Z;
    ``token_loss(lse)`` returns a per-token penalty whose mean over the last two dims (B, T) joins it.
    What the hooks return is checked structurally (shape, dtype; inputs not edited in place), in
    Python without a host sync; ``stabilizer`` names the plug-in in the StabilizerError.
    """
    lt = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if transform is not None:
        before = lt._version
        out = transform(lt)
        _check_unedited(stabilizer, "transform_logits", ["logits"], [lt], [before])
        check_tensor(stabilizer, "transform_logits", "logits", out, lt.shape)
        if out.dtype != lt.dtype:
            raise _fault(stabilizer, "transform_logits", f"must return {lt.dtype} logits (as given), got {out.dtype}")
        lt = out
    ce_tok, lse, reg, logits_out = *cross_entropy_lse(lt, y), None, lt
    if token_loss is not None:
        before = lse._version
        pen = token_loss(lse)
        _check_unedited(stabilizer, "token_loss", ["lse"], [lse], [before])
        check_tensor(stabilizer, "token_loss", "a per-token penalty", pen, lse.shape)
        reg = pen.mean(dim=(-2, -1))
    if loss_term is not None:
        inputs = [lt, lse, hidden, output_embedding]
        before = _versions(inputs)
        term = loss_term(lt, lse, hidden, output_embedding)
        _check_unedited(stabilizer, "loss_term", ["logits", "lse", "hidden", "output_embedding"], inputs, before)
        if term is not None:
            check_tensor(stabilizer, "loss_term", "a scalar loss", term, lt.shape[:-3])
            reg = term if reg is None else reg + term
    return ce_tok, lse, reg, logits_out


def checked_cap(stabilizer: str, value: Any) -> float:
    """A ``logit_cap`` result as a float: it must be a positive finite number (not a tensor); else
    StabilizerError naming ``stabilizer``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise _fault(stabilizer, "logit_cap", f"must return the cap c of c·tanh(l/c), a positive finite number, "
                     f"got {_describe(value)}")
    return float(value)


def embedding_term(hook: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], stabilizer: str = "stabilizer"):
    """``hook`` (a ``loss_term_with_grad``) with its result checked on every call, without a host sync: it must
    leave E unedited and return (a scalar, a floating-point tensor that broadcasts to E's shape); else
    StabilizerError naming ``stabilizer``."""
    name = "loss_term_with_grad"

    def call(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before = _versions([E])
        out = hook(E)
        _check_unedited(stabilizer, name, ["output_embedding"], [E], before)
        if not isinstance(out, tuple) or len(out) != 2:
            raise _fault(stabilizer, name, f"must return a pair (value, gradient of E), got {_describe(out)}")
        check_tensor(stabilizer, name, "a scalar loss first", out[0], ())
        check_broadcast(stabilizer, name, "the gradient of E second", out[1], tuple(E.shape))
        return out

    return call


@torch.no_grad()
def apply_after_step(after_step: AfterStep, params: dict[str, torch.Tensor], output_embedding_name: str,
                     stabilizer: str = "stabilizer", delta: AfterStep | None = None) -> None:
    """Run ``after_step`` on detached ``params`` (plus E as ``OUTPUT_EMBEDDING``) and copy what it
    returns into those parameters, in place; or, given ``delta`` (a stabilizer's ``after_step_delta``),
    run that instead and add what it returns to them, in place. The result must map known names to
    floating tensors of the parameters' shapes (a delta: of a shape that broadcasts to it), and the
    hook must not edit ``params`` itself (checked without a host sync); else StabilizerError naming
    ``stabilizer``."""
    named = {n: p.detach() for n, p in params.items()}
    named[OUTPUT_EMBEDDING] = named[output_embedding_name]
    names, tensors = list(named), list(named.values())
    hook = "after_step" if delta is None else "after_step_delta"
    before = _versions(tensors)
    new = (after_step if delta is None else delta)(named)
    _check_unedited(stabilizer, hook, names, tensors, before)
    if not isinstance(new, dict):
        raise _fault(stabilizer, hook, f"must return a dict {{parameter name: tensor}}, got {_describe(new)}")
    unknown = [n for n in new if n not in named]
    if unknown:
        raise _fault(stabilizer, hook, f"returned unknown parameter name(s) {', '.join(map(repr, unknown[:3]))}; "
                     f"allowed: {OUTPUT_EMBEDDING!r} or a name of model.named_parameters()")
    for name, value in new.items():
        if delta is None:
            check_tensor(stabilizer, hook, f"the new value of {name!r}", value, named[name].shape)
        else:
            check_broadcast(stabilizer, hook, f"the increment of {name!r}", value, named[name].shape)
    for name, value in new.items():
        target = named[output_embedding_name if name == OUTPUT_EMBEDDING else name]
        if delta is None:
            target.copy_(value)
        else:
            target.add_(value)


def check_broadcast(stabilizer: str, hook: str, what: str, value: Any, shape: tuple[int, ...]) -> None:
    """A hook's result must be a floating-point tensor whose shape broadcasts to ``shape`` unchanged."""
    ok = (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() <= len(shape)
          and all(v in (1, s) for v, s in zip(reversed(value.shape), reversed(tuple(shape)))))
    if not ok:
        raise _fault(stabilizer, hook, f"must return {what}: a floating-point tensor of a shape that broadcasts to "
                     f"{tuple(shape)}, got {_describe(value)}")
