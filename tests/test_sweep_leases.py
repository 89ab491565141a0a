"""Liveness on the journal file: leases, reaping dead workers' trials, the retry limit; URL masking.

In-process and without training: trials are claimed and leases written as workers would.
"""
from __future__ import annotations

import json
import os
import socket
import textwrap
import time

import pytest
from optuna.trial import TrialState

from bench.sweep.spec import load_spec
from bench.sweep.storage import Lease, _pid_namespace, mask_url, open_storage, redact
from bench.sweep.trials import TrialQueue
from services import postgres_url


def make_queue(tmp_path, max_retries: int = 2, lease_s: float = 60.0, storage: str | None = None,
               name: str = "leases") -> TrialQueue:
    path = tmp_path / "leases.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "{name}"
        [train]
        steps = 20
        warmup = 2
        vocab_size = 256
        [grid]
        models = ["nano"]
        lr = [1e-3, 1e-2]
        [stabilizers]
        baseline = {{}}
        [execution]
        max_retries = {max_retries}
        lease_s = {lease_s}
        heartbeat_s = 0.1
        """))
    spec = load_spec(path)
    out = tmp_path / "out"
    queue = TrialQueue(spec, open_storage(storage, out, spec.execution), out)
    assert queue.enqueue() == 2
    return queue


def lease_of(queue: TrialQueue, claim, **changes) -> Lease:
    lease = Lease(claim.trial_id, claim.number, claim.key, "elsewhere:4242", "elsewhere", 4242, "", time.time(), 60.0)
    for k, v in changes.items():
        setattr(lease, k, v)
    queue.storage.lease_dir.mkdir(parents=True, exist_ok=True)
    (queue.storage.lease_dir / f"{claim.trial_id}.json").write_text(json.dumps(lease.__dict__))
    return lease


def test_a_lease_is_alive_while_renewed_and_its_process_exists():
    now, host, ns = time.time(), socket.gethostname(), _pid_namespace()
    assert Lease(0, 0, "k", "me", host, os.getpid(), ns, now, 60).expired(now) is None
    assert Lease(0, 0, "k", "far", "elsewhere", 1, "", now - 30, 60).expired(now) is None
    stale = Lease(0, 0, "k", "far", "elsewhere", 1, "", now - 61, 60).expired(now)
    assert stale.startswith("lease expired: worker far last renewed it 61 s ago (limit 60 s)")
    dead_pid = 2 ** 22 + 1  # above the kernel's pid_max default: never a live process
    assert "no longer running" in Lease(0, 0, "k", "gone", host, dead_pid, ns, now, 60).expired(now)


def test_a_trial_whose_lease_expired_is_failed_and_retried_up_to_the_limit(tmp_path):
    queue = make_queue(tmp_path, max_retries=1)
    claim = queue.claim()
    lease_of(queue, claim, renewed_at=time.time() - 10)
    assert queue.reap() == []  # renewed 10 s ago, lease 60 s: alive
    lease_of(queue, claim, renewed_at=time.time() - 120)
    (message,) = queue.reap()
    assert f"trial {claim.number} ({claim.key}): lease expired: worker elsewhere:4242" in message
    assert message.endswith("retrying as trial 2")
    assert queue.reap() == []  # reaped once only
    waiting = queue.trials()[2]
    assert waiting.state == TrialState.WAITING and waiting.system_attrs["retry_history"] == [0]
    assert waiting.user_attrs["key"] == claim.key and "error" not in waiting.user_attrs  # not the attempt's

    retry = queue.claim()  # retries come first
    assert retry.number == 2 and retry.key == claim.key
    lease_of(queue, retry, renewed_at=time.time() - 120)
    (message,) = queue.reap()
    assert message.endswith("retries exhausted")

    trials = queue.trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING, TrialState.FAIL]
    p = queue.progress()
    assert (p.total, p.failed, p.queued, p.running) == (2, 1, 1, 0)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_claimed_retry_is_not_mistaken_for_its_dead_predecessor(tmp_path, kind):
    """Optuna copies a failed trial's system attributes into its retry; the dead worker's holder
    must not travel with them, or the retry, claimed and not yet held by its new worker, is reaped
    again (two workers, one crashed with UpdateFinishedTrialError: seen in CI through the gRPC proxy)."""
    from bench.sweep.storage import HOLDER_ATTR, PROGRESS_ATTR

    url = postgres_url() if kind == "postgresql" else f"sqlite:///{tmp_path / 'db.sqlite'}"
    queue = make_queue(tmp_path, storage=url, name=f"retry-holder-{time.monotonic_ns() % 10**9}")
    st = queue.storage.optuna
    claim = queue.claim()
    dead_pid = 2 ** 22 + 1  # above the kernel's pid_max default: never a live process
    st.set_trial_system_attr(claim.trial_id, HOLDER_ATTR,
                             {"host": socket.gethostname(), "pid": dead_pid, "pid_namespace": _pid_namespace()})
    st.set_trial_system_attr(claim.trial_id, PROGRESS_ATTR, {"step": 5, "steps": 20, "renewed_at": time.time()})
    (message,) = queue.reap()
    assert "is no longer running; retrying as trial 2" in message
    retry = queue.claim()
    assert retry.number == 2 and retry.key == claim.key
    attrs = st.get_trial(retry.trial_id).system_attrs
    assert HOLDER_ATTR not in attrs and PROGRESS_ATTR not in attrs and attrs["retry_history"] == [claim.number]
    assert queue.reap() == []  # claimed a moment ago and not yet held: alive for lease_s from its start
    assert st.get_trial(retry.trial_id).state == TrialState.RUNNING


def test_a_held_trial_is_renewed_and_never_reaped(tmp_path):
    queue = make_queue(tmp_path, lease_s=0.5)
    claim = queue.claim()
    with queue.storage.hold(claim.study, claim.trial_id, claim.number, claim.key) as holder:
        first = queue.storage.read_lease(claim.trial_id).renewed_at
        time.sleep(1.5)  # three lease periods
        assert queue.storage.read_lease(claim.trial_id).renewed_at > first
        assert queue.reap() == []
        assert not holder.lost
    assert queue.storage.read_lease(claim.trial_id) is None  # released


def test_a_claim_without_a_lease_gets_lease_s_from_its_start(tmp_path):
    queue = make_queue(tmp_path, lease_s=0.5)
    claim = queue.claim()  # the worker died before writing its lease
    assert queue.reap() == []
    time.sleep(1.0)
    (message,) = queue.reap()
    assert f"trial {claim.number} ({claim.key}): no lease" in message


@pytest.mark.parametrize("url,masked,password", [
    ("postgresql://bench:s3cr%40t@db.example:5432/sweeps", "postgresql://bench:***@db.example:5432/sweeps", "s3cr@t"),
    ("mysql+pymysql://u:pw0rd@h/db", "mysql+pymysql://u:***@h/db", "pw0rd"),
    ("results/quick/journal.log", "results/quick/journal.log", None),
])
def test_urls_are_printed_without_their_password(url, masked, password):
    assert mask_url(url) == masked
    text = redact(f"could not connect to {url}: password {password} rejected", url)
    if password:
        assert password not in text and password.replace("@", "%40") not in text
