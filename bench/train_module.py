"""Training modules: what one optimizer step of K ≥ 1 members is (the loop is ``bench.trainer``).

The trainer owns the schedule, the log cadence, divergence, evaluation, records and
checkpoints; a training module owns everything inside a step. Two implement it:

- ``SingleModule`` (K = 1): one ``GPT``, ``torch.optim.AdamW``, ``clip_grad_norm_``, optional
  ``torch.compile``; every precision, bf16-emu included.
- ``bench.pack.module.PackModule`` (K > 1): K members stacked in one flat buffer, one batched
  forward, packed AdamW with per-member clipping, stabilizer hooks vmapped over members.

``build_module(cfgs)`` picks one. Rows are the module's current members (frozen ones are
dropped by ``select``); all tensors a module returns have the member dim first or last as
documented.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import torch

from . import gemm, runtime
from .config import RunConfig, machine_device
from .head import FusedKernels, SlopeTransform, chunked_head, logit_stats
from .model import GPT
from .precision import param_dtype, precision_context, resolve_precision
from .stabilizers import LossInputs, Stabilizer, make_stabilizer
from .stabilizers.apply import (apply_after_step as apply_hook, check_tensor, checked_cap, embedding_term,
                                hooked_cross_entropy, label)


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device(machine_device(cfg.device))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(cfg.device)


class TrainModule(Protocol):
    """One step of K members on a shared batch; nothing here syncs with the host."""

    device: torch.device
    precision: str  # resolved ("fp32", "bf16", "bf16-emu", "fp64")
    autocast: Any  # context manager of that precision

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, lrs: list[float], stats: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One update of every member on batch (x, y) of shape (B, T) at learning rates ``lrs``.

        Forward + backward over the micro-batches, per-member clipping, the optimizer step and
        the stabilizer's ``after_step``. Returns ``(3, K)`` [ce, reg, grad norm before clipping]
        averaged over micro-batches, and when ``stats`` a ``(K, 4)`` [mean logit, max |logit|,
        mean (log Z)² of the last micro-batch, ‖μ‖ after the step] (else None).
        """

    def member(self, row: int) -> tuple[GPT, Any, Stabilizer]:
        """(model holding member ``row``'s parameters, its forward (compiled or not), its stabilizer)."""

    def select(self, rows: list[int]) -> None:
        """Keep only members ``rows`` (positions in the current order), in that order."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Loss(NamedTuple):
    """One batch's loss (``stabilized_loss``). total = ce + reg is what backward runs on.

    total: differentiable scalar; ce, reg: detached scalars (mean cross-entropy, regularization);
    lse: (B, T) detached log Z; hidden: (B, T, H) final hidden states; stats: float64 (3,)
    [Σ logits, Σ logits², max |logit|] over the B·T·V transformed logits (zeros unless asked).
    """

    total: torch.Tensor
    ce: torch.Tensor
    reg: torch.Tensor
    lse: torch.Tensor
    hidden: torch.Tensor
    stats: torch.Tensor

    def logit_summary(self, vocab: int) -> torch.Tensor:
        """[mean logit, max |logit|, mean (log Z)²] over this batch's B·T·V logits, (3,) in log Z's dtype."""
        dt = self.lse.dtype
        return torch.stack([(self.stats[0] / (self.lse.numel() * vocab)).to(dt), self.stats[2].to(dt),
                            self.lse.square().mean()])


def fused_kernels(stab: Stabilizer, chunk: int, compile_: bool, device: torch.device) -> FusedKernels | None:
    """Compiled chunk kernels for ``stab`` when a CUDA run compiles and its head is chunked: a transform
    is fused only through ``transform_logits_with_slope`` (without one: None, the unfused head).
    None on CPU: there the eager head is faster than inductor's kernels (``micro`` head, 512 × 8192
    logits, one thread: 17.5 vs 19.1 ms without a transform, 24.6 vs 27.6 ms with soft-capping)."""
    if not (compile_ and device.type == "cuda" and uses_chunked_head(stab, chunk)):
        return None
    if type(stab).has_hook("transform_logits"):
        slope = transform_with_slope(stab)
        return FusedKernels(slope) if slope is not None else None
    return FusedKernels()


def transform_with_slope(stab: Stabilizer) -> SlopeTransform | None:
    """``stab.transform_logits_with_slope`` where it transforms the logits and gives that hook, else None:
    what the chunked head applies without autograd."""
    cls = type(stab)
    ok = cls.has_hook("transform_logits") and cls.has_hook("transform_logits_with_slope")
    return stab.transform_logits_with_slope if ok else None


def logit_cap(stab: Stabilizer) -> float | None:
    """``stab.logit_cap()``, checked (``apply.checked_cap``), where it transforms the logits and gives that
    hook, else None: the cap the chunked head may take into its logit GEMM's epilogue (``bench.head``)."""
    cls = type(stab)
    ok = cls.has_hook("transform_logits") and cls.has_hook("logit_cap")
    return checked_cap(label(cls), stab.logit_cap()) if ok else None


