"""Experiment-tracker logging: the loop's log-cadence metrics, run by run, to TensorBoard, W&B or MLflow.

``open_tracker(kind, out_dir)`` returns a ``Tracker`` (or None for ``"none"``). The loop calls
``start`` when a member starts or resumes, ``log`` with the curve row it has just built at the log
cadence (plain Python floats, already on the host: no extra device sync), ``finish`` with the
member's run row, and ``leave`` when it stops early on purpose (``stop_at``). Each run is named by its run key.

- ``tensorboard``: ``torch.utils.tensorboard`` event files in ``<out>/tensorboard/<run key>/``
  (needs the ``tensorboard`` package; no account).
- ``wandb``: one W&B run per key under ``<out>/wandb/``; offline unless ``WANDB_MODE`` says otherwise
  (``wandb sync`` uploads offline runs later).
- ``mlflow``: one MLflow run per key in the experiment ``stabench``, at ``MLFLOW_TRACKING_URI`` or
  ``<out>/mlruns``.

A tracker package that is not installed is a one-line error naming the pip command.
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any, Protocol

from .errors import UsageError

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
METRICS = ("lr", "train_loss", "reg_loss", "val_loss", "grad_norm", "logit_mean", "logit_absmax", "mean_log2z",
           "mu_norm")
"""Curve columns a tracker receives (``records.CURVE_COLUMNS`` minus run_id and step)."""
SUMMARY = ("final_loss", "best_val_loss", "diverged", "diverged_step", "steps_done", "mu_norm", "logit_mean",
           "mean_log2z", "tokens_per_s")
"""Run-row columns a tracker receives when a run finishes."""


class Tracker(Protocol):
    def start(self, key: str, config: dict[str, Any]) -> None: ...

    def log(self, key: str, step: int, row: dict[str, Any]) -> None: ...

    def finish(self, key: str, run: dict[str, Any]) -> None: ...

    def leave(self, key: str) -> None:
        """The process stops before run ``key`` ends (``stop_at``): flush, keep it resumable."""


def _numbers(row: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    """The finite numbers among ``row[names]`` (None, NaN and inf are left out: trackers reject them)."""
    out = {}
    for n in names:
        v = row.get(n)
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[n] = float(v)
    return out


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"log = {package!r} needs the {package} package: pip install {package}") from None


class TensorBoardTracker:
    def __init__(self, out: Path):
        self.tb = _need("torch.utils.tensorboard", "tensorboard")
        self.out, self.writers = out / "tensorboard", {}

    def start(self, key, config):
        self.writers[key] = w = self.tb.SummaryWriter(log_dir=str(self.out / key))
        w.add_text("config", "\n".join(f"    {k} = {v}" for k, v in sorted(config.items())))

    def log(self, key, step, row):
        for name, value in _numbers(row, METRICS).items():
            self.writers[key].add_scalar(name, value, step)

    def finish(self, key, run):
        w = self.writers.pop(key)
        for name, value in _numbers(run, SUMMARY).items():
            w.add_scalar(f"final/{name}", value, int(run.get("steps_done") or 0))
        w.close()

    def leave(self, key):
        self.writers.pop(key).close()


class WandbTracker:
    def __init__(self, out: Path):
        self.wandb = _need("wandb", "wandb")
        self.out, self.runs = out / "wandb", {}
        self.out.mkdir(parents=True, exist_ok=True)

    def start(self, key, config):
        self.runs[key] = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "stabench"), name=key, id=key,
                                         config=config, dir=str(self.out), resume="allow", reinit="create_new",
                                         mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, key, step, row):
        self.runs[key].log(_numbers(row, METRICS), step=step)

    def finish(self, key, run):
        r = self.runs.pop(key)
        r.summary.update(_numbers(run, SUMMARY))
        r.finish()

    def leave(self, key):
        self.runs.pop(key).finish()


class MlflowTracker:
    def __init__(self, out: Path):
        mlflow = _need("mlflow", "mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        self.client, self.runs = mlflow.MlflowClient(tracking_uri=uri), {}
        exp = self.client.get_experiment_by_name("stabench")
        self.experiment = exp.experiment_id if exp else self.client.create_experiment("stabench")

    def start(self, key, config):
        run = self.client.create_run(self.experiment, run_name=key, tags={"run_key": key})
        self.runs[key] = run.info.run_id
        for k, v in config.items():
            self.client.log_param(run.info.run_id, k, str(v)[:500])

    def log(self, key, step, row):
        for name, value in _numbers(row, METRICS).items():
            self.client.log_metric(self.runs[key], name, value, step=step)

    def finish(self, key, run):
        rid = self.runs.pop(key)
        for name, value in _numbers(run, SUMMARY).items():
            self.client.log_metric(rid, f"final_{name}", value)
        self.client.set_terminated(rid)

    def leave(self, key):
        self.client.set_terminated(self.runs.pop(key), status="KILLED")


class Fanout:
    """Several trackers as one (Nones left out)."""

    def __init__(self, *trackers: Tracker | None):
        self.trackers = [t for t in trackers if t is not None]

    def start(self, key, config):
        for t in self.trackers:
            t.start(key, config)

    def log(self, key, step, row):
        for t in self.trackers:
            t.log(key, step, row)

    def finish(self, key, run):
        for t in self.trackers:
            t.finish(key, run)

    def leave(self, key):
        for t in self.trackers:
            t.leave(key)


PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(kind: str) -> str | None:
    """Why tracker ``kind`` cannot be used here (its package is missing), or None."""
    import importlib.util

    package = PACKAGES.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"log = {kind!r} needs the {package} package: pip install {package}"
    return None


def open_tracker(kind: str, out: str | Path) -> Tracker | None:
    """The tracker ``kind`` (one of TRACKERS) writing under results directory ``out``; None for "none"."""
    if kind not in TRACKERS:
        raise UsageError(f"log: unknown tracker {kind!r}; allowed: {', '.join(TRACKERS)}")
    cls = {"none": None, "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}[kind]
    return None if cls is None else cls(Path(out))
