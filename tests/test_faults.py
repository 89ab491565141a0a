"""Faults (issue 16: nothing hangs, nothing is lost, nothing leaks): stale locks, full disks,
corrupt files, bad execution settings, kills, credentials in URLs.

No mocks: locks are planted as a killed worker leaves them, disks are really full (a 2 MB tmpfs,
mounted as root; skipped where mounting is not permitted), files are really corrupted, processes
are really killed. Commands run as subprocesses with a timeout, so a hang is a failure.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from optuna.trial import TrialState

from bench.sweep.spec import load_spec
from bench.sweep.storage import _OWNER_TAG, _pid_namespace, open_storage

TIMEOUT_S = 240  # generous: other CPU-heavy jobs may share the machine


def sweep_file(directory: Path, name: str, lrs=(1e-3,), extra: str = "") -> Path:
    """A tiny sweep: nano, V = 256, 10 steps, baseline only; one trial per learning rate."""
    path = directory / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "{name}"
        [train]
        steps = 10
        warmup = 2
        batch_size = 4
        seq_len = 32
        vocab_size = 256
        eval_every = 10
        eval_batches = 1
        log_every = 5
        precision = "fp32"
        device = "cpu"
        [grid]
        models = ["nano"]
        lr = {list(lrs)}
        [stabilizers]
        baseline = {{}}
        """) + extra)
    return path