def term_with_grad(stab: Stabilizer):
    """``stab.loss_term_with_grad``, structurally checked on every call (``apply.embedding_term``), where its
    ``loss_term`` reads only E and it gives that hook, else None: what the chunked head runs without autograd."""
    cls = type(stab)
    ok = cls.has_hook("loss_term_with_grad") and cls.loss_term_of_embedding_alone()
    return embedding_term(stab.loss_term_with_grad, label(cls)) if ok else None


def uses_chunked_head(stab: Stabilizer, chunk: int) -> bool:
    """Whether a run with ``head_chunk = chunk`` computes ``stab``'s loss in chunks (``bench.head``)."""
    return chunk > 0 and type(stab).chunkable()


def stabilized_loss(model: GPT, stab: Stabilizer, x: torch.Tensor, y: torch.Tensor, autocast, *,
                    precision: str = "fp32", chunk: int = 0, stats: bool = False, features=None,
                    fused=None) -> Loss:
    """Cross-entropy and regularization of one batch x, y (B, T).

    model: a GPT or its compiled wrapper; precision: the resolved precision ``autocast`` applies;
    chunk: tokens per chunk of the loss head, 0 = the full (B, T, V) logits (also taken when the
    stabilizer's ``loss_term`` reads logits or log Z); features: the forward to the hidden states
    (default ``model.features``; a compiled one for compiled runs); fused: ``head.FusedKernels`` for the
    chunked head (compiled runs, see ``fused_kernels``). The log Z is computed once and
    shared by the cross-entropy, ``token_loss`` and any ``loss_term``.
    """
    E = model.output_embedding
    if uses_chunked_head(stab, chunk):
        with autocast:
            hidden = (features or model.features)(x)
        return chunked_loss(stab, hidden, E, y, chunk=chunk, precision=precision, stats=stats, fused=fused,
                            gemm=getattr(model, "gemm_library", "aten"))
    cls = type(stab)
    term = (lambda lt, lse, h, E: stab.loss_term(LossInputs(lt, lse, h, E))) if cls.has_hook("loss_term") else None
    transform = stab.transform_logits if cls.has_hook("transform_logits") else None
    tok = stab.token_loss if cls.has_hook("token_loss") else None
    with autocast:
        logits, hidden = model(x)
    ce_tok, lse, reg, logits = hooked_cross_entropy(logits, y, hidden, E, transform, term, label(cls), tok)
    ce = ce_tok.mean()
    if reg is None:
        reg = torch.zeros((), device=ce.device)
    st = logit_stats(logits) if stats else torch.zeros(3, dtype=torch.float64, device=ce.device)
    return Loss(ce + reg, ce.detach(), reg.detach(), lse.detach(), hidden, st)


def chunked_loss(stab: Stabilizer, hidden: torch.Tensor, E: torch.Tensor, y: torch.Tensor, *, chunk: int,
                 precision: str = "fp32", stats: bool = False, fused=None, gemm: str = "aten") -> Loss:
    """``stabilized_loss`` of hidden states ``hidden`` (B, T, H) through the chunked head (``bench.head``):
    E (V, H) the output embedding, y (B, T) targets, chunk tokens per chunk; the stabilizer's transform
    and token loss run inside the head, a ``loss_term`` that reads only h and E is added after it. Used by
    a single run and, member by member, by a pack (``bench.pack.step``). A ``loss_term`` of E alone with a
    ``loss_term_with_grad`` runs inside the head too, without autograd (``term_with_grad``). gemm: the
    library of the head's products ("aten", "onednn": ``bench.gemm``; a single run's model's, a pack's members')."""
    cls = type(stab)
    transform = stab.transform_logits if cls.has_hook("transform_logits") else None
    tok = stab.token_loss if cls.has_hook("token_loss") else None
    e_term = term_with_grad(stab)
    total, ce, pen, lse, st = chunked_head(hidden, E, y, chunk=chunk, transform=transform, token_loss=tok,
                                           precision=precision, stats=stats, fused=fused,
                                           transform_with_slope=transform_with_slope(stab), loss_term_with_grad=e_term,
                                           gemm=gemm, cap=logit_cap(stab) if gemm == "onednn" else None)
    reg = pen
    if cls.has_hook("loss_term") and e_term is None:
        extra = stab.loss_term(LossInputs(None, None, hidden, E))
        if extra is not None:
            check_tensor(label(cls), "loss_term", "a scalar loss", extra, ())
            total, reg = total + extra, reg + extra.detach()
    return Loss(total, ce, reg, lse, hidden, st)


