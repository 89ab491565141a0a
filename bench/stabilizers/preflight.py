"""A plug-in stabilizer's hooks, run once on small random tensors before any training.

``RunConfig.check`` calls ``preflight`` for every stabilizer that is not built in, so a hook
that raises, returns the wrong shape, dtype or names, returns non-finite values, or edits its
inputs in place is one line (StabilizerError naming the plug-in, the hook and the fault) before
a run or a sweep starts, not a traceback or a silently corrupted run later. The model is the
run's architecture (same layers, heads, tying: the same parameter names) at a small width,
vocabulary and sequence, so the check costs milliseconds. During training
``bench.stabilizers.apply`` repeats the structural part of these checks on every call (pure
Python, no host sync); finiteness is only checked here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..errors import StabilizerError
from ..model import GPT, ModelConfig
from .apply import apply_after_step, checked_cap, embedding_term, hooked_cross_entropy
from .base import LossInputs, Stabilizer

HOOKS = ("transform_logits", "token_loss", "loss_term", "after_step")
BATCH, SEQ, VOCAB, HEAD_DIM = 2, 8, 64, 8
_PASSED: set[tuple] = set()


def _guard(spec: str, hook: str, fn: Callable) -> Callable:
    """``fn`` with any exception it raises reported as a StabilizerError naming ``spec`` and ``hook``."""
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except StabilizerError:
            raise
        except Exception as e:
            raise StabilizerError(f"stabilizer {spec!r}: {hook} raised {type(e).__name__}: {e} "
                                  "(preflight on small random inputs)") from e
    return call


def _finite(spec: str, hook: str, what: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise StabilizerError(f"stabilizer {spec!r}: {hook} returned non-finite {what} (inf or NaN) on small "
                              "random inputs")


def small_model_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg``'s architecture (layers, heads, tying) at width ≤ 8·heads, vocabulary ≤ 64, sequence ≤ 8."""
    return dataclasses.replace(cfg, n_embd=min(cfg.n_embd, HEAD_DIM * cfg.n_head), vocab_size=min(cfg.vocab_size, VOCAB),
                               seq_len=min(cfg.seq_len, SEQ))


