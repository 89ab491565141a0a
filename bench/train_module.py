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
from typing import Any, Protocol

import torch

from . import runtime
from .config import RunConfig
from .model import GPT
from .precision import param_dtype, precision_context, resolve_precision
from .stabilizers import LossInputs, Stabilizer, make_stabilizer
from .stabilizers.apply import apply_after_step as apply_hook, hooked_cross_entropy, label


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def stabilized_loss(model: GPT, stab: Stabilizer, x: torch.Tensor, y: torch.Tensor, autocast
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy and regularization of one batch.

    Returns (ce, reg, logits (B,T,V) float32 after the transform, lse (B,T), hidden (B,T,H)).
    The logsumexp is computed once and shared by the cross-entropy and any loss term (z-loss).
    """
    with autocast:
        logits, hidden = model(x)
    cls = type(stab)
    term = (lambda lt, lse, h, E: stab.loss_term(LossInputs(lt, lse, h, E))) if cls.has_hook("loss_term") else None
    ce_tok, lse, reg, logits = hooked_cross_entropy(
        logits, y, hidden, model.output_embedding,
        stab.transform_logits if cls.has_hook("transform_logits") else None, term, label(cls))
    ce = ce_tok.mean()
    if reg is None:
        reg = torch.zeros((), device=ce.device)
    return ce, reg, logits, lse, hidden


def apply_after_step(model: GPT, stab: Stabilizer) -> None:
    """``stab.after_step`` applied to ``model``'s parameters in place."""
    params = dict(model.named_parameters())
    e_name = next(n for n, p in params.items() if p is model.output_embedding)
    apply_hook(stab.after_step, params, e_name, label(type(stab)))


class SingleModule:
    """K = 1: one GPT trained by torch's AdamW (fused on CUDA, foreach on CPU)."""

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
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        cuda = self.device.type == "cuda"
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                     fused=cuda, foreach=None if cuda else True)
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        self.n_micro = cfg.batch_size // (cfg.micro_batch_size or cfg.batch_size)

    def train_batch(self, x, y, lrs, stats):
        for group in self.opt.param_groups:
            group["lr"] = lrs[0]
        n, mb = self.n_micro, self.cfg.batch_size // self.n_micro
        ce_acc = reg_acc = 0.0
        for i in range(n):
            sl = slice(i * mb, (i + 1) * mb)
            ce, reg, logits, lse, _ = stabilized_loss(self.fwd, self.stab, x[sl], y[sl], self.autocast)
            ((ce + reg) / n).backward()
            ce_acc, reg_acc = ce_acc + ce.detach() / n, reg_acc + reg.detach() / n
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if type(self.stab).has_hook("after_step"):
            apply_after_step(self.model, self.stab)
        losses = torch.stack([ce_acc, reg_acc, grad_norm.float()]).unsqueeze(1)
        if not stats:
            return losses, None
        with torch.no_grad():
            lt = logits.detach()
            mu = self.model.output_embedding.float().mean(0).norm()
            row = torch.stack([lt.mean(), lt.abs().max(), lse.detach().square().mean(), mu.to(lt.dtype)])
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
        cuda = self.device.type == "cuda"
        for group in self.opt.param_groups:  # the kernels of this machine, not of the one that saved it
            group["fused"], group["foreach"] = cuda, None if cuda else True


def build_module(cfgs: list[RunConfig]) -> TrainModule:
    """The module for these members: ``SingleModule`` for one, ``PackModule`` for more."""
    if len(cfgs) == 1:
        return SingleModule(cfgs[0])
    from .pack.module import PackModule
    return PackModule(cfgs)