class AfterStep:
    """``stab.after_step`` applied to ``model``'s parameters in place (through ``after_step_delta``,
    added in place, where the stabilizer gives one), once per optimizer step; the parameter map, E's
    name and the hooks are looked up once, not every step."""

    def __init__(self, model: GPT, stab: Stabilizer):
        self.params = dict(model.named_parameters())
        self.e_name = next(n for n, p in self.params.items() if p is model.output_embedding)
        self.hook, self.label = stab.after_step, label(type(stab))
        self.delta = stab.after_step_delta if type(stab).has_hook("after_step_delta") else None

    def __call__(self) -> None:
        apply_hook(self.hook, self.params, self.e_name, self.label, delta=self.delta)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)``: returns the global L2 norm of
    the gradients, and scales them in place by min(1, max_norm / (norm + 1e-6)). On CPU the scaling, a
    pass over every gradient, is skipped where that factor is exactly 1 (it would change no bit; a
    NaN factor still scales); torch always scales, to keep a GPU free of a host sync."""
    utils = torch.nn.utils
    if not params or params[0].device.type != "cpu" or not hasattr(utils, "get_total_norm"):  # torch < 2.6
        return utils.clip_grad_norm_(params, max_norm, foreach=True)
    norm = utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0, False, True)
    if bool(torch.clamp(max_norm / (norm + 1e-6), max=1.0) != 1.0):
        utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


class SingleModule:
    """K = 1: one GPT trained by torch's AdamW (its fused kernel, or its foreach path: ``cfg.adamw``)."""

    def __init__(self, cfg: RunConfig):
        runtime.set_threads(cfg.threads)
        self.cfg = cfg
        self.device = resolve_device(cfg)
        if self.device.type == "cpu":  # glibc heap settings help CPU tensors only
            runtime.tune_allocator()
        runtime.set_tf32(cfg.tf32, self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.autocast = precision_context(self.precision, self.device)
        self.stab = make_stabilizer(cfg.stabilizer, **cfg.hparams)
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg.model_config()).to(self.device, param_dtype(self.precision))
        # the library of the model's and the head's products (bench.gemm): oneDNN's or ATen's
        self.model.use_gemm(gemm.for_run(cfg))
        self.params = list(self.model.parameters())  # the step clips these (a tied matrix once)
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **self._kernel())
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        self.chunk = cfg.head_chunk
        self.features = torch.compile(self.model.features) if cfg.compile else None
        self.fused = fused_kernels(self.stab, cfg.head_chunk, cfg.compile, self.device)
        self.n_micro = cfg.batch_size // (cfg.micro_batch_size or cfg.batch_size)
        self.after_step = AfterStep(self.model, self.stab) if type(self.stab).has_hook("after_step") else None

    def train_batch(self, x, y, lrs, stats):
        for group in self.opt.param_groups:
            group["lr"] = lrs[0]
        n, mb = self.n_micro, self.cfg.batch_size // self.n_micro
        ce_acc = reg_acc = 0.0
        for i in range(n):
            sl = slice(i * mb, (i + 1) * mb)
            out = stabilized_loss(self.fwd, self.stab, x[sl], y[sl], self.autocast, precision=self.precision,
                                  chunk=self.chunk, stats=stats and i == n - 1, features=self.features,
                                  fused=self.fused)
            (out.total / n).backward()
            ce_acc, reg_acc = ce_acc + out.ce / n, reg_acc + out.reg / n
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.params, clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        losses = torch.stack([ce_acc.float(), reg_acc.float(), grad_norm.float()]).unsqueeze(1)
        if not stats:
            return losses, None
        with torch.no_grad():
            summary = out.logit_summary(self.model.cfg.vocab_size)
            mu = self.model.output_embedding.float().mean(0).norm().to(summary.dtype)
            row = torch.cat([summary, mu.unsqueeze(0)])
        return losses, row.unsqueeze(0)

    def member(self, row):
        return self.model, self.fwd, self.stab

    def select(self, rows):
        if list(rows) != [0]:
            raise ValueError(f"a single-model module has one member; cannot select {rows}")

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:  # this run's kernel, not the one of the run that saved it
            group.update(self._kernel())

    def _kernel(self) -> dict[str, bool | None]:
        """AdamW's keyword arguments for ``cfg.adamw``: its fused kernel or its multi-tensor path."""
        fused = self.cfg.adamw == "fused"
        return {"fused": fused, "foreach": None if fused else True}


def build_module(cfgs: list[RunConfig]) -> TrainModule:
    """The module for these members: ``SingleModule`` for one, ``PackModule`` for more."""
    if len(cfgs) == 1:
        return SingleModule(cfgs[0])
    from .pack.module import PackModule
    return PackModule(cfgs)
