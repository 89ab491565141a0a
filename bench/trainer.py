"""Train one GPT with one stabilizer and return its record.

AdamW (β1, β2, ε, weight decay on matrices only), global-norm gradient clipping,
linear warmup then cosine decay to ``min_lr``. Batches are a pure function of
(data seed, step), so a run is deterministic on CPU and resumes exactly from a
checkpoint. Host syncs happen only at the logging cadence.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import provenance, records, runtime
from .config import RunConfig
from .data import TokenData, load_data
from .divergence import DivergenceMonitor
from .losses import cross_entropy_lse
from .model import GPT
from .precision import param_dtype, precision_context, resolve_precision
from .stabilizers import OUTPUT_EMBEDDING, LossInputs, Stabilizer, make_stabilizer


@dataclass
class RunResult:
    run: dict[str, Any]  # one row of runs.parquet
    curve: list[dict[str, Any]]  # rows of curves.parquet


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(cfg.device)


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup - 1, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def stabilized_loss(model: GPT, stab: Stabilizer, x: torch.Tensor, y: torch.Tensor, autocast
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy and regularization of one batch.

    Returns (ce, reg, logits (B,T,V) float32 after the transform, lse (B,T), hidden (B,T,H)).
    The logsumexp is computed once and shared by the cross-entropy and any loss term (z-loss).
    """
    with autocast:
        logits, hidden = model(x)
    logits = stab.transform_logits(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    ce_tok, lse = cross_entropy_lse(logits, y)
    ce = ce_tok.mean()
    reg = None
    if type(stab).has_hook("loss_term"):
        reg = stab.loss_term(LossInputs(logits, lse, hidden, model.output_embedding))
    if reg is None:
        reg = torch.zeros((), device=ce.device)
    return ce, reg, logits, lse, hidden


@torch.no_grad()
def apply_after_step(model: GPT, stab: Stabilizer) -> None:
    params = {name: p.detach() for name, p in model.named_parameters()}
    params[OUTPUT_EMBEDDING] = model.output_embedding.detach()
    for name, new in stab.after_step(params).items():
        target = model.output_embedding if name == OUTPUT_EMBEDDING else model.get_parameter(name)
        target.copy_(new)


@torch.no_grad()
def evaluate(model: GPT, stab: Stabilizer, batches, device: torch.device, autocast) -> dict[str, Any]:
    """Validation cross-entropy and logit statistics over fixed batches (no regularization)."""
    n = ce_sum = log2z_sum = s1 = s2 = 0.0
    absmax = torch.zeros((), device=device)
    h_sum = None
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        ce, _, logits, lse, hidden = stabilized_loss(model, stab, x, y, autocast)
        tokens = y.numel()
        n += tokens
        ce_sum += ce * tokens
        log2z_sum += lse.square().sum()
        s1 += logits.sum(dtype=torch.float64)
        s2 += logits.square().sum(dtype=torch.float64)
        absmax = torch.maximum(absmax, logits.abs().max())
        hs = hidden.float().sum(dim=(0, 1))
        h_sum = hs if h_sum is None else h_sum + hs
    count = n * model.cfg.vocab_size
    mean = float(s1) / count
    return {"val_loss": float(ce_sum) / n, "logit_mean": mean,
            "logit_std": math.sqrt(max(float(s2) / count - mean * mean, 0.0)),
            "logit_absmax": float(absmax), "mean_log2z": float(log2z_sum) / n,
            "hidden_mean": h_sum / n}


@torch.no_grad()
def embedding_stats(model: GPT, hidden_mean: torch.Tensor | None = None) -> dict[str, float]:
    E = model.output_embedding.float()
    mu = E.mean(dim=0)
    mu2 = float(mu.square().sum())
    out = {"mu_norm": math.sqrt(mu2),
           "isotropy": 1.0 - mu2 / max(float(E.square().sum(dim=1).mean()), 1e-30)}
    if hidden_mean is not None:
        out["mu_hidden_cos"] = float(torch.nn.functional.cosine_similarity(mu, hidden_mean.float(), dim=0))
    return out


@torch.no_grad()
def precision_error(model: GPT, x: torch.Tensor, autocast) -> float:
    """max |logits in the run's precision − logits in fp32| on batch x."""
    ref, _ = model(x)
    with autocast:
        run, _ = model(x)
    return float((run.float() - ref.float()).abs().max())


def curve_row(cfg: RunConfig, step: int, lr: float, train_loss: float, reg_loss: float, grad_norm: float,
              logit_mean: float, logit_absmax: float, mean_log2z: float, mu_norm: float) -> dict[str, Any]:
    """One row of ``curves.parquet`` (``records.CURVE_COLUMNS``) at logging step ``step``;
    ``val_loss`` is filled in at evaluation steps."""
    return {"run_id": cfg.key(), "step": step, "lr": lr, "train_loss": train_loss, "reg_loss": reg_loss,
            "val_loss": None, "grad_norm": grad_norm, "logit_mean": logit_mean, "logit_absmax": logit_absmax,
            "mean_log2z": mean_log2z, "mu_norm": mu_norm}


def build_run_record(cfg: RunConfig, model: GPT, fwd, stab: Stabilizer, val, device: torch.device, autocast,
                     precision: str, *, best_val: float, diverged_step: int | None, reason: str, spike_score: float,
                     steps_done: int, elapsed: float, interval_times: list[float], started_at: str) -> dict[str, Any]:
    """Final evaluation of ``model`` and the runs.parquet row of its run (shared with packed training).

    fwd: the model or its compiled wrapper (evaluation runs through it); val: validation batches;
    best_val: lowest validation loss so far (the final evaluation is taken into account here).
    """
    final = evaluate(fwd, stab, val, device, autocast)
    emb = embedding_stats(model, final["hidden_mean"])
    if math.isfinite(final["val_loss"]):
        best_val = min(best_val, final["val_loss"])
    step_time = statistics.median(interval_times) if interval_times else float("nan")
    hp = {k: float(v) for k, v in make_stabilizer(cfg.stabilizer, **cfg.hparams).hyperparameters().items()}
    return {
        "run_id": cfg.key(), "sweep": cfg.sweep, "model": cfg.model, "n_params": model.n_params,
        "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
        "steps": cfg.steps, "warmup": cfg.warmup, "stabilizer": cfg.stabilizer,
        "lam": hp.get("lam"), "cap": hp.get("cap"), "hparams": json.dumps(hp, sort_keys=True),
        "lr": cfg.lr, "seed": cfg.seed, "data_seed": cfg.resolved_data_seed, "weight_tying": cfg.weight_tying,
        "precision": precision, "data": cfg.data, "L0": cfg.L0,
        "final_loss": final["val_loss"], "best_val_loss": best_val if math.isfinite(best_val) else float("nan"),
        "diverged": diverged_step is not None, "diverged_step": diverged_step, "diverged_reason": reason,
        "spike_score": spike_score, "steps_done": steps_done,
        "logit_mean": final["logit_mean"], "logit_std": final["logit_std"],
        "logit_absmax": final["logit_absmax"], "mean_log2z": final["mean_log2z"],
        **{k: emb[k] for k in ("mu_norm", "isotropy", "mu_hidden_cos")},
        "logit_precision_error": precision_error(model, val[0][0].to(device), autocast),
        "wall_time_s": elapsed, "step_time_s": step_time,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / step_time if step_time > 0 else float("nan"),
        "device": provenance.device_name(device), "threads": torch.get_num_threads(),
        **{k: v for k, v in provenance.versions().items() if k != "python"},
        "started_at": started_at, "config": json.dumps(cfg.to_dict(), sort_keys=True, default=str),
        "schema_version": records.SCHEMA_VERSION,
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class _Progress:
    """A rich progress bar on an interactive terminal, a plain line per evaluation otherwise."""

    def __init__(self, enabled: bool, cfg: RunConfig, start: int):
        self.enabled, self.bar, self.cfg = enabled, None, cfg
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(f"{cfg.model} {cfg.stabilizer} lr={cfg.lr:g}",
                                          total=cfg.steps, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str, line: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled and line:
            print(f"step {step}/{self.cfg.steps} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@dataclass
class Setup:
    """A model ready to train: everything one optimizer step needs."""

    cfg: RunConfig
    device: torch.device
    precision: str
    autocast: Any
    stab: Stabilizer
    model: GPT
    fwd: Any  # the model, or its torch.compile'd wrapper
    opt: torch.optim.Optimizer

    @property
    def micro_batches(self) -> int:
        return self.cfg.batch_size // (self.cfg.micro_batch_size or self.cfg.batch_size)


def setup(cfg: RunConfig) -> Setup:
    """Build model (seeded), stabilizer and AdamW for ``cfg``; applies the process speed settings."""
    runtime.tune_allocator()
    runtime.set_threads(cfg.threads)
    device = resolve_device(cfg)
    precision = resolve_precision(cfg.precision, device)
    autocast = precision_context(precision, device)
    stab = make_stabilizer(cfg.stabilizer, **cfg.hparams)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config()).to(device, param_dtype(precision))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            fused=device.type == "cuda", foreach=None if device.type == "cuda" else True)
    fwd = torch.compile(model) if cfg.compile else model
    return Setup(cfg, device, precision, autocast, stab, model, fwd, opt)


def train_step(s: Setup, x: torch.Tensor, y: torch.Tensor, step: int):
    """Update ``step`` (0-based) on batch (x, y) already on the device; no host sync.

    Returns (ce, reg, grad_norm, logits, lse) of the last micro-batch (ce/reg averaged over all).
    """
    cfg = s.cfg
    lr = lr_at(cfg, step)
    for group in s.opt.param_groups:
        group["lr"] = lr
    n_micro = s.micro_batches
    mb = cfg.batch_size // n_micro
    ce_acc = reg_acc = 0.0
    for i in range(n_micro):
        sl = slice(i * mb, (i + 1) * mb)
        ce, reg, logits, lse, _ = stabilized_loss(s.fwd, s.stab, x[sl], y[sl], s.autocast)
        ((ce + reg) / n_micro).backward()
        ce_acc, reg_acc = ce_acc + ce.detach() / n_micro, reg_acc + reg.detach() / n_micro
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), clip, foreach=True)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    if type(s.stab).has_hook("after_step"):
        apply_after_step(s.model, s.stab)
    return ce_acc, reg_acc, grad_norm, logits, lse


