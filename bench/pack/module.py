"""``PackModule``: the training module of K > 1 members stacked along a member dim.

Each member is what ``SingleModule(cfg)`` would train: initialized like ``GPT(cfg)`` after
``torch.manual_seed(cfg.seed)``, its own lr, stabilizer hyperparameters, AdamW state and
gradient clipping. The members' parameters are rows of one flat buffer (store.py), the
forward is batched over members (batched_model.py), the gradients come from a
loss head run member by member (step.py), AdamW runs row-wise (optim.py) and the stabilizer's
hooks are vmapped over per-member hyperparameters (hooks.py).

Isolation: every op of a step acts on one member's rows only, so NaN/Inf in one member
cannot reach another's parameters, gradients, clipping norm or optimizer state; the loop
drops a diverged member with ``select``.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import gemm, runtime
from ..config import RunConfig
from ..model import GPT
from ..precision import param_dtype, precision_context, resolve_precision
from ..train_module import resolve_device
from .batched_model import output_embedding_name, packed_features
from .grouping import describe_mismatch
from .hooks import PackedStabilizer
from .optim import PackedAdamW
from .step import PackStep
from .store import FlatParams


class PackModule:
    def __init__(self, cfgs: list[RunConfig]):
        bad = describe_mismatch(cfgs)
        if bad:
            raise ValueError(f"configs cannot share a pack: they differ in {bad}")
        c0 = cfgs[0]
        if c0.precision == "bf16-emu":
            # measured: packed bf16-emu members drift from their unpacked runs (1% in loss after 60
            # steps): the batched matmuls round at other points than the single model's
            raise ValueError("precision 'bf16-emu' cannot be trained in packs; use pack = 1")
        runtime.set_threads(c0.threads)
        self.device = resolve_device(c0)
        if self.device.type == "cpu":  # glibc heap settings help CPU tensors only
            runtime.tune_allocator()
        runtime.set_tf32(c0.tf32, self.device)
        self.precision = resolve_precision(c0.precision, self.device)
        self.autocast = precision_context(self.precision, self.device)
        dtype = param_dtype(self.precision)
        mcfg = c0.model_config()
        models = []
        for c in cfgs:  # member k starts exactly where SingleModule(cfg_k) starts
            torch.manual_seed(c.seed)
            models.append(GPT(mcfg).to(self.device, dtype))
        self.e_name = output_embedding_name(mcfg)
        self.store = FlatParams.from_models(models, first=self.e_name)
        library = gemm.for_run(c0)  # of the head's products and the evaluation model's (bench.gemm)
        self.scratch = models[0].use_gemm(library)  # evaluation model: one member's parameters at a time
        del models
        self.stab = PackedStabilizer(c0.stabilizer, [c.hparams for c in cfgs], dtype, self.device)
        features = torch.compile(packed_features) if c0.compile else packed_features
        self.grads_of = PackStep(mcfg, self.store, self.stab, self.e_name, self.autocast,
                                 self.scratch.rope_cos, self.scratch.rope_sin, features,
                                 precision=self.precision, chunk=c0.head_chunk, gemm=library)
        self.opt = PackedAdamW(self.store, betas=[(c.beta1, c.beta2) for c in cfgs], eps=[c.eps for c in cfgs],
                               weight_decay=[c.weight_decay for c in cfgs], grad_clip=[c.grad_clip for c in cfgs])
        self.n_micro = c0.batch_size // (c0.micro_batch_size or c0.batch_size)

    def train_batch(self, x, y, lrs, stats):
        ce, reg, logit_stats = self.grads_of(x, y, self.n_micro, stats=stats)
        grad_norm = self.opt.clip_grad_norm_()
        self.opt.step(lrs)
        self.stab.after_step(self.store.params, self.e_name)
        losses = torch.stack([ce, reg, grad_norm])
        if not stats:
            return losses, None
        with torch.no_grad():
            mu = self.store.params[self.e_name].float().mean(1).norm(dim=-1)
            return losses, torch.cat([logit_stats, mu.to(logit_stats.dtype).unsqueeze(1)], dim=1)

    def member(self, row):
        model = self.store.load_into(self.scratch, row)
        return model, model, self.stab.members[row]

    def select(self, rows):
        index = torch.tensor(rows, device=self.device)
        self.store.select(index)
        self.opt.select(index, rows)
        self.stab.select(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"flat": self.store.flat.detach(), **self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.store.flat.copy_(state["flat"])
        self.opt.load_state_dict(state)
