"""A sweep worker: reap dead workers' trials, claim one, train it under a lease, record it, repeat.

Runs anywhere that reaches the storage and the results directory: a local process
(``stabench sweep``), ``stabench worker`` on any machine, or a Slurm array task. Training
checkpoints to ``<out>/checkpoints/<key>.pt`` every ``execution.checkpoint_every`` steps, so
a retried trial resumes where its dead worker stopped (attribute ``resumed_from_step``).

With ``execution.pack = K`` (or "auto") a worker claims up to K compatible waiting trials at
once and trains them as one batched model (``bench.trainer.train_members``), each under its own
lease; every trial is still recorded as its own row and completed on its own. A pack
checkpoints as one file, ``<out>/checkpoints/pack-<id>.pt`` (its members' keys in
``pack-<id>.keys``); the retries of a killed packed worker's trials are claimed together again
(the first one's pack companions are preferred) and resume from it.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from .. import records
from ..config import RunConfig
from .spec import SweepSpec
from .storage import open_storage, redact
from .trials import Claim, TrialQueue


@dataclass
class WorkerReport:
    """What one worker did."""

    completed: int = 0
    diverged: int = 0
    failed: int = 0
    lost: int = 0  # trials another worker failed under us (our lease was judged expired)


class Log:
    """Timestamped lines ``HH:MM:SS host:pid message`` to a stream; never prints a password."""

    def __init__(self, stream: TextIO | None, url: str | None):
        self.stream, self.url = stream, url
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, message: str) -> None:
        if self.stream is None:
            return
        line = f"{dt.datetime.now():%H:%M:%S} {self.worker} {message}"
        print(redact(line, self.url), file=self.stream, flush=True)


def checkpoint_path(out: Path, keys: list[str]) -> Path:
    """Checkpoint of one trial (``<key>.pt``) or of a pack (``pack-<id>.pt``, its members listed
    one key per line beside it in ``pack-<id>.keys``, so a retry can gather the same pack)."""
    from ..trainer import pack_id

    name = keys[0] if len(keys) == 1 else f"pack-{pack_id(keys)}"
    return Path(out) / "checkpoints" / f"{name}.pt"


def pack_members(out: Path, key: str) -> list[str]:
    """Keys of the pack checkpoint that holds run ``key`` ([] if none does)."""
    for index in sorted((Path(out) / "checkpoints").glob("pack-*.keys")):
        try:
            keys = index.read_text().split()
        except OSError:
            continue
        if key in keys and index.with_suffix(".pt").exists():
            return keys
    return []


def checkpoint_step(path: Path, keys: list[str]) -> int:
    """Step saved in the checkpoint of these members (0 if there is none usable)."""
    from ..trainer import load_checkpoint

    try:
        state = load_checkpoint(path, keys)
    except Exception:
        return 0
    return int(state["step"]) if state is not None else 0


def describe(cfg: RunConfig) -> str:
    hp = ",".join(f"{k}={v:g}" for k, v in sorted(cfg.hparams.items()))
    return (f"{cfg.model} {cfg.stabilizer}{f'({hp})' if hp else ''} lr={cfg.lr:g} seed={cfg.seed}"
            f"{' tied' if cfg.weight_tying else ''}")


class _DataCache:
    """Token data loaded once per (spec, vocabulary) for all trials of this worker."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, int], object] = {}

    def __call__(self, cfg: RunConfig):
        from ..data import load_data
        k = (cfg.data, cfg.vocab_size)
        if k not in self._data:
            self._data[k] = load_data(cfg.data, cfg.vocab_size)
        return self._data[k]


def _start_attrs(threads: int | None, **attrs) -> dict:
    """Trial attributes recorded when this worker starts training a trial."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "threads": threads,
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **attrs}


def _error_text(e: Exception, url: str | None) -> str:
    """A failed trial's ``error`` attribute: the exception and the end of its traceback, password-free."""
    tb = "".join(traceback.format_exception(e)[-6:])
    return redact(f"{type(e).__name__}: {e}\n{tb}", url)


