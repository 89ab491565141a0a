"""Optuna storage for sweeps: where trials live, how a dead worker is noticed, and URL hygiene.

Two kinds of storage, chosen by ``--storage``:

- **journal file** (default ``results/<sweep>/journal.log``; also ``journal:PATH`` or any path):
  Optuna's JournalStorage, no server, safe for parallel processes and on NFS. Optuna's
  heartbeats do not cover it, so liveness is a **lease file** per running trial
  (``<journal>.leases/<trial_id>.json``) renewed every ``heartbeat_s`` seconds by the worker.
  A trial is presumed dead when its lease is older than ``lease_s`` seconds, or at once when
  the lease names a process on this host (same PID namespace) that no longer exists.
- **a database URL** (``postgresql://…``, ``mysql+pymysql://…``; SQLite works but locks under
  parallel writers): Optuna's RDBStorage with its own heartbeat (``heartbeat_s``) and grace
  period (``lease_s``).

Either way a dead worker's trial is failed and re-queued, with Optuna's retry bookkeeping
(``RetryHeartbeatStaleTrialCallback``, formerly ``RetryFailedTrialCallback``), at most
``max_retries`` times. Passwords in URLs are never printed: use ``mask_url``/``redact``.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import hashlib
import inspect
import json
import os
import random
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..errors import StorageError
from .grid import DEFINITION_ATTRS
from .spec import ExecutionSpec

JOURNAL_NAME = "journal.log"
STORAGE_ENV = "STABENCH_STORAGE"  # default --storage (keeps a password off command lines)

try:  # Optuna >= 4.9
    from optuna.storages import RetryHeartbeatStaleTrialCallback as _OptunaRetry
except ImportError:  # pragma: no cover - older Optuna
    from optuna.storages import RetryFailedTrialCallback as _OptunaRetry


# -- URLs ------------------------------------------------------------------------------
def is_database_url(url: str) -> bool:
    return "://" in url


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print or store)."""
    if not is_database_url(url):
        return url
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: hide everything between '://' and '@'
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else url


def url_password(url: str) -> str | None:
    if not is_database_url(url):
        return None
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).password or None
    except Exception:
        return None


