"""The trial queue of a sweep on its Optuna studies: queue, claim, finish, count.

Rules that make results exactly-once:

- a grid point is queued only if no trial of its key is waiting, running or complete and its
  key is not in ``runs.parquet`` (queueing holds the storage's lock, so concurrent workers
  queue each point once);
- a worker claims a trial by the atomic WAITING → RUNNING transition of Optuna's storage;
- a claimed trial whose key has a lower-numbered live or complete trial is a duplicate
  (pruned, attribute ``duplicate_of``); one whose key is already recorded in the results is
  completed from the record without training;
- a trial's value is its final validation loss in nats (ln V, the loss of a uniform
  prediction, when that is NaN or infinite); a diverged run is a complete trial with
  ``diverged``, ``step`` and ``reason`` attributes.
"""
from __future__ import annotations

import json
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..config import RunConfig, from_stored
from .grid import definition_attrs, distributions, expand, point_params, study_names, variants
from .spec import SweepSpec
from .storage import SweepStorage

LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


@dataclass
class Claim:
    """A trial this worker now runs (state RUNNING in the storage)."""

    study: optuna.Study
    trial_id: int
    number: int
    config: RunConfig

    @property
    def key(self) -> str:
        return self.config.key()


@dataclass
class Progress:
    """Grid points (or search slots) by outcome."""

    total: int = 0
    done: int = 0  # complete (diverged included) or already recorded
    diverged: int = 0
    running: int = 0
    failed: int = 0  # failed for good (an error, or out of retries)
    queued: int = 0
    recorded_only: int = 0  # in runs.parquet without a complete trial (e.g. a fresh storage)

    @property
    def finished(self) -> bool:
        return self.running == 0 and self.queued == 0


def recorded_keys(out: Path) -> set[str]:
    """Run ids in OUT/runs.parquet and in per-run part files (written before the merge); a damaged
    merged file is set aside (it is rebuilt from the parts), not an error."""
    from .. import records
    return records.recorded_ids(out)


def _recorded_run(out: Path, key: str) -> dict[str, Any] | None:
    from .. import records
    return records.recorded_run(out, key)


