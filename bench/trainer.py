"""The training loop: K ≥ 1 members (one run, or a pack of sweep points) trained to their records.

``train_members(cfgs)`` drives a training module (``bench.train_module``: one model for K = 1,
a stacked pack for K > 1) and owns everything around the step:

- the schedule (``lr_at``: linear warmup, cosine to ``min_lr``) and the batches, a pure
  function of (data seed, step), so a run is deterministic on CPU and resumes exactly;
- the log cadence and its one host sync: per-step losses stay on the device until then;
- one ``DivergenceMonitor`` per member; a diverged member is evaluated, recorded and frozen
  (dropped from the module) while the others go on;
- curve rows, periodic evaluation and the best validation loss;
- checkpoints (all members in one file, written atomically), resume and ``stop_at``;
- timing: each interval's wall time is shared equally by the members trained in it, so a
  sweep's rows add up to the wall time actually spent.

``train(cfg)`` is the one-member case. AdamW (β1, β2, ε, weight decay on matrices only) and
global-norm clipping are the module's.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import gemm, provenance, records
from .config import RunConfig
from .data import TokenData, load_data
from .divergence import DivergenceMonitor
from .model import GPT
from . import head
from .precision import ExactFP32
from .stabilizers import Stabilizer, make_stabilizer
from .tracking import Tracker
from .train_module import TrainModule, build_module, resolve_device, stabilized_loss

__all__ = ["RunResult", "train", "train_members", "lr_at", "evaluate", "checkpoint_keys", "resolve_device"]


@dataclass
class RunResult:
    run: dict[str, Any]  # one row of runs.parquet
    curve: list[dict[str, Any]]  # rows of curves.parquet
    weights: dict[str, torch.Tensor] | None = None  # final state_dict on the CPU (``keep_weights``)


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based ``it``), the study's schedule: linear warmup
    lr·(it+1)/(warmup+1) for it < warmup, then cosine from lr to min_lr over
    ratio (it − warmup)/(steps − warmup) ∈ [0, 1)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    progress = min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _micro(batches, micro_batch: int | None):
    """Each (x, y) of ``batches`` split into row chunks of ``micro_batch`` sequences (None: whole)."""
    for x, y in batches:
        step = micro_batch or x.shape[0]
        for i in range(0, x.shape[0], step):
            yield x[i:i + step], y[i:i + step]


@torch.no_grad()
def evaluate(model: GPT, stab: Stabilizer, batches, device: torch.device, autocast,
             micro_batch: int | None = None, *, precision: str = "fp32", chunk: int = 0) -> dict[str, Any]:
    """Validation cross-entropy and logit statistics over fixed batches (no regularization),
    ``micro_batch`` sequences per forward pass (the run's ``micro_batch_size``), the loss head in
    chunks of ``chunk`` tokens as in training (0: one micro-batch's full logits, the peak memory);
    ``precision`` is the resolved precision ``autocast`` applies."""
    n = ce_sum = log2z_sum = s1 = s2 = 0.0
    absmax = torch.zeros((), dtype=torch.float64, device=device)
    h_sum = None
    for x, y in _micro(batches, micro_batch):
        x, y = x.to(device), y.to(device)
        out = stabilized_loss(model, stab, x, y, autocast, precision=precision, chunk=chunk, stats=True)
        tokens = y.numel()
        n += tokens
        ce_sum += out.ce * tokens
        log2z_sum += out.lse.float().square().sum()
        s1, s2 = s1 + out.stats[0], s2 + out.stats[1]
        absmax = torch.maximum(absmax, out.stats[2])
        hs = out.hidden.float().sum(dim=(0, 1))
        h_sum = hs if h_sum is None else h_sum + hs
    count = n * model.cfg.vocab_size
    mean = float(s1) / count
    return {"val_loss": float(ce_sum) / n, "logit_mean": mean,
            "logit_std": math.sqrt(max(float(s2) / count - mean * mean, 0.0)),
            "logit_absmax": float(absmax), "mean_log2z": float(log2z_sum) / n,
            "hidden_mean": h_sum / n}


FP32_EXACT = ("fp32", "fp64")
"""Precisions whose own evaluation is already (at least) fp32: there ``*_fp32`` equals the run-precision value."""


def evaluate_both(fwd, stab: Stabilizer, batches, device: torch.device, autocast, precision: str,
                  micro_batch: int | None = None, chunk: int = 0) -> tuple[dict[str, Any], float]:
    """``evaluate`` in the run's precision, and the validation loss of the same weights and batches
    in fp32 (no autocast, no bf16 emulation, no TF32; fp64 runs stay fp64). For fp32 / fp64 runs the two
    are one evaluation (equal by construction)."""
    ev = evaluate(fwd, stab, batches, device, autocast, micro_batch, precision=precision, chunk=chunk)
    if precision in FP32_EXACT:
        return ev, ev["val_loss"]
    return ev, evaluate(fwd, stab, batches, device, ExactFP32(device), micro_batch, precision="fp32",
                        chunk=chunk)["val_loss"]


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
def precision_error(model: GPT, x: torch.Tensor, autocast, precision: str = "fp32", chunk: int = 0) -> float:
    """max |logits in the run's precision − logits in fp32| on batch x, (B, T); the logits are formed
    ``chunk`` tokens at a time (0: all at once), so this check never needs more than the head does."""
    ref_h = model.features(x)
    with autocast:
        run_h = model.features(x)
    E = model.output_embedding
    ref_h, run_h = ref_h.reshape(-1, ref_h.shape[-1]), run_h.reshape(-1, run_h.shape[-1])
    step = chunk or ref_h.shape[0]
    worst = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, ref_h.shape[0], step):
        ref = head.logits(ref_h[i:i + step], E, "fp32")
        run = head.logits(run_h[i:i + step], E, precision)
        worst = torch.maximum(worst, (run.double() - ref.double()).abs().max())
    return float(worst)


def curve_row(cfg: RunConfig, step: int, lr: float, train_loss: float, reg_loss: float, grad_norm: float,
              logit_mean: float, logit_absmax: float, mean_log2z: float, mu_norm: float) -> dict[str, Any]:
    """One row of ``curves.parquet`` (``records.CURVE_COLUMNS``) at logging step ``step``;
    ``val_loss`` is filled in at evaluation steps."""
    return {"run_id": cfg.key(), "step": step, "lr": lr, "train_loss": train_loss, "reg_loss": reg_loss,
            "val_loss": None, "val_loss_fp32": None, "grad_norm": grad_norm, "logit_mean": logit_mean, "logit_absmax": logit_absmax,
            "mean_log2z": mean_log2z, "mu_norm": mu_norm}


def build_run_record(cfg: RunConfig, model: GPT, fwd, stab: Stabilizer, val, device: torch.device, autocast,
                     precision: str, *, best_val: float, diverged_step: int | None, reason: str, spike_score: float,
                     events: str = "", steps_done: int, elapsed: float, interval_times: list[float], started_at: str) -> dict[str, Any]:
    """Final evaluation of ``model`` and the runs.parquet row of its run (shared with packed training).

    fwd: the model or its compiled wrapper (evaluation runs through it); val: the final evaluation's
    validation batches (``final_eval_batches`` of them); best_val: lowest validation loss so far (the
    final evaluation is taken into account here); events: ``DivergenceMonitor.events_text()``.
    """
    final, final_fp32 = evaluate_both(fwd, stab, val, device, autocast, precision, cfg.micro_batch_size,
                                      cfg.head_chunk)
    emb = embedding_stats(model, final["hidden_mean"])
    if math.isfinite(final["val_loss"]):
        best_val = min(best_val, final["val_loss"])
    step_time = statistics.median(interval_times) if interval_times else float("nan")
    hp = {k: float(v) for k, v in make_stabilizer(cfg.stabilizer, **cfg.hparams).hyperparameters().items()}
    return {
        "run_id": cfg.key(), "sweep": cfg.sweep, "model": cfg.model, "n_params": model.n_params,
        "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
        "steps": cfg.steps, "warmup": cfg.warmup, "arch_version": cfg.arch_version, "stabilizer": cfg.stabilizer,
        "lam": hp.get("lam"), "cap": hp.get("cap"), "hparams": json.dumps(hp, sort_keys=True),
        "lr": cfg.lr, "seed": cfg.seed, "data_seed": cfg.resolved_data_seed, "weight_tying": cfg.weight_tying,
        "precision": precision, "data": cfg.data, "L0": cfg.L0,
        "final_loss": final["val_loss"], "final_loss_fp32": final_fp32,
        "final_loss_clipped": records.clipped_final_loss(final["val_loss"], cfg.L0, diverged_step is not None),
        "best_val_loss": best_val if math.isfinite(best_val) else float("nan"),
        "diverged": diverged_step is not None, "diverged_step": diverged_step, "diverged_reason": reason,
        "divergence_events": events, "spike_score": spike_score, "steps_done": steps_done,
        "logit_mean": final["logit_mean"], "logit_std": final["logit_std"],
        "logit_absmax": final["logit_absmax"], "mean_log2z": final["mean_log2z"],
        **{k: emb[k] for k in ("mu_norm", "isotropy", "mu_hidden_cos")},
        "logit_precision_error": precision_error(model, val[0][0][:cfg.micro_batch_size or None].to(device),
                                                 autocast, precision, cfg.head_chunk),
        "wall_time_s": elapsed, "step_time_s": step_time,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / step_time if step_time > 0 else float("nan"),
        "device": provenance.device_name(device), "threads": torch.get_num_threads(),
        **{k: v for k, v in provenance.versions().items() if k != "python"},
        # the config as it ran: cpu_gemm resolved ("auto" → the library that multiplied, bench.gemm)
        "started_at": started_at, "config": json.dumps({**cfg.to_dict(), "cpu_gemm": gemm.for_run(cfg)}, sort_keys=True,
                                                       default=str),
        "schema_version": records.SCHEMA_VERSION,
    }




# --- the loop ----------------------------------------------------------------------------------

@dataclass
class _Member:
    """The loop's bookkeeping of one member (what its run row and curve are built from)."""

    cfg: RunConfig
    monitor: DivergenceMonitor
    curve: list[dict[str, Any]] = field(default_factory=list)
    best_val: float = math.inf
    diverged_step: int | None = None
    reason: str = ""
    elapsed: float = 0.0  # seconds of training (this member's share)
    interval_times: list[float] = field(default_factory=list)  # seconds per step, one per log interval

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "curve": self.curve, "best_val": self.best_val,
                "diverged_step": self.diverged_step, "reason": self.reason, "elapsed": self.elapsed,
                "interval_times": self.interval_times}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state["monitor"])
        self.curve, self.best_val = state["curve"], state["best_val"]
        self.diverged_step, self.reason = state["diverged_step"], state["reason"]
        self.elapsed, self.interval_times = state["elapsed"], state["interval_times"]