class LiveProgress:
    """A tracker (``bench.tracking``) that puts each trial's latest curve row into its lease holder's
    ``progress``, which the heartbeat sends to the storage: step / steps, train loss and tokens/s,
    all host values the loop already has at the log cadence (no extra device sync)."""

    def __init__(self, holders: dict[str, object], cfgs: dict[str, RunConfig]):
        self.holders, self.cfgs, self.last = holders, cfgs, {}

    def start(self, key, config):
        self.last[key] = (None, time.monotonic())

    def log(self, key, step, row):
        cfg, (prev, t0) = self.cfgs[key], self.last.get(key, (None, time.monotonic()))
        now = time.monotonic()
        tps = cfg.batch_size * cfg.seq_len * (step - prev) / (now - t0) if prev is not None and now > t0 else None
        self.last[key] = (step, now)
        self.holders[key].progress = {"step": step, "steps": cfg.steps, "train_loss": row["train_loss"],
                                      "tokens_per_s": tps}

    def finish(self, key, run):
        pass

    def leave(self, key):
        pass


def run_trials(queue: TrialQueue, claims: list[Claim], data: Callable, log: Log, threads: int | None) -> list[str]:
    """Train claimed trials together (one trial, or a pack of K); one outcome per claim:
    'completed', 'diverged', 'failed' or 'lost'.

    Every trial is held under its own lease and recorded on its own. A pack checkpoints as one
    file and resumes from it when the same members are claimed again. A pack whose stabilizer
    cannot be vectorized (``PackError``) is trained one trial at a time instead.
    """
    from ..errors import PackError

    cfgs = [c.config.replace(threads=threads) if threads else c.config for c in claims]
    k = len(claims)
    with ExitStack() as stack:
        leases = [stack.enter_context(queue.storage.hold(c.study, c.trial_id, c.number, c.key)) for c in claims]
        try:
            return _train_and_record(queue, claims, cfgs, leases, data, log, threads)
        except PackError as e:
            log(f"pack of {k} ({', '.join(str(c.number) for c in claims)}): {e}; training its trials one at a time")
            for claim in claims:
                queue.started(claim, {"pack_size": 1, "unpacked_reason": str(e)})
        return [outcome for claim, cfg, lease in zip(claims, cfgs, leases)
                for outcome in _train_and_record(queue, [claim], [cfg], [lease], data, log, threads)]


def _train_and_record(queue: TrialQueue, claims: list[Claim], cfgs: list[RunConfig], leases: list, data: Callable,
                      log: Log, threads: int | None) -> list[str]:
    """Train ``cfgs`` as one pack (or one trial), record and complete each; PackError propagates."""
    from ..errors import PackError
    from ..tracking import Fanout, open_tracker
    from ..trainer import train_members

    k, out, every = len(claims), queue.out, queue.spec.execution.checkpoint_every
    keys = [c.key for c in claims]
    ckpt = checkpoint_path(out, keys)
    resumed = checkpoint_step(ckpt, keys)
    where = f"resuming from checkpoint step {resumed}" if resumed else "start"
    for i, (claim, cfg) in enumerate(zip(claims, cfgs)):
        pack = {"pack_size": k, "pack": [c.number for c in claims]} if k > 1 else {}
        queue.started(claim, _start_attrs(threads, resumed_from_step=resumed, **pack))
        log(f"trial {claim.number} {claim.key} {describe(cfg)}: {where}" + (f" (pack member {i + 1}/{k})" if k > 1 else ""))
    if k > 1 and every:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.with_suffix(".keys").write_text("\n".join(keys) + "\n")
    try:
        live = LiveProgress(dict(zip(keys, leases)), dict(zip(keys, cfgs)))
        results = train_members(cfgs, data=data(cfgs[0]), checkpoint=ckpt if every else None, checkpoint_every=every,
                                tracker=Fanout(open_tracker(cfgs[0].log, out), live))
    except PackError:
        ckpt.with_suffix(".keys").unlink(missing_ok=True)
        raise
    except Exception as e:
        error = _error_text(e, queue.storage.url)
        for claim in claims:
            queue.fail(claim, error)
        who = f"trial {claims[0].number} {claims[0].key}" if k == 1 else \
            f"pack of {k} ({', '.join(str(c.number) for c in claims)})"
        log(f"{who}: FAILED {type(e).__name__}: {redact(str(e), queue.storage.url)}")
        return ["failed"] * k
    ckpt.with_suffix(".keys").unlink(missing_ok=True)
    outcomes = []
    for claim, lease, result in zip(claims, leases, results):
        records.write_run(out, result.run, result.curve)
        ours = queue.complete(claim, result.run, result.curve) and not lease.lost
        outcomes.append(_report(claim, result.run, ours, log))
    return outcomes


