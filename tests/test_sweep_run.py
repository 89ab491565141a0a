"""Running sweeps: local workers, crashes, concurrency on the journal file and on PostgreSQL.

Every test drives the real ``stabench`` command in subprocesses on tiny sweeps (``nano``,
V = 256, tens of steps) and then reads what a user would read: ``runs.parquet``, the Optuna
study, ``stabench status`` and the worker logs. The guarantees under test:

- every grid point ends up exactly once in ``runs.parquet`` and as exactly one complete trial;
- a point is never trained by two workers at the same time (attempts of one key never overlap);
- a worker killed with SIGKILL leaves its trial to be retried, resuming from its checkpoint.

PostgreSQL tests read the server URL from ``STABENCH_TEST_POSTGRES_URL`` (``source tests/postgres.sh``
starts one); without it they are skipped, unless ``STABENCH_REQUIRE_POSTGRES=1`` (CI) makes that a failure.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from optuna.trial import TrialState

from bench.sweep.grid import expand
from bench.sweep.spec import load_spec
from bench.sweep.storage import open_storage

STABENCH = str(Path(sys.executable).parent / "stabench")
if not Path(STABENCH).exists():  # pragma: no cover - an unusual installation
    STABENCH = "stabench"
TIMEOUT_S = 300  # generous: other CPU-heavy jobs may share the machine


def sweep_file(tmp_path: Path, name: str, *, lrs=(1e-3, 1e-2), stabilizers: str = "baseline = {}\nzloss.lam = [1e-4]",
               steps: int = 20, extra: str = "") -> Path:
    """A tiny sweep: nano model, V = 256, ``steps`` steps, checkpoints every 10."""
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "{name}"
        [train]
        steps = {steps}
        warmup = 2
        batch_size = 4
        seq_len = 32
        vocab_size = 256
        eval_every = 10
        eval_batches = 1
        log_every = 10
        precision = "fp32"
        device = "cpu"
        [grid]
        models = ["nano"]
        lr = {list(lrs)}
        [stabilizers]
        """) + stabilizers + "\n[execution]\ncheckpoint_every = 10\nheartbeat_s = 1\n" + extra)
    return path