def checkpoint_keys(cfgs: list[RunConfig]) -> list[str]:
    """The run keys a checkpoint of these members is valid for (in member order)."""
    return [c.key() for c in cfgs]


def pack_id(keys: list[str]) -> str:
    """A short stable name of a set of members (order-free)."""
    return hashlib.sha256(",".join(sorted(keys)).encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, keys: list[str], device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to exactly these members (any order), else None.

    A file that does not load (truncated, not a checkpoint) is set aside as ``<name>.corrupt``
    with a line on stderr, and None is returned: the run restarts from step 0 instead of failing
    on every retry.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a checkpoint")
    except Exception as e:
        aside = path.with_name(path.name + ".corrupt")
        path.replace(aside)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"stabench: checkpoint {path} does not load ({first[:200]}); set aside as {aside.name}, "
              "training starts from step 0", file=sys.stderr, flush=True)
        return None
    if state.get("format") != CHECKPOINT_FORMAT or sorted(state.get("keys", [])) != sorted(keys):
        return None
    return state


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A record row with str subclasses (torch's TorchVersion) as str: ``weights_only`` loads only plain types."""
    return {k: str(v) if isinstance(v, str) else v for k, v in row.items()}


CHECKPOINT_FORMAT = 2  # 1: the single-run trainer's own layout (before packs checkpointed)


class _Progress:
    """A rich progress bar on an interactive terminal, a plain line per evaluation otherwise."""

    def __init__(self, enabled: bool, cfgs: list[RunConfig], start: int):
        self.enabled, self.bar, self.steps = enabled, None, cfgs[0].steps
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            c = cfgs[0]
            what = f"{c.model} {c.stabilizer} lr={c.lr:g}" if len(cfgs) == 1 else f"pack of {len(cfgs)} {c.model}"
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(what, total=self.steps, completed=start, info="")
            self.bar.start()

    def update(self, step: int, info: str, line: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled and line:
            print(f"step {step}/{self.steps} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _info(members: list[_Member], rows: list[int]) -> tuple[str, bool]:
    """Progress text of the last curve row of members ``rows``; True when it holds a validation loss."""
    last = [members[i].curve[-1] for i in rows]
    loss = " ".join(f"{r['train_loss']:.3f}" for r in last)
    vals = [r["val_loss"] for r in last if r["val_loss"] is not None]
    return f"loss {loss}" + (" val " + " ".join(f"{v:.3f}" for v in vals) if vals else ""), bool(vals)


def train_members(cfgs: list[RunConfig], *, data: TokenData | None = None, checkpoint: str | Path | None = None,
                  checkpoint_every: int = 0, progress: bool = False, stop_at: int | None = None,
                  module: TrainModule | None = None, tracker: Tracker | None = None,
                  keep_weights: bool = False) -> list[RunResult] | None:
    """Train ``cfgs`` side by side (K = len(cfgs) ≥ 1, equal ``pack_key`` when K > 1).

    Returns one RunResult per config, in input order. Divergence of a member is recorded,
    never raised. checkpoint: file to resume from (if it holds exactly these members) and to
    save to every ``checkpoint_every`` steps (0 = never; saved at the log cadence); removed
    when the run finishes. stop_at: leave after this step with a checkpoint saved and return
    None (time-sliced jobs; checked at the log cadence). module: a prepared training module
    (default ``build_module(cfgs)``). tracker: receives each member's curve rows as they are
    made and its run row at the end (``bench.tracking``). keep_weights: each result carries its
    member's final weights (``RunResult.weights``; ``records.save_weights`` writes them).
    """
    cfgs = [c.check() for c in cfgs]
    c0, K = cfgs[0], len(cfgs)
    module = module or build_module(cfgs)
    device = module.device
    data = data or load_data(c0.data, c0.vocab_size)
    val = data.val_batches(c0.eval_batches, c0.batch_size, c0.seq_len)  # periodic evaluations
    final_val = data.val_batches(c0.resolved_final_eval_batches, c0.batch_size, c0.seq_len)
    members = [_Member(c, DivergenceMonitor(c.divergence, c.L0, c.warmup)) for c in cfgs]
    active = list(range(K))  # member index of each row of the module
    results: list[RunResult | None] = [None] * K
    keys = checkpoint_keys(cfgs)

    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    state = load_checkpoint(ckpt, keys, device) if ckpt is not None else None
    if state is not None:  # resume: the same members, possibly listed in another order
        index = {k: i for i, k in enumerate(keys)}
        active = [index[state["keys"][i]] for i in state["active"]]
        module.select(active)
        module.load_state_dict(state["module"])
        for key, m in zip(state["keys"], state["members"]):
            members[index[key]].load_state_dict(m)
        for key, r in state["results"].items():
            results[index[key]] = RunResult(r["run"], r["curve"])
        start = state["step"]

    started_at = provenance.utc_now()
    if tracker is not None:
        for i in active:
            tracker.start(keys[i], cfgs[i].to_dict())

    def finish(row: int, steps_done: int) -> None:
        """Final evaluation and run row of the member in module row ``row``."""
        m = members[active[row]]
        model, fwd, stab = module.member(row)
        run = build_run_record(m.cfg, model, fwd, stab, final_val, device, module.autocast, module.precision,
                               best_val=m.best_val, diverged_step=m.diverged_step, reason=m.reason,
                               spike_score=m.monitor.spike_score, events=m.monitor.events_text(), steps_done=steps_done, elapsed=m.elapsed,
                               interval_times=m.interval_times, started_at=started_at)
        weights = ({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                   if keep_weights else None)
        results[active[row]] = RunResult(run, m.curve, weights)
        if tracker is not None:
            tracker.finish(keys[active[row]], run)

    def save(step: int) -> None:
        _save_checkpoint(ckpt, {
            "format": CHECKPOINT_FORMAT, "keys": keys, "step": step, "active": active,
            "module": module.state_dict(), "members": [m.state_dict() for m in members],
            "results": {keys[i]: {"run": _plain(r.run), "curve": r.curve} for i, r in enumerate(results) if r is not None}})

    pending: list[torch.Tensor] = []  # (3, K) per step: ce, reg, grad norm; read at the log cadence
    last_checked = start
    bar = _Progress(progress, cfgs, start)
    t_interval = time.perf_counter()
    for step in range(start + 1, c0.steps + 1):
        x, y = data.train_batch(step - 1, c0.resolved_data_seed, c0.batch_size, c0.seq_len)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        is_eval = step % c0.eval_every == 0 or step == c0.steps
        is_log = is_eval or step % c0.log_every == 0
        losses, stats = module.train_batch(x, y, [lr_at(members[i].cfg, step - 1) for i in active], stats=is_log)
        pending.append(losses.float())
        if not is_log:
            continue
        # --- log cadence: one host sync for all members ----------------------------------------
        rows = torch.stack(pending).tolist()  # [step][quantity][row]
        stats = stats.tolist()  # [row][quantity]
        pending = []
        now = time.perf_counter()
        share = (now - t_interval) / len(active)  # this interval's wall time per member
        frozen = []
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
                model, fwd, stab = module.member(row)
                ev, crow["val_loss_fp32"] = evaluate_both(fwd, stab, val, device, module.autocast, module.precision,
                                                          m.cfg.micro_batch_size, m.cfg.head_chunk)
                crow["val_loss"] = ev["val_loss"]
                if math.isfinite(ev["val_loss"]):
                    m.best_val = min(m.best_val, ev["val_loss"])
            m.curve.append(crow)
            if tracker is not None:
                tracker.log(keys[idx], step, crow)
            if m.diverged_step is not None:
                finish(row, step)
                frozen.append(row)
        info, has_val = _info(members, active)
        bar.update(step, info, line=has_val)
        last_checked = step
        if frozen:  # a diverged member is frozen for good: its rows leave the module
            keep = [r for r in range(len(active)) if r not in frozen]
            active = [active[r] for r in keep]
            if not active:
                break
            module.select(keep)
        leaving = stop_at is not None and stop_at <= step < c0.steps
        if ckpt is not None and step < c0.steps and (leaving or checkpoint_every and step % checkpoint_every == 0):
            save(step)
        if leaving:
            bar.close()
            if tracker is not None:
                for i in active:
                    tracker.leave(keys[i])
            return None
        t_interval = time.perf_counter()
    bar.close()

    for row in range(len(active)):
        finish(row, c0.steps)
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return results  # type: ignore[return-value]


def train(cfg: RunConfig, *, data: TokenData | None = None, checkpoint: str | Path | None = None,
          checkpoint_every: int = 0, progress: bool = False, stop_at: int | None = None,
          tracker: Tracker | None = None, keep_weights: bool = False) -> RunResult | None:
    """Train the run described by ``cfg`` (``train_members`` with one member)."""
    out = train_members([cfg], data=data, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                        progress=progress, stop_at=stop_at, tracker=tracker, keep_weights=keep_weights)
    return None if out is None else out[0]
