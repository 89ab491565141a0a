"""``stabench sweep``: run a sweep on this machine with N joblib (loky) worker processes.

The coordinating process queues the grid, starts the workers, and shows live progress
(done / running / diverged / failed, ETA) by polling the storage. Workers wait for running
trials to finish before leaving, so a worker that dies is noticed and its trial retried
within the same command; re-running the command resumes a stopped sweep.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .spec import SweepSpec
from .storage import open_storage
from .trials import Progress, TrialQueue
from .worker import run_worker

THREADS_PER_WORKER = 1
"""Intra-op threads per local worker on CPU. The CPU presets are too small for intra-op
parallelism to pay, so one single-threaded worker per core is the default (tune in a perf issue)."""


def usable_cores() -> int:
    """CPU cores this process may run on (respects affinity and Slurm/cgroup CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def uses_cuda(spec: SweepSpec) -> bool:
    device = spec.train.get("device", "auto")
    if device == "cpu":
        return False
    import torch
    return device == "cuda" or torch.cuda.is_available()


def default_workers(spec: SweepSpec) -> int:
    """One worker per GPU for CUDA sweeps, else usable cores // THREADS_PER_WORKER."""
    if uses_cuda(spec):
        import torch
        return max(1, torch.cuda.device_count())
    return max(1, usable_cores() // THREADS_PER_WORKER)


def threads_per_worker(spec: SweepSpec, workers: int) -> int | None:
    """Cores divided among CPU workers; None (the trainer's default) on GPU."""
    return None if uses_cuda(spec) else max(1, usable_cores() // workers)


def _worker_process(spec: SweepSpec, url: str | None, out: Path, threads: int | None, index: int,
                    gpu: bool) -> dict:
    log_path = Path(out) / "trials" / f"worker-{index}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as stream:
        report = run_worker(spec, url, out, threads=threads, gpu=index if gpu else None, enqueue=False,
                            wait=True, stream=stream)
    return dataclasses.asdict(report)


class _Display:
    """A rich progress bar on a terminal, one line per change otherwise."""

    def __init__(self, name: str, first: Progress):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = Console(stderr=True)
        self.tty = self.console.is_terminal
        self.last: tuple | None = None
        self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("running {task.fields[running]} · diverged {task.fields[diverged]} · "
                                  "failed {task.fields[failed]}"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[live]}"),
                       console=self.console, speed_estimate_period=3600, disable=not self.tty)
        self.start, self.first_finished = time.monotonic(), first.done + first.failed
        self.task = self.bar.add_task(name, total=first.total, completed=first.done + first.failed,
                                      running=first.running, diverged=first.diverged, failed=first.failed, live="")
        self.printed_at = 0.0
        self.bar.start()

    def update(self, p: Progress, live: str = "") -> None:
        """New counts, and ``live``: what the running trials are doing (step, loss, tokens/s)."""
        self.bar.update(self.task, completed=p.done + p.failed, running=p.running, diverged=p.diverged,
                        failed=p.failed, live=live)
        state = (p.done, p.running, p.diverged, p.failed)
        now = time.monotonic()
        if not self.tty and (state != self.last or (live and now - self.printed_at >= LIVE_EVERY_S)):
            print(f"{p.done}/{p.total} done · running {p.running} · diverged {p.diverged} · failed {p.failed}"
                  f" · {self.eta(p)}" + (f" · {live}" if live else ""), file=sys.stderr, flush=True)
            self.printed_at = now
        self.last = state

    def eta(self, p: Progress) -> str:
        """Elapsed time and remaining time at the mean pace of the trials finished so far."""
        elapsed = time.monotonic() - self.start
        finished = p.done + p.failed - self.first_finished
        left = p.total - p.done - p.failed
        eta = f"ETA {_clock(elapsed / finished * left)}" if finished > 0 else "ETA --:--"
        return f"elapsed {_clock(elapsed)} · {eta}"

    def close(self) -> None:
        self.bar.stop()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


LIVE_EVERY_S = 30.0  # without a terminal, the running trials' progress is printed this often at most


def live_summary(queue: TrialQueue) -> str:
    """``#N step/steps loss L tokens/s`` for each running trial (from its heartbeats)."""
    from optuna.trial import TrialState

    from .status import running_row

    parts = []
    for t in queue.trials():
        if t.state == TrialState.RUNNING:
            r = running_row(queue.storage, t)
            parts.append(f"#{t.number} {r['step']}" + (f" loss {r['loss']}" if r["loss"] else "")
                         + (f" {r['tokens/s']} tok/s" if r["tokens/s"] else "")
                         + (" STALE" if r["liveness"] != "alive" else ""))
    return " | ".join(parts)


def _monitor(queue: TrialQueue, display: _Display, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            display.update(queue.progress(), live_summary(queue))
        except Exception:  # a transient storage error must not end the display
            pass


def run_local(spec: SweepSpec, url: str | None, out: Path, workers: int | None = None,
              on_ready: Callable[[], None] | None = None) -> Progress:
    """Run the sweep here until every trial is finished; returns the final counts.

    ``on_ready`` is called once the storage is open and the trials are queued (the CLI records
    the sweep file then, so an error before that leaves the results directory as it was)."""
    from joblib import Parallel, delayed
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    out = Path(out)
    storage = open_storage(url, out, spec.execution)
    queue = TrialQueue(spec, storage, out)
    for message in queue.reap():
        print(message, file=sys.stderr)
    added = queue.enqueue(retry_failed=True)
    if on_ready is not None:
        on_ready()
    p = queue.progress()
    workers = max(1, min(workers or default_workers(spec), p.queued + p.running))  # no idle processes
    threads = threads_per_worker(spec, workers)
    how = f"{threads} thread(s) each" if threads else "GPU"
    print(f"sweep {spec.name}: {p.total} trials, {p.done} already done, {added} newly queued; "
          f"{workers} worker(s), {how}; storage {storage.display}; results {out}", file=sys.stderr)
    if p.finished:
        return p
    t0 = time.monotonic()
    display = _Display(spec.name, p)
    stop = threading.Event()
    monitor = threading.Thread(target=_monitor, args=(queue, display, stop), daemon=True)
    monitor.start()
    try:
        for _ in range(spec.execution.max_retries + 1):
            try:
                Parallel(n_jobs=workers, backend="loky")(
                    delayed(_worker_process)(spec, url, out, threads, i, threads is None) for i in range(workers))
                break
            except TerminatedWorkerError as e:  # e.g. killed by the OOM killer: start the workers again
                print(f"\na worker process died ({str(e).splitlines()[0][:200]}); restarting the workers: "
                      "its trial is retried from its checkpoint", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume (running trials restart from "
              f"their checkpoints); worker logs in {out / 'trials'}", file=sys.stderr)
        raise
    finally:
        stop.set()
        monitor.join()
        try:
            display.update(queue.progress())
        finally:
            display.close()
    p = queue.progress()
    minutes, seconds = divmod(int(time.monotonic() - t0), 60)
    print(f"sweep {spec.name}: {p.done}/{p.total} done ({p.diverged} diverged), {p.failed} failed "
          f"in {minutes}m{seconds:02d}s; results in {out / 'runs.parquet'}", file=sys.stderr)
    if p.failed:
        hint = " --storage URL" if url and storage.display != str(out / "journal.log") else ""
        print(f"failures and their errors: stabench status {out}{hint}", file=sys.stderr)
    return p