def redact(text: str, url: str | None) -> str:
    """``text`` with the URL's password (raw and URL-encoded) replaced by ``***``."""
    password = url_password(url) if url else None
    if not password:
        return text
    from urllib.parse import quote, quote_plus
    for form in sorted({password, quote(password, safe=""), quote_plus(password)}, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def _with_driver(url: str) -> str:
    """``postgresql://`` with whichever driver is installed: SQLAlchemy 2.1 defaults to psycopg 3,
    older versions to psycopg2 (the ``postgres`` extra installs psycopg2-binary)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module) is not None:
                return f"postgresql+{driver}{sep}{rest}"
    return url


def journal_path(url: str) -> Path:
    return Path(url.removeprefix("journal:"))


# -- leases (journal storage) ----------------------------------------------------------------
def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class Lease:
    """Proof that a worker is still running a trial; renewed every heartbeat."""

    trial_id: int
    number: int
    key: str
    worker: str  # host:pid
    host: str
    pid: int
    pid_namespace: str
    renewed_at: float  # Unix time (s) of the last renewal, the holder's clock
    lease_s: float  # the holder's promise: it renews well within this many seconds

    def expired(self, now: float) -> str | None:
        """Why the holder is presumed dead, or None if the lease is alive."""
        if (self.host == socket.gethostname() and self.pid_namespace == _pid_namespace()
                and not _pid_alive(self.pid)):
            return f"worker {self.worker} is no longer running"
        age = now - self.renewed_at
        if age > self.lease_s:
            return f"lease expired: worker {self.worker} last renewed it {age:.0f} s ago (limit {self.lease_s:g} s)"
        return None


class RetryStaleTrial(_OptunaRetry):
    """Optuna's retry of a stale trial, keeping only the attributes that define it (not the
    failed attempt's worker, error or progress)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in DEFINITION_ATTRS}
        super().__call__(study, trial)


def _retry_callback(max_retries: int) -> RetryStaleTrial:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        return RetryStaleTrial(max_retry=max_retries)


# -- the storage ---------------------------------------------------------------------------
class SweepStorage:
    """An opened Optuna storage plus the sweep engine's liveness rule and enqueue lock."""

    def __init__(self, url: str, execution: ExecutionSpec):
        self.url, self.execution = url, execution
        self.display = mask_url(url)
        self.optuna = self._open()

    # subclass hooks
    def _open(self) -> optuna.storages.BaseStorage:
        raise NotImplementedError

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Exclusive across all workers of this storage (used while queueing trials)."""
        yield

    def hold(self, study: optuna.Study, trial_id: int, number: int, key: str) -> "Holder":
        """Keep a claimed trial alive (a context manager) while this worker runs it."""
        raise NotImplementedError

    def reap(self, study: optuna.Study) -> list[str]:
        """Fail the study's trials whose worker died and queue their retries; returns messages."""
        raise NotImplementedError

    # common
    def study(self, name: str) -> optuna.Study:
        """Load the study ``name``, creating it (minimizing the final loss) if needed."""
        study = optuna.create_study(storage=self.optuna, study_name=name, direction="minimize",
                                    load_if_exists=True)
        if study.metric_names is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning
                study.set_metric_names(["final_loss"])
        return study

    def study_names(self) -> list[str]:
        return [s.study_name for s in self.optuna.get_all_studies()]

    def load(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self.optuna)

    def retry(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _retry_callback(self.execution.max_retries)(study, trial)


class Holder:
    """Renews liveness in a daemon thread; ``lost`` turns true if another worker failed the trial."""

    def __init__(self, renew: Callable[[], None], still_ours: Callable[[], bool], period_s: float,
                 release: Callable[[], None] = lambda: None):
        self._renew, self._still_ours, self._period, self._release = renew, still_ours, period_s, release
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="stabench-lease")
        self.lost = False

    def __enter__(self) -> "Holder":
        self._renew()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._release()

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._renew()
                if not self._still_ours():
                    self.lost = True
            except Exception:  # a storage hiccup must not kill the renewals
                pass


class JournalSweepStorage(SweepStorage):
    """Journal file + lease files."""

    @property
    def path(self) -> Path:
        return journal_path(self.url)

    @property
    def lease_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".leases")

    def _open(self) -> optuna.storages.BaseStorage:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(self.path)))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".enqueue.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _lease_file(self, trial_id: int) -> Path:
        return self.lease_dir / f"{trial_id}.json"

    def read_lease(self, trial_id: int) -> Lease | None:
        try:
            return Lease(**json.loads(self._lease_file(trial_id).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def hold(self, study: optuna.Study, trial_id: int, number: int, key: str) -> Holder:
        host, pid = socket.gethostname(), os.getpid()
        lease = Lease(trial_id, number, key, f"{host}:{pid}", host, pid, _pid_namespace(), 0.0,
                      self.execution.lease_s)
        path = self._lease_file(trial_id)

        def renew() -> None:
            lease.renewed_at = time.time()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{pid}.tmp")
            tmp.write_text(json.dumps(asdict(lease)))
            os.replace(tmp, path)

        def still_ours() -> bool:
            return self.optuna.get_trial(trial_id).state == TrialState.RUNNING

        return Holder(renew, still_ours, self.execution.heartbeat_s, lambda: path.unlink(missing_ok=True))

    def reap(self, study: optuna.Study) -> list[str]:
        messages, now = [], time.time()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            lease = self.read_lease(t._trial_id)
            if lease is not None:
                reason = lease.expired(now)
            else:  # claimed but no lease yet: give the claimer lease_s from the claim
                started = t.datetime_start.timestamp() if t.datetime_start else now
                age = now - started
                reason = (f"no lease {age:.0f} s after the trial started (limit {self.execution.lease_s:g} s)"
                          if age > self.execution.lease_s else None)
            if reason is None:
                continue
            try:
                self.optuna.set_trial_user_attr(t._trial_id, "error", reason)
                if not self.optuna.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:  # finished meanwhile, or another worker reaped it
                continue
            self._lease_file(t._trial_id).unlink(missing_ok=True)
            failed = self.optuna.get_trial(t._trial_id)
            self.retry(study, failed)
            messages.append(f"trial {t.number} ({t.user_attrs.get('key')}): {reason}; " + _retry_note(study, t.number))
        return messages


class DatabaseSweepStorage(SweepStorage):
    """RDBStorage (PostgreSQL, MySQL, SQLite) with Optuna's heartbeat and stale-trial retry."""

    def _open(self) -> optuna.storages.BaseStorage:
        from optuna.storages import RDBStorage

        kw: dict[str, Any] = {"heartbeat_interval": max(1, round(self.execution.heartbeat_s)),
                              "grace_period": max(1, round(self.execution.lease_s))}
        params = inspect.signature(RDBStorage.__init__).parameters
        cb = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
        kw[cb] = _retry_callback(self.execution.max_retries)
        engine = {"pool_pre_ping": True} if not self.url.startswith("sqlite") else {}
        from sqlalchemy.exc import IntegrityError, ProgrammingError

        for attempt in range(6):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ExperimentalWarning (heartbeat_interval)
                    return RDBStorage(_with_driver(self.url), engine_kwargs=engine, **kw)
            except (IntegrityError, ProgrammingError) as e:
                # workers starting together on a fresh database race to create Optuna's schema
                # ("already exists"): the schema is there now, so open it again
                if attempt == 5 or "already exists" not in str(e):
                    error = e
                    break
                time.sleep(0.2 + random.random())
            except Exception as e:
                error = e
                break
        raise StorageError(f"cannot open storage {self.display}: {redact(str(error), self.url)}") from None

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        from sqlalchemy import text

        dialect = self.optuna.engine.dialect.name
        ident = int.from_bytes(hashlib.sha256(f"stabench:{name}".encode()).digest()[:8], "big", signed=True)
        if dialect == "postgresql":
            acquire, release = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
        elif dialect in ("mysql", "mariadb"):
            acquire, release = "SELECT GET_LOCK(:k, 3600)", "SELECT RELEASE_LOCK(:k)"
            ident = f"stabench:{ident}"
        else:  # SQLite serializes writers itself; the retry rules cover the rest
            yield
            return
        with self.optuna.engine.connect() as conn:
            conn.execute(text(acquire), {"k": ident})
            try:
                yield
            finally:
                conn.execute(text(release), {"k": ident})

    def hold(self, study: optuna.Study, trial_id: int, number: int, key: str) -> Holder:
        def renew() -> None:
            self.optuna.record_heartbeat(trial_id)

        def still_ours() -> bool:
            return self.optuna.get_trial(trial_id).state == TrialState.RUNNING

        return Holder(renew, still_ours, self.execution.heartbeat_s)

    def reap(self, study: optuna.Study) -> list[str]:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            optuna.storages.fail_stale_trials(study)
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number not in before
                  and "error" not in t.user_attrs]
        return [f"trial {t.number} ({t.user_attrs.get('key')}): heartbeat stale for more than "
                f"{self.execution.lease_s:g} s; " + _retry_note(study, t.number) for t in failed]


def _retry_note(study: optuna.Study, number: int) -> str:
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if number in t.system_attrs.get("retry_history", []):
            return f"retrying as trial {t.number}"
    return "retries exhausted"


def default_storage(out: Path) -> str:
    return str(out / JOURNAL_NAME)


def open_storage(url: str | None, out: Path, execution: ExecutionSpec) -> SweepStorage:
    """Open ``url`` (None: $STABENCH_STORAGE, else the journal file in ``out``)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = url or os.environ.get(STORAGE_ENV) or default_storage(out)
    if is_database_url(url):
        return DatabaseSweepStorage(url, execution)
    path = journal_path(url)
    if path.is_dir():
        raise StorageError(f"storage {url} is a directory; give the journal file, e.g. {path / JOURNAL_NAME}")
    try:
        return JournalSweepStorage(url, execution)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.ENOENT, errno.EROFS):
            raise StorageError(f"cannot open journal {url}: {e.strerror}") from None
        raise