@torch.no_grad()
def preflight(spec: str, stab: Stabilizer, model_cfg: ModelConfig) -> None:
    """Run each hook ``stab`` overrides once (see module doc); raise StabilizerError on a fault.

    Built-in stabilizers are skipped (their tests cover them); a passing (spec, hyperparameters,
    architecture) is remembered for the process."""
    from . import BUILTIN

    cls = type(stab)
    if BUILTIN.get(spec) is cls:
        return
    if cls.has_hook("after_step_delta") and not cls.has_hook("after_step"):
        raise StabilizerError(f"stabilizer {spec!r}: after_step_delta needs after_step beside it (the update as new "
                              "values; packed runs apply that one)")
    if cls.has_hook("loss_term_with_grad") and not cls.loss_term_of_embedding_alone():
        raise StabilizerError(f"stabilizer {spec!r}: loss_term_with_grad needs beside it a loss_term that reads only "
                              "output_embedding (loss_term_uses = {'output_embedding'}; the unchunked head runs "
                              "that one)")
    if cls.has_hook("logit_cap") and not cls.has_hook("transform_logits"):
        raise StabilizerError(f"stabilizer {spec!r}: logit_cap needs transform_logits beside it (soft-capping as the "
                              "unchunked head, packs and ATen's products run it)")
    if not any(cls.has_hook(h) for h in HOOKS):
        return
    small = small_model_config(model_cfg)
    key = (spec, tuple(sorted(stab.hyperparameters().items())), small)
    if key in _PASSED:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(small)
        x = torch.randint(0, small.vocab_size, (BATCH, small.seq_len))
        y = torch.randint(0, small.vocab_size, (BATCH, small.seq_len))
        logits, hidden = model(x)
    transform = term = tok = None
    if cls.has_hook("token_loss"):
        tok = _guard(spec, "token_loss", stab.token_loss)
    if cls.has_hook("transform_logits"):
        transform = _guard(spec, "transform_logits", stab.transform_logits)
    if cls.has_hook("loss_term"):
        term = _guard(spec, "loss_term", lambda lt, lse, h, E: stab.loss_term(LossInputs(lt, lse, h, E)))
    if transform is not None or term is not None or tok is not None:
        _, _, reg, lt = hooked_cross_entropy(logits, y, hidden, model.output_embedding, transform, term, spec, tok)
        if transform is not None:
            _finite(spec, "transform_logits", "logits", lt)
        if reg is not None:
            _finite(spec, "token_loss / loss_term", "a loss", reg)
    if cls.has_hook("logit_cap"):
        _check_cap_agrees(spec, stab, logits)
    if cls.has_hook("loss_term_with_grad"):
        _check_term_agrees(spec, stab, model.output_embedding.detach(), hidden)
    if cls.has_hook("after_step"):
        def after(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            new = _guard(spec, "after_step", stab.after_step)(named)
            for name, value in (new.items() if isinstance(new, dict) else ()):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    _finite(spec, "after_step", f"values for {name!r}", value)
            return new

        params = dict(model.named_parameters())
        e_name = next(n for n, p in params.items() if p is model.output_embedding)
        copies = {n: p.detach().clone() for n, p in params.items()} if cls.has_hook("after_step_delta") else None
        apply_after_step(after, params, e_name, spec)
        if copies is not None:
            _check_delta_agrees(spec, stab, copies, params, e_name)
    _PASSED.add(key)


def _check_term_agrees(spec: str, stab: Stabilizer, E: torch.Tensor, hidden: torch.Tensor) -> None:
    """``loss_term_with_grad(E)`` passes the structural checks and gives ``loss_term``'s value and its
    autograd gradient with respect to E (to float32 rounding, relative to the largest entry of each)."""
    value, grad = embedding_term(_guard(spec, "loss_term_with_grad", stab.loss_term_with_grad), spec)(E)
    with torch.enable_grad():
        E_ = E.clone().requires_grad_()
        ref = _guard(spec, "loss_term", stab.loss_term)(LossInputs(None, None, hidden, E_))
        if ref is None:  # no term: the pair must be (0, 0)
            ref = torch.zeros((), device=E.device)
        (ref_grad,) = torch.autograd.grad(ref, E_, allow_unused=True) if ref.requires_grad else (None,)
    ref_grad = torch.zeros_like(E) if ref_grad is None else ref_grad
    for what, got, want in (("value", value, ref.detach()), ("gradient", grad.expand_as(E), ref_grad)):
        _finite(spec, "loss_term_with_grad", what, got)
        scale = float(want.abs().max())
        if not torch.allclose(got.to(want.dtype), want, rtol=1e-5, atol=1e-6 * scale):
            raise StabilizerError(f"stabilizer {spec!r}: loss_term_with_grad disagrees with loss_term on the {what} "
                                  f"(max difference {float((got - want).abs().max()):.3g}, largest entry {scale:.3g}, "
                                  "on small random inputs); it must give loss_term's value and its gradient of E")


def _check_cap_agrees(spec: str, stab: Stabilizer, logits: torch.Tensor) -> None:
    """``logit_cap()`` is a positive finite number c and ``transform_logits`` is c·tanh(l/c) (to float32
    rounding) on the small model's logits stretched to span ±4c, where the cap bends them."""
    cap = checked_cap(spec, _guard(spec, "logit_cap", stab.logit_cap)())
    lt = logits.detach() * (4 * cap / float(logits.detach().abs().max().clamp_min(1e-30)))
    got = _guard(spec, "transform_logits", stab.transform_logits)(lt)
    want = cap * torch.tanh(lt.double() / cap)
    if not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6 * cap):
        raise StabilizerError(f"stabilizer {spec!r}: logit_cap {cap:g} disagrees with transform_logits (max difference "
                              f"from {cap:g}·tanh(l/{cap:g}) {float((got.double() - want).abs().max()):.3g} on small "
                              "random inputs); it must be the c of a transform_logits that is c·tanh(l/c)")


def _check_delta_agrees(spec: str, stab: Stabilizer, copies: dict[str, torch.Tensor],
                        after: dict[str, torch.Tensor], e_name: str) -> None:
    """``after_step_delta``, applied to ``copies`` of the parameters as they were before ``after_step``,
    passes the structural checks and moves every parameter where ``after_step`` put it (``after``; to
    float32 rounding)."""
    apply_after_step(stab.after_step, copies, e_name, spec, delta=_guard(spec, "after_step_delta", stab.after_step_delta))
    for name, value in after.items():
        _finite(spec, "after_step_delta", f"values for {name!r}", copies[name])
        if not torch.allclose(copies[name], value, rtol=1e-5, atol=1e-6):
            raise StabilizerError(f"stabilizer {spec!r}: after_step_delta disagrees with after_step on {name!r} "
                                  f"(max difference {float((copies[name] - value).abs().max()):.3g} on small random "
                                  "inputs); it must give the same update as increments")
