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

from ..records import pid_alive

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


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """``(scheme, userinfo, rest)`` of a URL with credentials, by structure alone (no parser: a
    URL that does not parse, or has an unencoded '@' in its password, still has them): the
    userinfo is everything between '://' and the last '@'. None if there is no '@'."""
    if not is_database_url(url):
        return None
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return (scheme, userinfo, host) if at else None


def mask_url(url: str) -> str:
    """The URL with its credentials masked (safe to print or store):
    ``postgresql://alice:***@db-host/db``; the user is kept, everything after it is not."""
    parts = _userinfo(url)
    if parts is None:
        return url
    scheme, userinfo, host = parts
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{host}" if colon else f"{scheme}://***@{host}"


def url_password(url: str) -> str | None:
    """The secret part of the URL's userinfo (after the user's ':'; the whole userinfo when it has
    no ':', e.g. a token), raw as written; None if there is none."""
    parts = _userinfo(url)
    if parts is None:
        return None
    user, colon, password = parts[1].partition(":")
    return (password if colon else user) or None


def redact(text: str, url: str | None) -> str:
    """``text`` with the URL (as the masked URL) and its password (raw, URL-decoded and URL-encoded)
    replaced by ``***``, and so are its pieces between URL delimiters. A password (piece) shorter than 4 characters is only masked inside the URL:
    replacing it everywhere would garble ordinary words."""
    if not url:
        return text
    text = text.replace(url, mask_url(url))
    password = url_password(url)
    if not password:
        return text
    from urllib.parse import quote, quote_plus, unquote
    import re
    forms = {password, unquote(password), quote(password, safe=""), quote_plus(password)}
    # a driver that splits the URL elsewhere (an unencoded '@' or ':') prints pieces of the password
    forms |= {piece for form in list(forms) for piece in re.split(r"[@:/?#]", form)}
    for form in sorted((f for f in forms if len(f) >= 4), key=len, reverse=True):
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


def _warn(message: str) -> None:
    """A warning on stderr (worker logs and the terminal), one line."""
    import sys
    print(f"stabench: warning: {message}", file=sys.stderr, flush=True)


# -- the journal file: a lock that a dead holder cannot keep, appends that cannot tear ----------
LOCK_GRACE_S = 30.0
"""A journal lock held this long without change is presumed stale and released (an append holds
it for one write and fsync); a lock whose holder is a dead process on this host is released at once."""
_OWNER_TAG = "#stabench-owner="


def _lock_owner() -> str:
    return _OWNER_TAG + json.dumps([socket.gethostname(), _pid_namespace(), os.getpid()])


def _dead_owner(link: str) -> str | None:
    """``host:pid`` of the lock's holder if that process is gone from this host, else None."""
    _, tag, owner = link.partition(_OWNER_TAG)
    if not tag:
        return None
    try:
        host, namespace, pid = json.loads(owner)
    except (ValueError, TypeError):
        return None
    if host == socket.gethostname() and namespace == _pid_namespace() and not pid_alive(int(pid)):
        return f"{host}:{pid}"
    return None


def _journal_lock_class():
    from optuna.storages.journal import JournalFileSymlinkLock

    class JournalLock(JournalFileSymlinkLock):
        """Optuna's symlink lock (compatible with plain Optuna processes on the same journal) that
        is never stuck: Optuna's stale-lock release stats through the link, so a link with a relative
        target (``results/x/journal.log``, resolved against the link's own directory) dangles and is
        never released. This lock looks at the link itself (``lstat``), releases it when unchanged
        for ``LOCK_GRACE_S``, and at once when its target names a holder that died on this host."""

        def __init__(self, filepath: str, grace_period: float = LOCK_GRACE_S):
            super().__init__(os.path.abspath(filepath), grace_period=None)
            self.grace_period = grace_period

        def acquire(self) -> bool:
            target = self._lock_target_file + _lock_owner()
            sleep_s, started = 0.001, time.monotonic()
            last_warning, seen, seen_at = started, None, started
            while True:
                try:
                    os.symlink(target, self._lock_file)
                    return True
                except FileExistsError:
                    pass
                try:
                    st, link = os.lstat(self._lock_file), os.readlink(self._lock_file)
                except OSError:  # released meanwhile
                    continue
                now = time.monotonic()
                ident = (st.st_ino, st.st_mtime_ns, link)
                if ident != seen:
                    seen, seen_at = ident, now
                dead = _dead_owner(link)
                if dead or now - seen_at > self.grace_period:
                    why = (f"its holder {dead} is no longer running" if dead
                           else f"unchanged for {now - seen_at:.0f} s (a worker died holding it)")
                    _warn(f"releasing the stale journal lock {self._lock_file}: {why}")
                    stale = f"{self._lock_file}.{os.getpid()}.{time.monotonic_ns()}.stale"
                    try:
                        os.rename(self._lock_file, stale)
                        os.unlink(stale)
                    except OSError:
                        pass
                    seen, sleep_s = None, 0.001
                    continue
                if now - last_warning > 10.0:
                    _warn(f"waiting {now - started:.0f} s for the journal lock {self._lock_file}")
                    last_warning = now
                time.sleep(sleep_s)
                sleep_s = min(sleep_s * 2, 0.1)

    return JournalLock