def stabench(*args: str, cwd: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("STABENCH_STORAGE", None)
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def trial_states(path: Path, out: Path) -> list[TrialState]:
    spec = load_spec(path)
    storage = open_storage(None, out, spec.execution)
    return [t.state for t in storage.load(spec.name).get_trials(deepcopy=False)]


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` up to the last byte, then free ``leave`` bytes; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"x" * 4096):
                pass
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


# -- 1. a stale journal lock ------------------------------------------------------------------
def test_a_stale_journal_lock_left_by_a_killed_worker_does_not_hang_later_commands(tmp_path):
    """The lock a worker killed mid-append leaves under the default relative results directory: a
    symlink whose relative target dangles. Optuna's stale-lock release stats through it and never
    fires; the sweep must release it (after its grace period) and finish."""
    path = sweep_file(tmp_path, "f0")
    (tmp_path / "results" / "f0").mkdir(parents=True)
    lock = tmp_path / "results" / "f0" / "journal.log.lock"
    os.symlink("results/f0/journal.log", lock)  # exactly what Optuna creates for a relative path
    done = stabench("sweep", "f0.toml", "--workers", "1", cwd=tmp_path, timeout=150)
    assert done.returncode == 0, done.stderr
    assert "releasing the stale journal lock" in done.stderr
    assert trial_states(path, tmp_path / "results" / "f0") == [TrialState.COMPLETE]
    assert not os.path.lexists(lock)

    # a lock naming a holder that is dead on this host is released at once (no grace period)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.symlink(str(tmp_path / "results/f0/journal.log") + _OWNER_TAG
               + json.dumps([socket.gethostname(), _pid_namespace(), int(dead.stdout)]), lock)
    done = stabench("sweep", "f0.toml", cwd=tmp_path, timeout=150)  # appends (the study is opened again)
    assert done.returncode == 0, done.stderr
    assert "is no longer running" in done.stderr  # released by the dead-holder rule, not the grace period
    assert "unchanged for" not in done.stderr


# -- 2. a full disk, a torn or damaged journal ------------------------------------------------
def test_a_full_disk_is_one_clear_error_and_loses_nothing_recorded(tmp_path, small_disk):
    path = sweep_file(tmp_path, "full", lrs=(1e-3, 2e-3))
    out = small_disk / "r"
    done = stabench("sweep", str(path), "--workers", "1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    journal = out / "journal.log"

    # a journal append that runs out of space mid-record leaves no half-written record behind
    storage = open_storage(None, out, load_spec(path).execution)
    trial_id = storage.load("full").get_trials()[0]._trial_id
    filler = fill(small_disk, leave=16 * 1024)
    before = journal.read_bytes()
    with pytest.raises(OSError) as raised:
        storage.optuna.set_trial_user_attr(trial_id, "big", "x" * 200_000)
    assert raised.value.errno == errno.ENOSPC
    assert journal.read_bytes() == before

    # the sweep grows on the full disk: one line, exit 2, no traceback
    path = sweep_file(tmp_path, "full", lrs=(1e-3, 2e-3, 3e-3, 4e-3))
    done = stabench("sweep", str(path), "--workers", "1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("stabench sweep: error: ") and "No space left on device" in last
    assert journal.read_bytes().startswith(before)  # nothing recorded is lost
    assert journal.read_bytes().endswith(b"\n")

    # space freed: every command reads the journal, and the same command finishes the sweep
    filler.unlink()
    assert stabench("status", str(out), cwd=tmp_path).returncode == 0
    done = stabench("sweep", str(path), "--workers", "1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(pq.read_table(out / "runs.parquet")) == 4
    assert trial_states(path, out).count(TrialState.COMPLETE) == 4


def test_a_torn_last_journal_record_is_set_aside_and_a_damaged_line_is_one_error(tmp_path):
    path = sweep_file(tmp_path, "f0")
    assert stabench("sweep", "f0.toml", "--workers", "1", cwd=tmp_path).returncode == 0
    journal = tmp_path / "results" / "f0" / "journal.log"
    good = journal.read_bytes()

    torn = b'{"op_code":8,"worker_id":"w","trial_id":0,"user_at'  # a worker killed mid-append
    journal.write_bytes(good + torn)
    done = stabench("sweep", "f0.toml", cwd=tmp_path)  # opens and appends after it
    assert done.returncode == 0, done.stderr
    assert "last record was incomplete" in done.stderr
    assert (tmp_path / "results" / "f0" / "journal.log.torn").read_bytes() == torn + b"\n"
    done = stabench("status", "results/f0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert trial_states(path, tmp_path / "results" / "f0") == [TrialState.COMPLETE]

    journal.write_bytes(good + b"\x00\x00\x00garbage\n")  # a complete but garbage last line
    assert stabench("status", "results/f0", cwd=tmp_path).returncode == 0
    assert journal.read_bytes() == good

    lines = good.splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3] + [b"garbage\n"] + lines[3:]))  # damaged elsewhere
    done = stabench("status", "results/f0", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "line 4 is not a valid record" in line and f"sed -i '4d' {journal}" in line


# -- 4. damaged or missing merged records, a failing merge --------------------------------------
def test_merged_records_are_rebuilt_from_their_parts_and_a_failed_merge_fails_no_trial(tmp_path):
    from bench import records

    path = sweep_file(tmp_path, "rec", lrs=(1e-3, 2e-3))
    out = tmp_path / "results" / "rec"
    assert stabench("sweep", "rec.toml", "--workers", "1", cwd=tmp_path).returncode == 0
    runs = out / "runs.parquet"

    runs.write_bytes(b"PAR1 this is not a parquet file")  # a damaged merged file
    done = stabench("status", "results/rec", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 of 2 trial keys recorded" in done.stdout
    assert len(records.read_runs(out)) == 2  # rebuilt from the parts
    assert (out / "runs.parquet.corrupt").exists()

    runs.unlink()  # a deleted merged file
    assert len(records.read_runs(out)) == 2 and runs.exists()

    part = sorted((out / "parts" / "curves").glob("*.parquet"))[0]
    part.write_bytes(b"garbage")  # a damaged part: set aside, its rows stay in the merged file
    sweep_file(tmp_path, "rec", lrs=(1e-3, 2e-3, 3e-3))
    done = stabench("sweep", "rec.toml", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(pq.read_table(runs)) == 3 and len(records.read_curves(out)) == 3 * 2
    assert part.with_name(part.name + ".corrupt").exists()

    (out / ".lock").unlink()
    (out / ".lock").mkdir()  # the merge cannot take its lock: it fails after training
    sweep_file(tmp_path, "rec", lrs=(1e-3, 2e-3, 3e-3, 4e-3))
    done = stabench("sweep", "rec.toml", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert trial_states(path, out).count(TrialState.COMPLETE) == 4  # the trial is complete all the same
    assert len(pq.read_table(runs)) == 3  # not merged yet ...
    (out / ".lock").rmdir()
    assert len(records.read_runs(out)) == 4  # ... until the next read rebuilds it


# -- 6. temporaries of killed writers -------------------------------------------------------------
def test_temporaries_of_killed_writers_are_removed_at_the_next_merge(tmp_path):
    from bench import records

    out = tmp_path / "out"
    (out / "parts" / "runs").mkdir(parents=True)
    code = ("import os, signal, sys; from pathlib import Path; from bench import records\n"
            "for p in (Path(sys.argv[1]) / 'runs.parquet', Path(sys.argv[1]) / 'parts/runs/x.parquet'):\n"
            "    records._tmp_path(p).write_bytes(b'PAR1 half written')\n"
            "os.kill(os.getpid(), signal.SIGKILL)  # killed mid-merge\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code, str(out)], env=env, timeout=60)
    assert done.returncode == -9
    left = [p for p in out.rglob(".*.tmp")]
    assert len(left) == 2
    mine = records._tmp_path(out / "curves.parquet")  # a live writer's (this process): kept
    mine.write_bytes(b"in progress")
    records.merge_parts(out)
    assert [p for p in out.rglob(".*.tmp")] == [mine]


# -- 5. lease settings that cannot work ---------------------------------------------------------
@pytest.mark.parametrize("execution,key,says", [
    ("heartbeat_s = 120\nlease_s = 60", "execution.heartbeat_s", "lease_s = 60"),
    ("heartbeat_s = 60\nlease_s = 60", "execution.heartbeat_s", "lease_s = 60"),
    ("lease_s = inf", "execution.lease_s", "finite"),
    ("heartbeat_s = 1e400", "execution.heartbeat_s", "finite"),
])
def test_a_heartbeat_not_shorter_than_the_lease_or_an_infinite_period_is_refused(tmp_path, execution, key, says):
    sweep_file(tmp_path, "lease", extra=f"[execution]\n{execution}\n")
    done = stabench("sweep", "lease.toml", cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("stabench sweep: error: ") and key in line and says in line
    if "lease_s = 60" in says:
        assert "execution.lease_s" in line
    assert not (tmp_path / "results").exists()  # nothing written


# -- 12. credentials in storage URLs that do not parse --------------------------------------------
@pytest.mark.parametrize("url,masked", [
    ("postgresql://alice:Sekr1tPW@db-host:notaport/db", "postgresql://alice:***@db-host:notaport/db"),
    ("postgresql://alice:p@Sekr1tPW@db-host/db", "postgresql://alice:***@db-host/db"),  # unencoded '@'
    ("https://u:Sekr1tPW@example.org/x", "https://u:***@example.org/x"),
])
def test_a_password_in_a_url_that_does_not_parse_is_never_printed_nor_scripted(tmp_path, url, masked):
    from bench.sweep.storage import mask_url
    assert mask_url(url) == masked
    sweep_file(tmp_path, "sec")
    done = stabench("launch", "slurm", "--sweep", "sec.toml", "--storage", url, "--array", "2", "--out", "job.sh",
                    cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    script = (tmp_path / "job.sh").read_text()
    assert "Sekr1tPW" not in script + done.stdout + done.stderr
    assert masked in done.stdout and f"export STABENCH_STORAGE={masked}" in script
    assert "STABENCH_STORAGE:-" not in script  # the URL itself is never the script's default
    for command in (["status", "sec.toml", "--storage", url], ["sweep", "sec.toml", "--storage", url],
                    ["worker", "--sweep", "sec.toml", "--storage", url]):
        done = stabench(*command, cwd=tmp_path, timeout=60)
        assert "Sekr1tPW" not in done.stdout + done.stderr, command
        assert done.returncode != 0