def stabench(*args: str, cwd: Path, timeout: float = TIMEOUT_S, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([STABENCH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start_worker(path: Path, out: Path, log: Path, storage: str | None = None) -> subprocess.Popen:
    args = [STABENCH, "worker", str(path), "--out", str(out), "--threads", "1"]
    if storage:
        args += ["--storage", storage]
    return subprocess.Popen(args, cwd=path.parent, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def study_trials(spec_path: Path, out: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    spec = load_spec(spec_path)
    return open_storage(storage, out, spec.execution).load(spec.name).get_trials()


def assert_exactly_once(spec_path: Path, out: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    """One runs.parquet row and one complete trial per grid point; attempts of a point never overlap."""
    keys = {p.key for p in expand(load_spec(spec_path))}
    ids = pq.read_table(out / "runs.parquet").column("run_id").to_pylist()
    assert sorted(ids) == sorted(keys), "runs.parquet must hold every grid point exactly once"
    curves = pq.read_table(out / "curves.parquet").column("run_id").to_pylist()
    assert set(curves) == keys
    trials = study_trials(spec_path, out, storage)
    complete = Counter(t.user_attrs["key"] for t in trials if t.state == TrialState.COMPLETE)
    assert complete == Counter(keys), "exactly one complete trial per grid point"
    for key in keys:
        attempts = sorted((t for t in trials if t.user_attrs["key"] == key and t.datetime_start),
                          key=lambda t: t.datetime_start)
        for before, after in zip(attempts, attempts[1:]):
            assert before.datetime_complete <= after.datetime_start, f"two workers trained {key} at once"
    return trials


def training_starts(logs: str) -> Counter:
    """How often each key started (or resumed) training, from worker logs."""
    return Counter(re.findall(r"trial \d+ ([0-9a-f]{16}) .*: (?:start|resuming)", logs))


def test_local_sweep_with_two_workers_writes_one_row_per_grid_point(tmp_path):
    path = sweep_file(tmp_path, "local")
    out = tmp_path / "results" / "local"
    done = stabench("sweep", str(path), "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "4 trials, 0 already done, 4 newly queued; 2 worker(s), 1 thread(s) each" in done.stderr
    assert "4/4 done (0 diverged), 0 failed" in done.stderr
    trials = assert_exactly_once(path, out)
    runs = pq.read_table(out / "runs.parquet").to_pandas().set_index("run_id")
    for t in trials:  # the trial carries its resolved config and outcome for optuna-dashboard
        run = runs.loc[t.user_attrs["key"]]
        assert t.value == pytest.approx(run["final_loss"])
        assert t.user_attrs["config"]["lr"] == run["lr"] == t.params["lr"]
        assert t.user_attrs["diverged"] is False and t.user_attrs["step"] == 20 and t.user_attrs["reason"] == ""
        assert run["sweep"] == "local"
        assert sorted(t.intermediate_values) == [10, 20]
    logs = "".join(p.read_text() for p in (out / "trials").glob("worker-*.log"))
    assert sum(training_starts(logs).values()) == 4
    assert not list((out / "checkpoints").glob("*.pt"))  # finished runs leave no checkpoint
    # the sweep file and its hash travel with the results (provenance for figures and leaderboard)
    assert (out / "sweep.toml").read_bytes() == path.read_bytes()
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["name"] == "local" and meta["sweep_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()

    again = stabench("sweep", str(path), "--workers", "2", cwd=tmp_path)  # re-running skips finished trials
    assert again.returncode == 0, again.stderr
    assert "4 trials, 4 already done, 0 newly queued" in again.stderr
    assert len(study_trials(path, out)) == 4

    status = stabench("status", str(out), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert re.search(r"COMPLETE\s*│\s*4\s*│\s*0 diverged", status.stdout), status.stdout
    assert "4 of 4 trial keys recorded" in status.stdout


def test_a_failing_trial_is_listed_with_its_error(tmp_path):
    (tmp_path / "exploding.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from bench.stabilizers import Stabilizer

        calls = [0]

        @dataclass(frozen=True)
        class Exploding(Stabilizer):
            name = "exploding"  # passes the one-call preflight of plug-ins, then fails in training

            def loss_term(self, inputs):
                calls[0] += 1
                if calls[0] > 1:
                    raise RuntimeError("exploded on purpose")
                return None
        """))
    path = sweep_file(tmp_path, "failing", lrs=(1e-2,), stabilizers='baseline = {}\n"exploding.py:Exploding" = {}')
    out = tmp_path / "results" / "failing"
    done = stabench("worker", str(path), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED RuntimeError: exploded on purpose" in done.stdout
    assert len(pq.read_table(out / "runs.parquet")) == 1  # the baseline
    status = stabench("status", str(path), cwd=tmp_path)
    assert re.search(r"FAIL\s*│\s*1\s*│\s*0 retried", status.stdout), status.stdout
    assert re.search(r"failures.*exploding\.py:Exploding lr=0\.01 .*RuntimeError: exploded on purpose.*final",
                     status.stdout, re.S), status.stdout
    full = stabench("status", str(path), "--full", cwd=tmp_path)
    assert "loss_term" in full.stdout  # the traceback


def test_sigkilled_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path):
    path = sweep_file(tmp_path, "killed", lrs=(1e-3, 1e-2, 3e-2), steps=400)
    out = tmp_path / "results" / "killed"
    first = start_worker(path, out, tmp_path / "first.log")
    deadline = time.monotonic() + TIMEOUT_S
    while not list((out / "checkpoints").glob("*.pt")):
        assert first.poll() is None, "finished before it checkpointed: " + (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # mid-trial: between two checkpoints, lease held
    first.wait()
    import torch
    (ckpt,) = (out / "checkpoints").glob("*.pt")
    killed_key, killed_step = ckpt.stem, torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_step < 400
    (running,) = [t for t in study_trials(path, out) if t.state == TrialState.RUNNING]
    assert running.user_attrs["key"] == killed_key

    second = stabench("worker", str(path), "--out", str(out), "--threads", "1", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"trial {running.number} ({killed_key}): worker" in second.stdout
    assert "is no longer running; retrying as trial" in second.stdout
    assert f"{killed_key} nano baseline lr=0.001 seed=1: resuming from checkpoint step {killed_step}" in second.stdout

    trials = assert_exactly_once(path, out)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [running.number]
    (retry,) = [t for t in trials if t.system_attrs.get("retry_history") == [running.number]]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["key"] == killed_key
    assert retry.user_attrs["resumed_from_step"] == killed_step
    others = [t for t in trials if t.state == TrialState.COMPLETE and t.number != retry.number]
    assert all(t.user_attrs["resumed_from_step"] == 0 for t in others)
    logs = (tmp_path / "first.log").read_text() + second.stdout
    assert training_starts(logs) == Counter({killed_key: 2, **{t.user_attrs["key"]: 1 for t in others}})
    assert not list((out / "checkpoints").glob("*.pt"))


def _postgres_url() -> str:
    url = os.environ.get("STABENCH_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("STABENCH_REQUIRE_POSTGRES") == "1":
            pytest.fail("STABENCH_REQUIRE_POSTGRES=1 but STABENCH_TEST_POSTGRES_URL is not set "
                        "(start a server with `source tests/postgres.sh`)")
        pytest.skip("no PostgreSQL server: set STABENCH_TEST_POSTGRES_URL (`source tests/postgres.sh` starts one)")
    return url


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_four_concurrent_workers_train_each_point_exactly_once(tmp_path, kind):
    storage = _postgres_url() if kind == "postgresql" else None
    name = f"four-{kind}-{uuid.uuid4().hex[:8]}"  # a fresh study on a shared server
    path = sweep_file(tmp_path, name, lrs=(1e-3, 3e-3, 1e-2, 3e-2), stabilizers="baseline = {}\nsoftcap.cap = [30.0]")
    out = tmp_path / "results" / name
    workers = [start_worker(path, out, tmp_path / f"w{i}.log", storage) for i in range(4)]  # all queue at once
    for w in workers:
        assert w.wait(timeout=TIMEOUT_S) == 0
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(4))
    assert "database is locked" not in logs and "Traceback" not in logs, logs
    trials = assert_exactly_once(path, out, storage)
    assert len(trials) == 8, "the grid was queued once although four workers queued it concurrently"
    assert training_starts(logs) == Counter({t.user_attrs["key"]: 1 for t in trials})
    if storage:  # the database password is never printed nor stored with the results
        password = re.match(r"postgresql://[^:]+:([^@]+)@", storage).group(1)
        status = stabench("status", str(path), "--storage", storage, cwd=tmp_path)
        assert status.returncode == 0 and "COMPLETE" in status.stdout, status.stderr
        assert password not in logs + status.stdout + status.stderr
        assert "***@" in status.stdout
        for f in out.rglob("*"):
            assert not f.is_file() or password.encode() not in f.read_bytes(), f


def test_search_mode_asks_tpe_for_learning_rates(tmp_path):
    path = sweep_file(tmp_path, "search", stabilizers="baseline = {}\nmucentering = {}",
                      extra="[search]\ntrials = 3\nlr_min = 1e-4\nlr_max = 1e-1\n")
    path.write_text('mode = "search"\n' + path.read_text().replace("lr = [0.001, 0.01]\n", ""))
    out = tmp_path / "results" / "search"
    done = stabench("worker", str(path), "--threads", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    spec = load_spec(path)
    storage = open_storage(None, out, spec.execution)
    names = sorted(n for n in storage.study_names() if n.startswith("search/"))
    assert names == ["search/nano-baseline-untied-s1", "search/nano-mucentering-untied-s1"]
    for name in names:
        trials = storage.load(name).get_trials()
        assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
        lrs = [t.params["lr"] for t in trials]
        assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-1 for lr in lrs)
    assert len(pq.read_table(out / "runs.parquet")) == 6


def test_sixteen_workers_on_one_postgresql_train_each_point_exactly_once(tmp_path):
    """Many workers on one database (README "Running on a cluster"): 16 processes on a grid of 32 tiny
    trials, all queueing at once, each point trained once, no connection or lock errors."""
    storage = _postgres_url()
    name = f"sixteen-{uuid.uuid4().hex[:8]}"
    lrs = tuple(1e-3 * (1 + i / 4) for i in range(16))
    path = sweep_file(tmp_path, name, lrs=lrs, stabilizers="baseline = {}\nzloss.lam = [1e-4]", steps=10)
    out = tmp_path / "results" / name
    workers = [start_worker(path, out, tmp_path / f"w{i}.log", storage) for i in range(16)]
    for w in workers:
        assert w.wait(timeout=TIMEOUT_S * 2) == 0
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(16))
    assert "Traceback" not in logs and "OperationalError" not in logs and "FAILED" not in logs, logs
    trials = assert_exactly_once(path, out, storage)
    assert len(trials) == 32
    assert training_starts(logs) == Counter({t.user_attrs["key"]: 1 for t in trials})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_through_the_grpc_storage_proxy_train_each_point_exactly_once(tmp_path):
    """``stabench proxy`` serves the PostgreSQL storage over Optuna's gRPC proxy; workers given
    ``--storage grpc://HOST:PORT`` share it, and a killed worker's trial is retried through it."""
    import socket

    storage = _postgres_url()
    port = _free_port()
    proxy = subprocess.Popen([STABENCH, "proxy", "--storage", storage, "--port", str(port)], cwd=tmp_path,
                             stdout=open(tmp_path / "proxy.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proxy.poll() is None, (tmp_path / "proxy.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the proxy did not start listening"
                time.sleep(0.2)
        url = f"grpc://127.0.0.1:{port}"
        name = f"grpc-{uuid.uuid4().hex[:8]}"
        path = sweep_file(tmp_path, name, lrs=(1e-3, 3e-3, 1e-2, 3e-2), stabilizers="baseline = {}", steps=400)
        out = tmp_path / "results" / name
        first = start_worker(path, out, tmp_path / "first.log", url)
        deadline = time.monotonic() + TIMEOUT_S
        while not list((out / "checkpoints").glob("*.pt")):  # a trial is training and has checkpointed
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        workers = [start_worker(path, out, tmp_path / f"w{i}.log", url) for i in range(3)]
        codes = [w.wait(timeout=TIMEOUT_S) for w in workers]
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(3))
        assert codes == [0, 0, 0], logs + (tmp_path / "proxy.log").read_text()
        assert "Traceback" not in logs, logs
        assert logs.count("is no longer running; retrying as trial") == 1
        trials = assert_exactly_once(path, out, url)
        resumed = [t for t in trials if t.state == TrialState.COMPLETE and t.system_attrs.get("retry_history")]
        assert len(resumed) == 1 and resumed[0].user_attrs["resumed_from_step"] > 0
        assert "***@" in (tmp_path / "proxy.log").read_text()  # the proxy prints the database URL masked
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