def _line_start(f, end: int) -> int:
    """Offset just after the last newline before ``end`` (0 if none)."""
    pos, chunk = end, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _valid_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def repair_journal_tail(path: Path, quick: bool = False) -> bool:
    """Set aside a torn last record (what a crash or a full disk leaves mid-append); call it
    holding the journal lock. The record is complete when it parses and ends in a newline; the
    bytes of an incomplete one go to ``<journal>.torn`` and the journal is truncated before it.
    ``quick``: trust a last record that ends in a newline (before each append; the full check
    runs when the journal is opened). Returns True if the journal was changed."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return False
    with f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return False
        f.seek(end - 1)
        newline = f.read(1) == b"\n"
        if newline and quick:
            return False
        start = _line_start(f, end - 1 if newline else end)
        f.seek(start)
        last = f.read(end - start)
        if newline and _valid_record(last):
            return False
        if not newline and _valid_record(last):  # all but the newline was written: complete it
            f.seek(end)
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            return True
        side = path.with_name(path.name + ".torn")
        try:
            with open(side, "ab") as g:
                g.write(last + (b"" if newline else b"\n"))
                g.flush()
                os.fsync(g.fileno())
            kept = f"moved to {side}"
        except OSError as e:
            kept = f"not kept ({e.strerror} writing {side})"
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    _warn(f"journal {path}: its last record was incomplete (a worker died or the disk filled mid-write); "
          f"removed it, {end - start} bytes {kept}")
    return True


def _torn_tail(path: Path) -> bool:
    """Is the journal's last record incomplete (without taking the lock: a read-only command on a
    full disk cannot create the lock file)?"""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return False
            f.seek(end - 1)
            newline = f.read(1) == b"\n"
            start = _line_start(f, end - 1 if newline else end)
            f.seek(start)
            return not (newline and _valid_record(f.read(end - start)))
    except FileNotFoundError:
        return False


def _bad_journal_line(path: Path) -> int | None:
    """1-based number of the first line of the journal that is not a complete record."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n") or not _valid_record(line):
                return n
    return None


def _journal_backend_class():
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import get_lock_file

    class JournalBackend(JournalFileBackend):
        """Optuna's journal file with appends that cannot leave a torn record: a failed write
        (``ENOSPC``) is truncated away before the error is raised, and a torn record left by
        a process killed mid-append is set aside (``repair_journal_tail``) before appending."""

        def __init__(self, file_path: str):
            file_path = os.path.abspath(file_path)
            super().__init__(file_path, _journal_lock_class()(file_path))
            if _torn_tail(Path(file_path)):  # checked again under the lock: a writer may be mid-append
                with get_lock_file(self._lock):
                    repair_journal_tail(Path(file_path))

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
            with get_lock_file(self._lock):
                repair_journal_tail(Path(self._file_path), quick=True)
                fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    size = os.fstat(fd).st_size
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                    except BaseException:
                        os.ftruncate(fd, size)  # nothing half-written stays behind
                        raise
                    os.fsync(fd)
                finally:
                    os.close(fd)

    return JournalBackend


# -- leases (journal storage) ----------------------------------------------------------------
def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


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
    progress: dict[str, Any] | None = None  # the trial's last log-cadence report (Holder.progress)

    def expired(self, now: float) -> str | None:
        """Why the holder is presumed dead, or None if the lease is alive."""
        if (self.host == socket.gethostname() and self.pid_namespace == _pid_namespace()
                and not pid_alive(self.pid)):
            return f"worker {self.worker} is no longer running"
        age = now - self.renewed_at
        if age > self.lease_s:
            return f"lease expired: worker {self.worker} last renewed it {age:.0f} s ago (limit {self.lease_s:g} s)"
        return None


@dataclass
class Liveness:
    """What the storage knows of a running trial's worker."""

    stale: str | None  # why the worker is presumed dead (the trial is retried when a worker next looks), or None
    progress: dict[str, Any] | None  # its last report: step, steps, train_loss, tokens_per_s
    renewed_at: float | None  # Unix time (s) of its last heartbeat, if any


def _since_start(t: FrozenTrial, now: float, lease_s: float) -> str | None:
    """A claimed trial that never renewed: dead once lease_s have passed since it started."""
    age = now - (t.datetime_start.timestamp() if t.datetime_start else now)
    return f"no lease {age:.0f} s after the trial started (limit {lease_s:g} s)" if age > lease_s else None


