"""``train_pack``: train K compatible sweep points as one batched model; one RunResult each.

Each member is trained as ``train(cfg)`` would train it: initialized like ``GPT(cfg)``
after ``torch.manual_seed(cfg.seed)``, the same batches, its own lr schedule
(``lr_at``), stabilizer hyperparameters, AdamW state and gradient clipping, its own
``DivergenceMonitor`` fed at the logging cadence, and the same run row and curve rows
(evaluation, final statistics and the logit precision error are computed by the
trainer's own functions on a model holding the member's parameters).

Isolation: every op of a step acts on one member's rows only, so NaN/Inf in one member
cannot reach another's parameters, gradients, clipping norm or optimizer state. A member
whose monitor reports divergence is recorded at that logging step (as ``train`` records
it) and then frozen for good: its final state is recorded and its rows are dropped from
the pack, which continues with the others at a smaller K.

Timing fields of a member's run row are its *share* of the pack: each interval's wall
time divided by the number of members trained in it, so summed over a sweep's rows they
give the wall time actually spent, as for unpacked runs.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from .. import provenance, runtime
from ..config import RunConfig
from ..data import TokenData, load_data
from ..divergence import DivergenceMonitor
from ..model import GPT
from ..precision import param_dtype, precision_context, resolve_precision
from ..trainer import RunResult, build_run_record, curve_row, evaluate, lr_at, resolve_device
from .batched_model import output_embedding_name
from .grouping import describe_mismatch
from .hooks import PackedStabilizer
from .optim import PackedAdamW
from .step import PackStep
from .store import FlatParams


class _Member:
    """Bookkeeping of one member (index into the caller's list)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.monitor = DivergenceMonitor(cfg.divergence, cfg.L0, cfg.warmup)
        self.curve: list[dict[str, Any]] = []
        self.best_val = math.inf
        self.diverged_step: int | None = None
        self.reason = ""
        self.elapsed = 0.0
        self.interval_times: list[float] = []


def train_pack(cfgs: list[RunConfig], *, data: TokenData | None = None, progress: bool = False) -> list[RunResult]:
    """Train ``cfgs`` (equal ``pack_key``) as one pack; returns their RunResults in input order."""
    if not cfgs:
        return []
    cfgs = [c.check() for c in cfgs]
    bad = describe_mismatch(cfgs)
    if bad:
        raise ValueError(f"configs cannot share a pack: they differ in {bad}")
    c0 = cfgs[0]
    if c0.precision == "bf16-emu":
        # measured: packed bf16-emu members drift from their unpacked runs (1% in loss after 60
        # steps): the batched matmuls round at other points than the single model's
        raise ValueError("precision 'bf16-emu' cannot be trained in packs; use pack = 1")
    runtime.tune_allocator()
    runtime.set_threads(c0.threads)
    device = resolve_device(c0)
    precision = resolve_precision(c0.precision, device)
    dtype = param_dtype(precision)
    autocast = precision_context(precision, device)
    data = data or load_data(c0.data, c0.vocab_size)
    mcfg = c0.model_config()

    models = []
    for c in cfgs:  # member k starts exactly where train(cfg_k) starts
        torch.manual_seed(c.seed)
        models.append(GPT(mcfg).to(device, dtype))
    e_name = output_embedding_name(mcfg)
    store = FlatParams.from_models(models, first=e_name)
    scratch = models[0]  # evaluation model: receives one member's parameters at a time
    del models
    stab = PackedStabilizer(c0.stabilizer, [c.hparams for c in cfgs], dtype, device)
    grads_of = PackStep(mcfg, store, stab, e_name, autocast, scratch.rope_cos, scratch.rope_sin)
    opt = PackedAdamW(store, betas=[(c.beta1, c.beta2) for c in cfgs], eps=[c.eps for c in cfgs],
                      weight_decay=[c.weight_decay for c in cfgs], grad_clip=[c.grad_clip for c in cfgs])
    val = data.val_batches(c0.eval_batches, c0.batch_size, c0.seq_len)
    members = [_Member(c) for c in cfgs]
    active = list(range(len(cfgs)))  # caller's index of each row of the pack
    results: list[RunResult | None] = [None] * len(cfgs)
    n_micro = c0.batch_size // (c0.micro_batch_size or c0.batch_size)
    started_at = provenance.utc_now()

    def member_model(row: int) -> GPT:
        return store.load_into(scratch, row)

    def finish(row: int, steps_done: int) -> None:
        m = members[active[row]]
        model = member_model(row)
        run = build_run_record(m.cfg, model, model, stab.members[row], val, device, autocast, precision,
                               best_val=m.best_val, diverged_step=m.diverged_step, reason=m.reason,
                               spike_score=m.monitor.spike_score, steps_done=steps_done, elapsed=m.elapsed,
                               interval_times=m.interval_times, started_at=started_at)
        results[active[row]] = RunResult(run, m.curve)

    pending: list[torch.Tensor] = []  # (3, K) per step: ce, reg, grad norm; read at the log cadence
    last_checked = 0
    t_interval = time.perf_counter()
    for step in range(1, c0.steps + 1):
        x, y = data.train_batch(step - 1, c0.resolved_data_seed, c0.batch_size, c0.seq_len)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lrs = [lr_at(members[i].cfg, step - 1) for i in active]
        is_eval = step % c0.eval_every == 0 or step == c0.steps
        is_log = is_eval or step % c0.log_every == 0
        ce_acc, reg_acc, logit_stats = grads_of(x, y, n_micro, stats=is_log)
        grad_norm = opt.clip_grad_norm_()
        opt.step(lrs)
        stab.after_step(store.params, e_name)
        pending.append(torch.stack([ce_acc, reg_acc, grad_norm]).float())

        if not is_log:
            continue
        # --- log cadence: one host sync for the whole pack -------------------------------
        rows = torch.stack(pending).tolist()  # [step][quantity][member]
        pending = []
        with torch.no_grad():
            mu_norm = store.params[e_name].float().mean(1).norm(dim=-1)
            stats = torch.cat([logit_stats, mu_norm.to(logit_stats.dtype).unsqueeze(1)], dim=1).tolist()
        now = time.perf_counter()
        share = (now - t_interval) / len(active)  # this interval's wall time per member
        stopped: list[int] = []
        for row, idx in enumerate(active):
            m = members[idx]
            m.interval_times.append(share / (step - last_checked))
            m.elapsed += share
            for i, r in enumerate(rows):
                reason = m.monitor.update(last_checked + i + 1, r[0][row], r[2][row])
                if reason and m.diverged_step is None:
                    m.diverged_step, m.reason = last_checked + i + 1, reason
            last = rows[-1]
            crow = curve_row(m.cfg, step, lr_at(m.cfg, step - 1), last[0][row], last[1][row], last[2][row],
                             *stats[row])
            if is_eval or m.diverged_step is not None:
                ev = evaluate(member_model(row), stab.members[row], val, device, autocast)
                crow["val_loss"] = ev["val_loss"]
                if math.isfinite(ev["val_loss"]):
                    m.best_val = min(m.best_val, ev["val_loss"])
            m.curve.append(crow)
            if m.diverged_step is not None:
                finish(row, step)
                stopped.append(row)
        if progress:
            losses = " ".join(f"{rows[-1][0][r]:.3f}" for r in range(len(active)))
            print(f"pack step {step}/{c0.steps} ({len(active)} members) loss {losses}", file=sys.stderr, flush=True)
        last_checked = step
        if stopped:  # freeze diverged members for good: drop their rows from every stacked tensor
            keep = [r for r in range(len(active)) if r not in stopped]
            if not keep:
                active = []
                break
            sel = torch.tensor(keep, device=device)
            store.select(sel)
            opt.select(sel, keep)
            stab.select(keep)
            active = [active[r] for r in keep]
        t_interval = time.perf_counter()

    for row in range(len(active)):
        finish(row, c0.steps)
    return results  # type: ignore[return-value]