def _jsonable(x: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf"): JSON readers (optuna-dashboard) reject NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _jsonable_tree(x: Any) -> Any:
    """A protocol dict as JSON stores it (what a study attribute reads back as)."""
    return json.loads(json.dumps(x, default=str))


def _protocol_of_config(config: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    from ..config import protocol

    exclude = ("precision",) if spec.grid.precision else ()
    return _jsonable_tree(protocol(from_stored(config), exclude=exclude))


def _study_protocol(study: optuna.Study, spec: SweepSpec) -> dict[str, Any] | None:
    """The protocol a study was made for: its attribute, or (older studies) its first trial's."""
    if "protocol" in study.user_attrs:
        return study.user_attrs["protocol"]
    for t in study.get_trials(deepcopy=False):
        if "config" in t.user_attrs:
            return _protocol_of_config(t.user_attrs["config"], spec)
    return None


def _recorded_protocol(out: Path, spec: SweepSpec) -> dict[str, Any] | None:
    """The protocol of the runs of sweep ``spec.name`` already in ``out/runs.parquet`` (the first
    one that differs from this sweep's, if any), or None."""
    from .. import records

    table = records.read_table_or_none(out / "runs.parquet", columns=["sweep", "config"])
    if table is None:
        return None
    new = _jsonable_tree(spec.protocol)
    first = None
    for sweep, config in set(zip(table.column("sweep").to_pylist(), table.column("config").to_pylist())):
        if sweep != spec.name or not config:
            continue
        proto = _protocol_of_config(json.loads(config), spec)
        if proto != new:
            return proto
        first = proto
    return first


def _waiting(study: optuna.Study) -> list[FrozenTrial]:
    """A study's waiting trials in claiming order: retries first (they usually have a checkpoint
    to resume from), then by number."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return sorted(waiting, key=lambda t: ("retry_history" not in t.system_attrs, t.number))


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that have a retry."""
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def outcome_attrs(run: dict[str, Any]) -> dict[str, Any]:
    """Trial user attributes describing a finished run."""
    keys = ("final_loss", "best_val_loss", "diverged", "diverged_reason", "spike_score", "steps_done",
            "n_params", "precision", "wall_time_s", "tokens_per_s", "L0")
    out = {k: _jsonable(run.get(k)) for k in keys}
    out["step"] = run.get("diverged_step") if run.get("diverged") else run.get("steps_done")
    out["reason"] = out.pop("diverged_reason") or ""
    out["outcome"] = "diverged" if run.get("diverged") else "trained"  # a filter in optuna-dashboard
    return out


def trial_value(run: dict[str, Any]) -> float:
    """The trial's objective (nats): ``final_loss_clipped``, the number the LRS uses — min(final loss,
    L0), and L0 = ln V for a diverged run or a non-finite loss, so diverged trials sit at L0 in
    optuna-dashboard instead of stretching its plots. (Diverged trials stay COMPLETE, marked by the
    ``diverged`` and ``outcome`` attributes: PRUNED marks a settled duplicate in this engine.)"""
    from ..records import clipped_final_loss

    return clipped_final_loss(run.get("final_loss"), run["L0"], run.get("diverged"))


class TrialQueue:
    """A sweep's trials on one storage, seen from one worker (or the coordinator)."""

    def __init__(self, spec: SweepSpec, storage: SweepStorage, out: Path):
        self.spec, self.storage, self.out = spec, storage, Path(out)
        from .. import records
        records.ensure_merged(self.out)  # derived files: rebuilt if deleted, damaged or behind the parts
        self._check_protocol()
        self.studies = {name: storage.study(name) for name in study_names(spec)}
        self.points = expand(spec) if spec.mode == "grid" else []
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        for study in self.studies.values():
            self._describe(study)

    def _check_protocol(self) -> None:
        """Refuse to add this sweep to a study or results directory that holds another protocol
        (changed [train] settings): their rows would be pooled as if they were one."""
        from ..config import protocol_changes, protocol_fingerprint
        from ..errors import UsageError

        new = _jsonable_tree(self.spec.protocol)
        existing = set(self.storage.study_names())
        for name in study_names(self.spec):
            old = _study_protocol(self.storage.load(name), self.spec) if name in existing else None
            where = f"study {name} in {self.storage.display}"
            if old is None:
                old, where = _recorded_protocol(self.out, self.spec), f"{self.out / 'runs.parquet'}"
            if old is not None and old != new:
                changed = "; ".join(protocol_changes(old, new))
                raise UsageError(
                    f"sweep {self.spec.name}: its protocol differs from the runs already in {where} ({changed}); "
                    f"use a new results directory (--out DIR) or sweep name, or --force-new-protocol to start "
                    f"study {self.spec.name}-{protocol_fingerprint(new)} beside it, its rows kept apart")

    def _describe(self, study: optuna.Study) -> None:
        from ..config import protocol_fingerprint

        attrs = {"sweep": self.spec.name, "description": self.spec.description, "mode": self.spec.mode,
                 "grid_points": len(self.points) if self.spec.mode == "grid" else self.spec.search.trials,
                 "protocol": _jsonable_tree(self.spec.protocol),
                 "protocol_fingerprint": protocol_fingerprint(self.spec.protocol)}
        current = study.user_attrs
        for k, v in attrs.items():
            if current.get(k) != v:
                study.set_user_attr(k, v)

    def trials(self) -> list[FrozenTrial]:
        return [t for s in self.studies.values() for t in s.get_trials(deepcopy=False)]

    # -- queueing -------------------------------------------------------------------------------
    def enqueue(self, retry_failed: bool = False) -> int:
        """Queue the grid points that are not live, complete or recorded; returns how many.

        ``retry_failed``: also queue points whose trials all failed (a deliberate re-run).
        """
        if self.spec.mode != "grid":
            return 0
        study = self.studies[self.spec.name]
        dists = distributions(self.spec)
        added = 0
        with self.storage.lock(study.study_name):
            trials = study.get_trials(deepcopy=False)
            live = {t.user_attrs.get("key") for t in trials if t.state in LIVE}
            failed = {t.user_attrs.get("key") for t in trials if t.state == TrialState.FAIL}
            skip = live | recorded_keys(self.out) | (set() if retry_failed else failed)
            new = [p for p in self.points if p.key not in skip]
            for p in new:
                params, pdists = point_params(p, dists)
                study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=params,
                                                    distributions=pdists, user_attrs=p.user_attrs()))
                added += 1
        return added

    # -- claiming ---------------------------------------------------------------------------
    def reap(self) -> list[str]:
        return [m for s in self.studies.values() for m in self.storage.reap(s)]

    def claim(self) -> Claim | None:
        """Take the next waiting trial (search: or ask the sampler for a new one); None if none."""
        for study in self.studies.values():
            for t in _waiting(study):
                claim = self._take(study, t)
                if claim is not None:
                    return claim
        if self.spec.mode == "search":
            return self._ask()
        return None

    def claim_companions(self, first: Claim, k: int, prefer: list[str] = ()) -> list[Claim]:
        """Claim up to ``k`` − 1 more waiting trials of ``first``'s study that can share its pack
        (equal ``bench.pack.pack_key``: same architecture, data, schedule, stabilizer, precision),
        those whose key is in ``prefer`` first (the members of a pack checkpoint), then in queue
        order. Each is claimed by the same atomic WAITING → RUNNING transition."""
        from ..pack import pack_key

        want, out = pack_key(first.config), []
        waiting = sorted(_waiting(first.study), key=lambda t: t.user_attrs.get("key") not in prefer)
        for t in waiting:
            if len(out) >= k - 1:
                break
            try:
                if pack_key(from_stored(t.user_attrs["config"])) != want:
                    continue
            except (KeyError, ValueError, TypeError):
                continue  # unusable: left for a plain claim, which fails it with its reason
            claim = self._take(first.study, t)
            if claim is not None:
                out.append(claim)
        return out

    def _take(self, study: optuna.Study, t: FrozenTrial) -> Claim | None:
        """Claim waiting trial ``t`` by the atomic WAITING → RUNNING transition, then check it;
        None if another worker was first or the trial was settled without training."""
        try:
            if not self.storage.optuna.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                return None
        except UpdateFinishedTrialError:
            return None
        return self._accept(study, self.storage.optuna.get_trial(t._trial_id))

    def _accept(self, study: optuna.Study, t: FrozenTrial) -> Claim | None:
        """Check a freshly claimed trial; settle duplicates and recorded keys without training."""
        st = self.storage.optuna
        key = t.user_attrs.get("key")
        twin = [o for o in study.get_trials(deepcopy=False)
                if o.user_attrs.get("key") == key and o.number < t.number and o.state in LIVE]
        if twin:
            st.set_trial_user_attr(t._trial_id, "duplicate_of", twin[0].number)
            st.set_trial_state_values(t._trial_id, TrialState.PRUNED)
            return None
        run = _recorded_run(self.out, key) if key in recorded_keys(self.out) else None
        if run is not None:
            for k, v in {**outcome_attrs(run), "recovered_from_records": True}.items():
                st.set_trial_user_attr(t._trial_id, k, v)
            st.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [trial_value(run)])
            return None
        try:
            cfg = from_stored(t.user_attrs["config"])
            if cfg.key() != key:
                raise ValueError(f"config hashes to {cfg.key()}, not its key {key} (another stabench version?)")
        except Exception as e:
            self.fail(Claim(study, t._trial_id, t.number, RunConfig()), f"unusable trial: {e}")
            return None
        return Claim(study, t._trial_id, t.number, cfg)

    def _ask(self) -> Claim | None:
        """Search mode: a new trial from TPE in the first variant with budget left."""
        search = self.spec.search
        for v in variants(self.spec):
            name = f"{self.spec.name}/{v.label}"
            with self.storage.lock(name):
                trials = self.studies[name].get_trials(deepcopy=False)
                if sum(t.state in LIVE for t in trials) >= search.trials:
                    continue
                startup = search.startup_trials or max(1, search.trials // 3)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ExperimentalWarning (constant_liar)
                    sampler = optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True,
                                                         seed=search.seed * 100_003 + len(trials))
                study = optuna.load_study(study_name=name, storage=self.storage.optuna, sampler=sampler)
                trial = study.ask()
                lr = trial.suggest_float("lr", search.lr_min, search.lr_max, log=True)
                cfg = v.config.replace(lr=lr)
                for k, val in definition_attrs(cfg, v.label).items():
                    trial.set_user_attr(k, val)
            return Claim(self.studies[name], trial._trial_id, trial.number, cfg)
        return None

    # -- finishing --------------------------------------------------------------------------
    def started(self, claim: Claim, attrs: dict[str, Any]) -> None:
        for k, v in {"worker": self.worker, **attrs}.items():
            self.storage.optuna.set_trial_user_attr(claim.trial_id, k, v)

    def complete(self, claim: Claim, run: dict[str, Any], curve: list[dict[str, Any]]) -> bool:
        """Record the outcome on the trial; False if the trial was no longer ours."""
        st = self.storage.optuna
        try:
            for row in curve:
                v = row.get("val_loss")
                if v is not None and math.isfinite(v):
                    st.set_trial_intermediate_value(claim.trial_id, int(row["step"]), float(v))
            for k, v in outcome_attrs(run).items():
                st.set_trial_user_attr(claim.trial_id, k, v)
            st.set_trial_state_values(claim.trial_id, TrialState.COMPLETE, [trial_value(run)])
        except UpdateFinishedTrialError:
            return False
        return True

    def fail(self, claim: Claim, error: str) -> bool:
        try:
            self.storage.optuna.set_trial_user_attr(claim.trial_id, "error", error)
            self.storage.optuna.set_trial_state_values(claim.trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False
        return True

    # -- counting ---------------------------------------------------------------------------
    def busy(self) -> bool:
        """Any trial waiting or running (after reaping)?"""
        return any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in self.trials())

    def progress(self) -> Progress:
        trials = self.trials()
        if self.spec.mode == "grid":
            return self._grid_progress(trials)
        p = Progress(total=len(self.studies) * self.spec.search.trials)
        retried = retried_numbers(trials)
        for study in self.studies.values():
            ts = study.get_trials(deepcopy=False)
            complete = [t for t in ts if t.state == TrialState.COMPLETE]
            p.done += min(len(complete), self.spec.search.trials)
            p.diverged += sum(bool(t.user_attrs.get("diverged")) for t in complete)
            p.running += sum(t.state == TrialState.RUNNING for t in ts)
            p.failed += sum(t.state == TrialState.FAIL and t.number not in retried for t in ts)
        p.queued = max(0, p.total - p.done - p.running - p.failed)
        return p

    def _grid_progress(self, trials: list[FrozenTrial]) -> Progress:
        by_key: dict[str, set[TrialState]] = {}
        diverged: set[str] = set()
        for t in trials:
            by_key.setdefault(t.user_attrs.get("key"), set()).add(t.state)
            if t.state == TrialState.COMPLETE and t.user_attrs.get("diverged"):
                diverged.add(t.user_attrs.get("key"))
        recorded = recorded_keys(self.out)
        p = Progress(total=len(self.points))
        for point in self.points:
            states = by_key.get(point.key, set())
            if TrialState.COMPLETE in states or point.key in recorded:
                p.done += 1
                p.diverged += point.key in diverged
                p.recorded_only += TrialState.COMPLETE not in states
            elif TrialState.RUNNING in states:
                p.running += 1
            elif TrialState.FAIL in states and TrialState.WAITING not in states:
                p.failed += 1
            else:
                p.queued += 1
        return p