HOLDER_ATTR = "stabench_holder"  # trial system attribute: {host, pid, pid_namespace} of its worker
PROGRESS_ATTR = "stabench_progress"  # trial system attribute: Holder.progress + renewed_at, each heartbeat


class RetryStaleTrial(_OptunaRetry):
    """Optuna's retry of a stale trial, keeping only the attributes that define it (not the
    failed attempt's worker, error or progress).

    Optuna copies every system attribute into the retry; the failed attempt's holder must not be
    among them, or the retry, once claimed and before its new worker holds it, would look like the
    dead worker's trial and be reaped a second time."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in DEFINITION_ATTRS}
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k not in (HOLDER_ATTR, PROGRESS_ATTR)}
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

    def liveness(self, t: FrozenTrial, now: float | None = None) -> "Liveness":
        """Whether running trial ``t``'s worker is presumed dead, and its last progress report."""
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

    def fail_and_retry(self, study: optuna.Study, t: FrozenTrial, reason: str) -> str | None:
        """Fail running trial ``t`` (its worker is presumed dead for ``reason``) and queue its retry;
        the log line, or None if another worker settled it first."""
        try:
            self.optuna.set_trial_user_attr(t._trial_id, "error", reason)
            if not self.optuna.set_trial_state_values(t._trial_id, TrialState.FAIL):
                return None
        except UpdateFinishedTrialError:  # finished meanwhile, or another worker reaped it
            return None
        self.retry(study, self.optuna.get_trial(t._trial_id))
        return f"trial {t.number} ({t.user_attrs.get('key')}): {reason}; " + _retry_note(study, t.number)


class Holder:
    """Renews liveness in a daemon thread; ``lost`` turns true if another worker failed the trial.

    ``progress`` (set by the worker at the log cadence: step, steps, train_loss, tokens_per_s) goes
    out with every renewal, so ``stabench status`` can show what a running trial is doing."""

    def __init__(self, renew: Callable[[dict[str, Any]], None], still_ours: Callable[[], bool], period_s: float,
                 release: Callable[[], None] = lambda: None):
        self._renew, self._still_ours, self._period, self._release = renew, still_ours, period_s, release
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="stabench-lease")
        self.lost = False
        self.progress: dict[str, Any] = {}

    def __enter__(self) -> "Holder":
        self._renew(self.progress)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:  # a worker leaving by an exception (a full disk) keeps its lease: the
            self._release()   # trial is retried as soon as the process is gone, not after lease_s

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._renew(dict(self.progress))
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

        self.path.parent.mkdir(parents=True, exist_ok=True)
        backend = _journal_backend_class()(str(self.path))
        try:
            return JournalStorage(backend)
        except ValueError:  # json.JSONDecodeError, or Optuna's "Invalid log format."
            line = _bad_journal_line(self.path)
            if line is None:
                raise
        from ..errors import UsageError
        path = self.path.resolve()
        raise UsageError(f"journal {path} line {line} is not a valid record (the file was damaged); keep a copy "
                         f"and delete that line: cp {path} {path}.bak && sed -i '{line}d' {path}") from None

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

        def renew(progress: dict[str, Any]) -> None:
            lease.renewed_at, lease.progress = time.time(), progress
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{pid}.tmp")
            tmp.write_text(json.dumps(asdict(lease)))
            os.replace(tmp, path)

        def still_ours() -> bool:
            return self.optuna.get_trial(trial_id).state == TrialState.RUNNING

        return Holder(renew, still_ours, self.execution.heartbeat_s, lambda: path.unlink(missing_ok=True))

    def liveness(self, t: FrozenTrial, now: float | None = None) -> Liveness:
        now = time.time() if now is None else now
        lease = self.read_lease(t._trial_id)
        if lease is None:  # claimed but no lease yet: the claimer has lease_s from the claim
            return Liveness(_since_start(t, now, self.execution.lease_s), None, None)
        return Liveness(lease.expired(now), lease.progress, lease.renewed_at)

    def reap(self, study: optuna.Study) -> list[str]:
        messages, now = [], time.time()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            reason = self.liveness(t, now).stale
            if reason is not None and (message := self.fail_and_retry(study, t, reason)):
                self._lease_file(t._trial_id).unlink(missing_ok=True)
                messages.append(message)
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
        self.optuna.set_trial_system_attr(trial_id, HOLDER_ATTR, {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace()})

        def renew(progress: dict[str, Any]) -> None:
            self.optuna.record_heartbeat(trial_id)
            self.optuna.set_trial_system_attr(trial_id, PROGRESS_ATTR, {**progress, "renewed_at": time.time()})

        def still_ours() -> bool:
            return self.optuna.get_trial(trial_id).state == TrialState.RUNNING

        return Holder(renew, still_ours, self.execution.heartbeat_s)

    def liveness(self, t: FrozenTrial, now: float | None = None) -> Liveness:
        now = time.time() if now is None else now
        p = t.system_attrs.get(PROGRESS_ATTR)
        renewed = p.get("renewed_at") if p else None
        if dead := self._dead_holder(t):
            stale = dead
        elif renewed is None:
            stale = _since_start(t, now, self.execution.lease_s)
        else:
            age = now - renewed
            stale = (f"heartbeat stale: last one {age:.0f} s ago (limit {self.execution.lease_s:g} s)"
                     if age > self.execution.lease_s else None)
        progress = {k: v for k, v in p.items() if k != "renewed_at"} if p else None
        return Liveness(stale, progress, renewed)

    def _dead_holder(self, t: FrozenTrial) -> str | None:
        """Why ``t``'s worker is known dead (it ran on this host and its process is gone), or None."""
        h = t.system_attrs.get(HOLDER_ATTR)
        if h and h["host"] == socket.gethostname() and h["pid_namespace"] == _pid_namespace() \
                and not pid_alive(h["pid"]):
            return f"worker {h['host']}:{h['pid']} is no longer running"
        return None

    def _reap_dead_holders(self, study: optuna.Study) -> list[str]:
        """Fail and retry the running trials whose worker was on this host and is gone (killed, or
        its Slurm task requeued), without waiting for its heartbeat to go stale."""
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        reasons = [(t, self._dead_holder(t)) for t in running]
        return [m for t, why in reasons if why and (m := self.fail_and_retry(study, t, why))]

    def reap(self, study: optuna.Study) -> list[str]:
        dead = self._reap_dead_holders(study)
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            optuna.storages.fail_stale_trials(study)
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number not in before
                  and "error" not in t.user_attrs]
        return dead + [f"trial {t.number} ({t.user_attrs.get('key')}): heartbeat stale for more than "
                       f"{self.execution.lease_s:g} s; " + _retry_note(study, t.number) for t in failed]


