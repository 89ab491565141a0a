"""``stabench launch slurm --submit`` on a real Slurm cluster against a real PostgreSQL storage.

``source tests/slurm.sh`` starts a single-node cluster (munged, slurmctld, slurmd) and
``source tests/postgres.sh`` a server; ``.ci/run`` starts both, and in CI a missing one fails these
tests. Array tasks run the installed ``stabench worker`` exactly as on a cluster. The guarantees:

- an array of 2 workers trains every grid point exactly once;
- ``scontrol requeue`` of a task mid-trial kills its worker; the requeued task finds the trial's
  worker gone (same host, dead pid), retries it and resumes from its checkpoint, and the curve
  equals an uninterrupted run's — for one trial and for a packed sweep (one pack checkpoint).
"""
from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from bench.config import from_dict
from bench.trainer import train_members
from services import postgres_url, slurm
from test_sweep_run import STABENCH, assert_exactly_once, sweep_file

JOB_TIMEOUT_S = 300


@pytest.fixture
def cluster() -> str:
    """The PostgreSQL URL the array's workers share (the Slurm cluster is checked too)."""
    slurm()
    return postgres_url()


def cluster_sweep(tmp_path: Path, name: str, lrs, steps: int, extra: str = "") -> Path:
    """test_sweep_run's tiny sweep (nano, V = 256, checkpoints every 10 steps) with a 30 s lease."""
    return sweep_file(tmp_path, name, lrs=lrs, stabilizers="baseline = {}", steps=steps, extra="lease_s = 30\n" + extra)


def submit(path: Path, out: Path, url: str, array: int) -> str:
    done = subprocess.run([STABENCH, "launch", "slurm", str(path), "--array", str(array), "--out", str(out),
                           "--script", str(out.parent / f"{path.stem}.sh"), "--storage", url, "--submit"],
                          cwd=path.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split("submitted Slurm job ")[1].split(";")[0].strip()


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def squeue(job: str, every: bool = False) -> list[str]:
    """``TASK STATE`` of the job's array tasks that have not finished (pending, running, completing,
    requeued…), or of all of them (``every``); finished tasks stay listed with ``-t all`` (MinJobAge)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%i %T"], capture_output=True,
                         text=True).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    return lines if every else [line for line in lines if line.split()[-1] not in FINISHED]


def wait_done(job: str, out: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while squeue(job):
        assert time.monotonic() < deadline, f"job {job} still queued: {squeue(job)}; logs: {task_logs(out)}"
        time.sleep(0.5)


def task_logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / "trials").glob("slurm-*.out")))


def wait_for(predicate, what: str, job: str, out: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; logs: {task_logs(out)}"
        assert squeue(job), f"job {job} ended before {what}; logs: {task_logs(out)}"
        time.sleep(0.1)


def requeue(job: str) -> None:
    """Requeue array task 0 (Slurm kills it) and let it start again now: a requeued job is held back by a
    begin time, which ``StartTime=now`` lifts only once the killed task has finished completing."""
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:  # a requeued task passes through CANCELLED/REQUEUED and PENDING first
        states = squeue(job, every=True)
        seen.append(states)
        show = subprocess.run(["scontrol", "show", "job", f"{job}_0"], capture_output=True, text=True).stdout
        if any(line.endswith(" RUNNING") for line in states) or ("Restarts=0" not in show and "PENDING" not in show
                                                                 and "Restarts=" in show):
            return  # it runs again (or already ran again and ended: the assertions that follow read its log)
        subprocess.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"], capture_output=True, timeout=30)
        time.sleep(0.5)
    raise AssertionError(f"requeued task of job {job} never ran again; states seen: {seen[-5:]}; "
                         + subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout)


def uninterrupted_curves(trials) -> pd.DataFrame:
    """The trials' runs trained again in this process as one uninterrupted pack (or run), 1 thread."""
    cfgs = [from_dict(t.user_attrs["config"]).replace(threads=1) for t in trials]
    rows = [row for r in train_members(cfgs) for row in r.curve]
    return pd.DataFrame(rows).sort_values(["run_id", "step"]).reset_index(drop=True)


def recorded_curves(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "curves.parquet").sort_values(["run_id", "step"]).reset_index(drop=True)


def test_an_array_of_two_workers_trains_the_sweep_exactly_once(cluster, tmp_path):
    name = f"slurm2-{uuid.uuid4().hex[:8]}"
    path = cluster_sweep(tmp_path, name, lrs=(1e-3, 3e-3, 1e-2, 3e-2), steps=60)
    out = tmp_path / "results" / name
    job = submit(path, out, cluster, array=2)
    wait_done(job, out)
    trials = assert_exactly_once(path, out, cluster)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    logs = task_logs(out)
    assert logs.count("worker done") == 2, logs  # both array tasks ran a worker


@pytest.mark.parametrize("pack", [1, 4])
def test_a_requeued_task_resumes_its_trials_from_the_checkpoint(cluster, tmp_path, pack):
    name = f"requeue{pack}-{uuid.uuid4().hex[:8]}"
    lrs = (1e-3,) if pack == 1 else (1e-3, 3e-3, 1e-2, 3e-2)
    path = cluster_sweep(tmp_path, name, lrs=lrs, steps=400, extra=f"pack = {pack}\n")
    out = tmp_path / "results" / name
    job = submit(path, out, cluster, array=1)
    wait_for(lambda: any((out / "checkpoints").glob("*.pt")), "a checkpoint", job, out)
    requeue(job)
    wait_done(job, out)

    assert (out / "runs.parquet").exists(), task_logs(out)
    trials = assert_exactly_once(path, out, cluster)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == len(lrs) and all(t.user_attrs["resumed_from_step"] > 0 for t in done), task_logs(out)
    assert "DUE TO JOB REQUEUE" in task_logs(out)
    assert {t.user_attrs.get("pack_size", 1) for t in done} == {pack}
    pd.testing.assert_frame_equal(recorded_curves(out), uninterrupted_curves(done))