def _report(claim: Claim, run: dict, ours: bool, log: Log) -> str:
    if not ours:
        log(f"trial {claim.number} {claim.key}: another worker presumed this one dead and failed the trial; "
            "the result is recorded once in runs.parquet all the same")
        return "lost"
    status = f"diverged at step {run['diverged_step']} ({run['diverged_reason']})" if run["diverged"] else "done"
    log(f"trial {claim.number} {claim.key}: {status}, final loss {run['final_loss']:.4f}, {run['wall_time_s']:.1f} s")
    return "diverged" if run["diverged"] else "completed"


def pack_size(spec: SweepSpec, cfg: RunConfig) -> int:
    """Members per pack for this sweep (1: packing off, and always for bf16-emu, which packs
    do not reproduce exactly)."""
    from ..pack import auto_pack_size

    if cfg.precision == "bf16-emu":
        return 1
    pack = spec.execution.pack
    return auto_pack_size(cfg) if pack == "auto" else int(pack)


def run_worker(spec: SweepSpec, storage_url: str | None, out: Path, *, threads: int | None = None,
               gpu: int | None = None, enqueue: bool = True, wait: bool = False,
               stream: TextIO | None | str = "stdout", max_trials: int | None = None,
               on_ready: Callable[[], None] | None = None) -> WorkerReport:
    """Work on a sweep until nothing is queued (``wait``: until nothing is queued or running).

    threads: intra-op threads for training (None: the trainer's default).
    gpu: CUDA device index for this worker (None: the current device).
    enqueue: queue the sweep's missing grid points first (idempotent across workers).
    max_trials: stop after claiming this many trials.
    on_ready: called once the storage is open and the trials queued, before the first claim.
    """
    if gpu is not None:
        import torch
        if torch.cuda.is_available():
            torch.cuda.set_device(gpu % torch.cuda.device_count())
    storage = open_storage(storage_url, Path(out), spec.execution)
    log = Log(sys.stdout if stream == "stdout" else stream, storage.url)  # sys.stdout as it is now
    queue = TrialQueue(spec, storage, Path(out))
    if enqueue:
        added = queue.enqueue()
        if added:
            log(f"queued {added} trial(s) of sweep {spec.name} in {storage.display}")
    if on_ready is not None:
        on_ready()
    report, claimed, data = WorkerReport(), 0, _DataCache()
    while max_trials is None or claimed < max_trials:
        for message in queue.reap():
            log(message)
        claim = queue.claim()
        if claim is None:
            if wait and queue.busy():
                time.sleep(spec.execution.poll_s)
                continue
            break
        k = pack_size(spec, claim.config)
        if max_trials is not None:
            k = min(k, max_trials - claimed)
        prefer = pack_members(out, claim.key) if k > 1 else []
        claims = [claim] + (queue.claim_companions(claim, k, prefer) if k > 1 else [])
        claimed += len(claims)
        for outcome in run_trials(queue, claims, data, log, threads):
            setattr(report, outcome, getattr(report, outcome) + 1)
    log(f"worker done: {report.completed} completed, {report.diverged} diverged, {report.failed} failed"
        + (f", {report.lost} lost" if report.lost else ""))
    return report