class GrpcSweepStorage(DatabaseSweepStorage):
    """Optuna's gRPC storage proxy (``grpc://host:port``, served by ``stabench proxy``) in front of one
    database: hundreds of workers hold one gRPC channel each instead of a database connection pool.

    The proxy forwards the storage API only, so the sweep engine's own parts travel as trial system
    attributes: each worker's host and pid and its last heartbeat (with the progress report), renewed
    every ``heartbeat_s``; a trial is stale when its worker is gone from this host or its last
    heartbeat is older than ``lease_s``. Queueing takes no lock: two workers that queue the same point
    at once leave a duplicate, which the claim settles (PRUNED, ``duplicate_of``) without training it.
    """

    def _open(self) -> optuna.storages.BaseStorage:
        from optuna.storages import GrpcStorageProxy

        host, _, port = self.url.removeprefix("grpc://").rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise StorageError(f"storage {self.url}: expected grpc://HOST:PORT")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning
                return GrpcStorageProxy(host=host, port=int(port))
        except Exception as e:
            raise StorageError(f"cannot reach the storage proxy {self.url}: {e} "
                               "(start one with `stabench proxy --storage DATABASE_URL`)") from None

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        yield  # none through the proxy; duplicates are settled when claimed

    def hold(self, study: optuna.Study, trial_id: int, number: int, key: str) -> Holder:
        self.optuna.set_trial_system_attr(trial_id, HOLDER_ATTR, {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace()})

        def renew(progress: dict[str, Any]) -> None:
            self.optuna.set_trial_system_attr(trial_id, PROGRESS_ATTR, {**progress, "renewed_at": time.time()})

        def still_ours() -> bool:
            return self.optuna.get_trial(trial_id).state == TrialState.RUNNING

        return Holder(renew, still_ours, self.execution.heartbeat_s)

    def reap(self, study: optuna.Study) -> list[str]:
        now, messages = time.time(), []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            reason = self.liveness(t, now).stale
            if reason is not None and (message := self.fail_and_retry(study, t, reason)):
                messages.append(message)
        return messages


def run_proxy(url: str, host: str, port: int) -> None:
    """Serve database ``url`` to workers as ``grpc://host:port`` until interrupted (Optuna's proxy)."""
    from optuna.storages import RDBStorage, run_grpc_proxy_server

    if not is_database_url(url) or url.startswith("grpc://"):
        raise StorageError(f"the proxy serves a database: got {mask_url(url)}")
    try:
        storage = RDBStorage(_with_driver(url), engine_kwargs={"pool_pre_ping": True})
    except Exception as e:
        raise StorageError(f"cannot open storage {mask_url(url)}: {redact(str(e), url)}") from None
    run_grpc_proxy_server(storage, host=host, port=port)


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
    if url.startswith("grpc://"):
        return GrpcSweepStorage(url, execution)
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