def train(cfg: RunConfig, *, data: TokenData | None = None, checkpoint: str | Path | None = None,
          checkpoint_every: int = 0, progress: bool = False, stop_at: int | None = None) -> RunResult | None:
    """Train the run described by ``cfg``. Divergence stops the run and is recorded, never raised.

    checkpoint: file to resume from (if it exists and matches cfg) and to save to every
    ``checkpoint_every`` steps (0 = never). The file is removed when the run finishes.
    stop_at: leave after this step with a checkpoint saved and return None (time-sliced jobs;
    checked at the logging cadence).
    """
    cfg.check()
    s = setup(cfg)
    device, precision, autocast, stab, model, fwd, opt = (
        s.device, s.precision, s.autocast, s.stab, s.model, s.fwd, s.opt)
    data = data or load_data(cfg.data, cfg.vocab_size)
    monitor = DivergenceMonitor(cfg.divergence, cfg.L0, cfg.warmup)
    val = data.val_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len)

    start, curve, best_val, elapsed, interval_times = 0, [], math.inf, 0.0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state.get("key") == cfg.key():
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            monitor.load_state_dict(state["monitor"])
            start, curve, best_val = state["step"], state["curve"], state["best_val"]
            elapsed, interval_times = state["elapsed"], state["interval_times"]

    started_at = provenance.utc_now()
    pending = torch.zeros(cfg.steps, 3, device=device)  # ce, reg, grad_norm per step, read at log cadence
    last_checked = start
    diverged_step, reason = None, ""
    bar = _Progress(progress, cfg, start)
    t_interval = time.perf_counter()
    step = start
    for step in range(start + 1, cfg.steps + 1):
        x, y = data.train_batch(step - 1, cfg.resolved_data_seed, cfg.batch_size, cfg.seq_len)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        ce_acc, reg_acc, grad_norm, logits, lse = train_step(s, x, y, step - 1)
        pending[step - 1] = torch.stack([ce_acc, reg_acc, grad_norm.float()])

        is_eval = step % cfg.eval_every == 0 or step == cfg.steps
        if step % cfg.log_every and not is_eval:
            continue
        # --- log cadence: one host sync -------------------------------------------
        rows = pending[last_checked:step].tolist()
        now = time.perf_counter()
        interval_times.append((now - t_interval) / (step - last_checked))
        elapsed += now - t_interval
        for i, (l_ce, _, gn) in enumerate(rows):
            r = monitor.update(last_checked + i + 1, l_ce, gn)
            if r and diverged_step is None:
                diverged_step, reason = last_checked + i + 1, r
        last_checked = step
        with torch.no_grad():
            row = curve_row(cfg, step, lr_at(cfg, step - 1), *rows[-1], float(logits.mean()),
                            float(logits.abs().max()), float(lse.square().mean()),
                            float(model.output_embedding.float().mean(0).norm()))
        if is_eval or diverged_step is not None:
            ev = evaluate(fwd, stab, val, device, autocast)
            row["val_loss"] = ev["val_loss"]
            if math.isfinite(ev["val_loss"]):
                best_val = min(best_val, ev["val_loss"])
        curve.append(row)
        bar.update(step, f"loss {row['train_loss']:.3f}" + (f" val {row['val_loss']:.3f}" if row["val_loss"] is not None else ""),
                   line=row["val_loss"] is not None)
        if diverged_step is not None:
            break
        leaving = stop_at is not None and step >= stop_at and step < cfg.steps
        if ckpt is not None and step < cfg.steps and (leaving or checkpoint_every and step % checkpoint_every == 0):
            _save_checkpoint(ckpt, {"key": cfg.key(), "step": step, "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "monitor": monitor.state_dict(),
                                    "curve": curve, "best_val": best_val, "elapsed": elapsed,
                                    "interval_times": interval_times})
        if leaving:
            bar.close()
            return None
        t_interval = time.perf_counter()
    bar.close()

    run = build_run_record(cfg, model, fwd, stab, val, device, autocast, precision, best_val=best_val,
                           diverged_step=diverged_step, reason=reason, spike_score=monitor.spike_score,
                           steps_done=step, elapsed=elapsed, interval_times=interval_times, started_at=started_at)
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return RunResult(run, curve)
