"""Liveness you can read: what a running trial is doing, a dead worker's trial shown as stale at once,
and diverged trials that optuna-dashboard can tell apart.

Workers run as real ``stabench worker`` processes (SIGKILLed where a test needs a dead one); status is
read through ``stabench status`` as a user would.
"""
from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from bench.cli import main
from services import postgres_url
from test_sweep_run import TIMEOUT_S, stabench, start_worker, study_trials, sweep_file


def _wait(predicate, what: str, proc=None, log: Path | None = None):
    deadline = time.monotonic() + TIMEOUT_S
    while not (value := predicate()):
        assert proc is None or proc.poll() is None, log.read_text() if log else "worker ended"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _lease_progress(out: Path) -> dict | None:
    for f in (out / "journal.log.leases").glob("*.json"):
        try:
            p = json.loads(f.read_text()).get("progress")
        except (OSError, ValueError):
            continue
        if p and p.get("step", 0) >= 20:
            return p
    return None


def _running_line(status: str) -> str:
    lines = [line for line in status.splitlines() if "nano baseline" in line]
    assert lines, status
    return lines[0]


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_a_running_trial_shows_its_step_loss_and_heartbeat_and_a_killed_one_is_stale_at_once(tmp_path, kind):
    storage = postgres_url() if kind == "postgresql" else None
    name = f"live-{kind}-{time.monotonic_ns() % 10**8}"
    path = sweep_file(tmp_path, name, lrs=(1e-3,), stabilizers="baseline = {}", steps=3000,
                      extra="lease_s = 600\n")  # a long lease: staleness must come from the dead process
    out = tmp_path / "results" / "elsewhere"  # a results directory not named after the sweep
    log = tmp_path / "w.log"
    worker = start_worker(path, out, log, storage)
    args = ["status", str(out)] + (["--storage", storage] if storage else [])
    try:
        if storage is None:  # the heartbeat carries the loop's last report
            progress = _wait(lambda: _lease_progress(out), "a progress report", worker, log)
            assert set(progress) == {"step", "steps", "train_loss", "tokens_per_s"} and progress["steps"] == 3000

        def reported():
            r = stabench(*args, cwd=tmp_path)
            return r.stdout if r.returncode == 0 and "/3000" in r.stdout else None

        status = _wait(reported, "a running trial with its step in status", worker, log)
        assert status.splitlines()[0].startswith(f"sweep {name} ")  # the study's name, not the folder's
        line = _running_line(status)
        assert "alive" in line and " ago" in line
        step = int(line.split("/3000")[0].split()[-1])
        assert 0 < step < 3000
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    status = stabench(*args, cwd=tmp_path).stdout
    line = _running_line(status)
    assert "stale: worker" in line, status  # at once, not after lease_s = 600 s
    flat = " ".join(status.replace("│", " ").split())  # the cell wraps over lines; the other cells there are blank
    assert "is no longer running" in flat, status
    # and the next worker retries it at once, resuming from its checkpoint
    again = stabench("worker", str(path), "--out", str(out), "--threads", "1", "--max-trials", "1",
                     *(["--storage", storage] if storage else []), cwd=tmp_path, timeout=TIMEOUT_S)
    assert "is no longer running; retrying as trial" in again.stdout, again.stdout + again.stderr


def test_a_lease_not_renewed_within_lease_s_by_a_worker_elsewhere_is_stale(tmp_path):
    from bench.sweep.spec import load_spec
    from bench.sweep.storage import Lease, open_storage

    path = sweep_file(tmp_path, "remote", lrs=(1e-3,), stabilizers="baseline = {}")
    spec = load_spec(path)
    storage = open_storage(None, tmp_path / "out", spec.execution)
    study = storage.study("remote")
    trial = study.ask()
    now = time.time()
    other = f"{socket.gethostname()}-not"
    lease = Lease(trial._trial_id, trial.number, "k", f"{other}:1", other, 1, "ns", now - 30, spec.execution.lease_s)
    storage._lease_file(trial._trial_id).parent.mkdir(parents=True, exist_ok=True)
    storage._lease_file(trial._trial_id).write_text(json.dumps(lease.__dict__))
    frozen = storage.optuna.get_trial(trial._trial_id)
    assert storage.liveness(frozen, now).stale is None  # 30 s < lease_s = 120 s: alive, as far as we know
    stale = storage.liveness(frozen, now + 100).stale
    assert stale and "lease expired" in stale and "limit 120 s" in stale


def test_a_diverged_trial_is_valued_at_L0_and_marked(tmp_path, capsys):
    path = sweep_file(tmp_path, "div", lrs=(1e-2, 30.0), stabilizers="baseline = {}", steps=40)
    out = tmp_path / "results" / "div"
    assert main(["worker", str(path), "--out", str(out), "--threads", "1"]) == 0
    trials = {t.user_attrs["lr"]: t for t in study_trials(path, out) if t.state == TrialState.COMPLETE}
    bad, good = trials[30.0], trials[1e-2]
    assert bad.user_attrs["diverged"] is True and bad.user_attrs["outcome"] == "diverged"
    assert bad.value == pytest.approx(bad.user_attrs["L0"])  # min(final loss, L0), L0 when diverged
    assert good.user_attrs["outcome"] == "trained" and good.value == pytest.approx(good.user_attrs["final_loss"])
