"""``stabench status``: a sweep's trials by state, what is running where, and the failures."""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from .spec import ExecutionSpec, SweepSpec, load_spec
from .storage import JOURNAL_NAME, STORAGE_ENV, SweepStorage, open_storage
from .trials import recorded_keys, retried_numbers


@dataclass
class Target:
    """What ``stabench status`` looks at."""

    name: str
    out: Path
    storage: SweepStorage
    studies: list[str]
    spec: SweepSpec | None


def locate(target: str, storage_url: str | None, out: str | None = None) -> Target:
    """A sweep file or a results directory -> its storage and studies."""
    import os

    from ..errors import UsageError
    from .grid import study_names

    path = Path(target)
    if path.is_dir():
        # the sweep file recorded there gives the study's name and its lease settings
        recorded = path / "sweep.toml"
        spec = load_spec(recorded, check_data=False, check_machine=False) if recorded.is_file() else None
        name, out_dir = (spec.name if spec else path.resolve().name), path
        url = storage_url or os.environ.get(STORAGE_ENV)
        if url is None:
            if not (path / JOURNAL_NAME).exists():
                raise UsageError(f"{path} has no {JOURNAL_NAME}; pass --storage URL (the sweep's storage)")
            url = str(path / JOURNAL_NAME)
        storage = open_storage(url, out_dir, spec.execution if spec else ExecutionSpec())
    elif path.is_file():
        spec = load_spec(path, check_data=False)
        name, out_dir = spec.name, Path(out) if out else Path("results") / spec.name
        storage = open_storage(storage_url, out_dir, spec.execution)
    else:
        raise UsageError(f"{target}: no such sweep file or results directory")
    names = storage.study_names()
    if spec is not None:
        studies = [n for n in study_names(spec) if n in names]
    else:
        studies = [n for n in names if n == name or n.startswith(name + "/")] or names
    return Target(name, out_dir, storage, studies, spec)


def _describe(t: FrozenTrial) -> str:
    a = t.user_attrs
    hp = ",".join(f"{k}={v:g}" for k, v in sorted((a.get("hparams") or {}).items()))
    return f"{a.get('model', '?')} {a.get('stabilizer', '?')}{f'({hp})' if hp else ''} lr={a.get('lr', float('nan')):g}"


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def running_row(storage: SweepStorage, t: FrozenTrial, now: float | None = None) -> dict[str, str]:
    """What a running trial is doing, as ``status`` and the sweep's progress line show it: step / steps,
    last train loss, tokens/s, time since the last heartbeat, and ``stale: why`` when its worker is gone."""
    now = time.time() if now is None else now
    live = storage.liveness(t, now)
    p = live.progress or {}
    loss, tps = p.get("train_loss"), p.get("tokens_per_s")
    return {"step": f"{p['step']}/{p['steps']}" if "step" in p else "starting",
            "loss": f"{loss:.3f}" if isinstance(loss, (int, float)) else "",
            "tokens/s": f"{tps:,.0f}" if isinstance(tps, (int, float)) else "",
            "heartbeat": f"{_age(now - live.renewed_at)} ago" if live.renewed_at else "none yet",
            "liveness": f"stale: {live.stale}; the next worker to look retries it" if live.stale else "alive"}


def render(target: Target, full_errors: bool = False) -> str:
    """The status report as text. ``full_errors``: each failure's traceback too, not its first line."""
    import io

    from rich.console import Console
    from rich.table import Table

    trials = [t for n in target.studies for t in target.storage.load(n).get_trials(deepcopy=False)]
    retried = retried_numbers(trials)
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(f"[bold]sweep {target.name}[/bold] · storage {target.storage.display} · results {target.out}")
    if not target.studies:
        console.print("no trials yet (the sweep has not been started on this storage)")
        return console.export_text()

    by_state = Table(title="trials by state")
    for col in ("state", "trials", "notes"):
        by_state.add_column(col)
    for state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
        ts = [t for t in trials if t.state == state]
        note = ""
        if state == TrialState.COMPLETE:
            note = f"{sum(bool(t.user_attrs.get('diverged')) for t in ts)} diverged"
        elif state == TrialState.FAIL:
            note = f"{sum(t.number in retried for t in ts)} retried"
        elif state == TrialState.PRUNED and ts:
            note = "duplicates of another trial"
        by_state.add_row(state.name, str(len(ts)), note)
    console.print(by_state)
    recorded = recorded_keys(target.out)
    keys = {t.user_attrs.get("key") for t in trials}
    console.print(f"{len(keys & recorded)} of {len(keys)} trial keys recorded in {target.out / 'runs.parquet'}")

    running = [t for t in trials if t.state == TrialState.RUNNING]
    if running:
        table = Table(title="running")
        cols = ("trial", "key", "run", "worker", "since", "resumed from", "step", "loss", "tokens/s", "heartbeat",
                "liveness")
        for col in cols:
            table.add_column(col)
        now = dt.datetime.now()
        for t in running:
            since = f"{(now - t.datetime_start).total_seconds():.0f} s" if t.datetime_start else ""
            live = running_row(target.storage, t)
            table.add_row(str(t.number), str(t.user_attrs.get("key")), _describe(t),
                          str(t.user_attrs.get("worker", "")), since, str(t.user_attrs.get("resumed_from_step", "")),
                          *(live[c] for c in cols[6:]))
        console.print(table)

    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        table = Table(title="failures")
        for col in ("trial", "key", "run", "error", "retry"):
            table.add_column(col)
        for t in failed:
            error = str(t.user_attrs.get("error") or "worker stopped sending heartbeats")
            table.add_row(str(t.number), str(t.user_attrs.get("key")), _describe(t), error.strip().splitlines()[0],
                          "retried" if t.number in retried else "final")
        console.print(table)
        if full_errors:
            for t in failed:
                console.print(f"trial {t.number}:", str(t.user_attrs.get("error", "")).strip(), markup=False)
    return console.export_text()
