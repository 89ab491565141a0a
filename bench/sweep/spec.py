"""Sweep files: the TOML schema, validated (pydantic) before anything runs.

A sweep file names a study, the training settings its runs share, and the grids::

    name = "quick"                      # results/<name>/, Optuna study name
    description = "..."                 # optional
    mode = "grid"                       # "grid" (every point) or "search" (TPE over lr)

    [train]                             # any RunConfig field except the grid axes
    steps = 300                         # optimizer steps
    warmup = 30
    vocab_size = 2048
    data = "synthetic"                  # or "text:PATH", "bin:PATH" (relative to the working dir)

    [grid]
    models = ["nano"]                   # model presets
    lr = [1e-3, 1e-2, 1e-1]             # peak learning rates (per step)
    seeds = [1]
    weight_tying = [false]
    precision = ["fp32", "bf16-emu"]    # optional axis (then not in [train]); see bench.precision

    [stabilizers]                       # spec -> its hyperparameter grids
    baseline = {}
    zloss.lam = [1e-4]
    softcap.cap = [30.0]
    "my_package.module:MyStabilizer" = { alpha = [0.5, 1.0] }

    [execution]                         # how trials run (does not change what is trained)
    checkpoint_every = 100              # steps between checkpoints; 0 = never
    max_retries = 2                     # retries of a trial whose worker died
    heartbeat_s = 10                    # lease renewal period (seconds)
    lease_s = 120                       # a worker silent this long is presumed dead (seconds)
    pack = 1                            # train up to K compatible trials as one batched model
                                        # ("auto": 8 on CPU, 32 on CUDA); 1 = one trial at a time

    [search]                            # mode = "search" only
    trials = 8                          # learning rates tried per stabilizer variant
    lr_min = 1e-4
    lr_max = 1.0

Every error is a ``ConfigError`` naming the file, the key (``grid.lr[2]``) and what is allowed.
Every trial is checked before anything runs (``RunConfig.check`` on each variant, each lr value
on its own), and a sweep is at most ``MAX_TRIALS`` trials (counted from the axis lengths before
anything is expanded); ``name`` is at most ``MAX_NAME`` characters.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from ..config import ConfigError, Precision, RunConfig, fields_with, from_dict, load_toml
from ..model import PRESETS

# RunConfig fields a sweep sets itself, and where a sweep file sets them instead of [train]
# (their ``axis`` metadata).
AXES: dict[str, str] = {f.name: f.metadata["axis"] for f in fields_with(flag="axis")}
TRAIN_KEYS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in AXES]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_NAME = 100  # characters of a sweep name (a directory and an Optuna study name)
MAX_TRIALS = 100_000  # trials of one sweep (grid points, or variants × search.trials)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GridSpec(_Strict):
    """The axes crossed with every stabilizer variant."""

    models: list[str] = Field(default=["micro"], min_length=1)
    lr: list[float] | None = Field(default=None, min_length=1)  # required in grid mode
    seeds: list[int] = Field(default=[1], min_length=1)
    weight_tying: list[bool] = Field(default=[False], min_length=1)
    precision: list[Precision] | None = Field(default=None, min_length=1)  # optional axis; else train.precision


class ExecutionSpec(_Strict):
    """How trials are run; none of it changes a trial's key."""

    checkpoint_every: int = Field(default=0, ge=0)  # steps; 0 = no checkpoints
    max_retries: int = Field(default=2, ge=0)  # retries after a worker died mid-trial
    heartbeat_s: float = Field(default=10.0, gt=0)  # seconds between lease renewals
    lease_s: float = Field(default=120.0, gt=0)  # seconds of silence before a trial is presumed dead
    poll_s: float = Field(default=2.0, gt=0)  # seconds an idle worker waits before looking again
    pack: int | Literal["auto"] = Field(default=1)  # trials trained as one batched model (bench.pack); 1 = off


class SearchSpec(_Strict):
    """``mode = "search"``: TPE over the learning rate, one Optuna study per stabilizer variant."""

    trials: int = Field(ge=1)  # learning rates tried per variant
    lr_min: float = Field(gt=0)
    lr_max: float = Field(gt=0)
    startup_trials: int | None = Field(default=None, ge=1)  # random trials before TPE; None = trials // 3
    seed: int = 0  # sampler seed


class SweepSpec(_Strict):
    """A validated sweep file. ``source`` is the file it came from (for messages)."""

    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME)
    description: str = ""
    mode: Literal["grid", "search"] = "grid"
    train: dict[str, Any] = {}
    grid: GridSpec = GridSpec()
    stabilizers: dict[str, dict[str, list[float]]] = Field(min_length=1)
    execution: ExecutionSpec = ExecutionSpec()
    search: SearchSpec | None = None
    source: str = Field(default="", exclude=True)

    @property
    def base_config(self) -> dict[str, Any]:
        """RunConfig values shared by every trial."""
        return {**self.train, "sweep": self.name}

    @property
    def protocol(self) -> dict[str, Any]:
        """What every run of this sweep shares beyond its grid axes (``bench.config.protocol``);
        ``precision`` is left out when it is a grid axis."""
        from ..config import protocol
        return protocol(from_dict(self.base_config), exclude=("precision",) if self.grid.precision else ())

    def renamed(self, name: str) -> "SweepSpec":
        return self.model_copy(update={"name": name})


_SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): SweepSpec, ("grid",): GridSpec, ("execution",): ExecutionSpec, ("search",): SearchSpec}


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _pydantic_error(err: pydantic.ValidationError, source: str) -> ConfigError:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if p not in ("function-after",))
    key, kind, msg = _format_loc(loc), e["type"], e["msg"]
    if kind == "extra_forbidden":
        section = _SECTIONS.get(tuple(loc[:-1]))
        allowed = [n for n in section.model_fields if n != "source"] if section else []
        msg = f"unknown key; allowed: {', '.join(allowed)}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "too_short" and loc == ("stabilizers",):
        from ..stabilizers import BUILTIN
        msg = f"must not be empty: name at least one stabilizer ({', '.join(sorted(BUILTIN))} or 'module:Class')"
    elif kind == "too_short":
        msg = "must not be empty; give at least one value"
    elif kind == "string_too_long":
        msg = f"must be at most {e['ctx']['max_length']} characters, got {len(e['input'])}"
    elif kind == "string_pattern_mismatch":
        msg = f"{e['input']!r} is not allowed; use letters, digits, '_', '-', '.'"
    elif "input" in e and not isinstance(e["input"], dict):
        msg = f"{msg}; got {e['input']!r}"
    return ConfigError(key, msg, source)


def parse_spec(data: dict[str, Any], source: str, check_data: bool = True, check_machine: bool = True) -> SweepSpec:
    """Validate sweep-file data; raises ConfigError (file, key, allowed values)."""
    try:
        spec = SweepSpec.model_validate({**data, "source": source})
    except pydantic.ValidationError as err:
        raise _pydantic_error(err, source) from None
    _check_train(spec)
    _check_mode(spec)
    _check_size(spec)
    _check_points(spec, check_data, check_machine and check_data)
    return spec


def load_spec(path: str | Path, check_data: bool = True, check_machine: bool = True) -> SweepSpec:
    """Read and validate a sweep file. ``check_data=False`` skips the data checks (for
    looking at a cluster sweep on a machine without its data); ``check_machine=False`` skips
    those of this machine (device, memory: ``stabench launch`` on a login node)."""
    return parse_spec(load_toml(path), str(path), check_data, check_machine)


def count_trials(spec: SweepSpec) -> tuple[int, str]:
    """Trials of the sweep and how they multiply, from the axis lengths (nothing is expanded)."""
    variants_per_stab = [math.prod(len(v) for v in grids.values()) for grids in spec.stabilizers.values()]
    factors = [("models", len(spec.grid.models)), ("precision", len(spec.grid.precision or [None])),
               ("weight_tying", len(spec.grid.weight_tying)), ("seeds", len(spec.grid.seeds)),
               ("stabilizer variants", sum(variants_per_stab))]
    factors.append(("lr", len(spec.grid.lr)) if spec.mode == "grid" else ("search.trials", spec.search.trials))
    return math.prod(n for _, n in factors), " × ".join(f"{n:,} {what}" for what, n in factors)


def _check_size(spec: SweepSpec) -> None:
    n, how = count_trials(spec)
    if n > MAX_TRIALS:
        raise ConfigError("grid", f"{n:,} trials ({how}) exceed the limit of {MAX_TRIALS:,} per sweep; "
                          "use fewer values or split the sweep", spec.source)


def _check_train(spec: SweepSpec) -> None:
    for key, value in spec.train.items():
        if key in AXES:
            raise ConfigError(f"train.{key}", f"is set by the sweep: put it in {AXES[key]}", spec.source)
        if key not in TRAIN_KEYS:
            raise ConfigError(f"train.{key}", f"unknown key; allowed: {', '.join(TRAIN_KEYS)}", spec.source)
    try:
        from_dict(spec.base_config)
    except ConfigError as e:
        raise _rekey(e, f"train.{e.key}", spec.source) from None
    if spec.grid.precision is not None and "precision" in spec.train:
        raise ConfigError("train.precision", "is also set by grid.precision; keep one of the two", spec.source)
    if spec.execution.pack != "auto" and spec.execution.pack < 1:
        raise ConfigError("execution.pack", f'must be "auto" or an integer >= 1, got {spec.execution.pack!r}',
                          spec.source)
    if spec.execution.pack != 1 and spec.mode != "grid":
        raise ConfigError("execution.pack", 'packing needs mode = "grid" (a search asks for one lr at a time)',
                          spec.source)
    _check_times(spec)
    every, log_every = spec.execution.checkpoint_every, spec.train.get("log_every", RunConfig.log_every)
    if every and every % log_every:
        raise ConfigError("execution.checkpoint_every",
                          f"must be a multiple of train.log_every ({log_every}), got {every}", spec.source)


MAX_SECONDS = 7 * 86400.0  # a week: longer periods are mistakes (and overflow timers and Optuna)


def _check_times(spec: SweepSpec) -> None:
    """Finite, bounded periods, and a lease renewed before it expires (else two workers train the
    same point at once: the reaper presumes a live worker dead between its renewals)."""
    ex = spec.execution
    for key in ("heartbeat_s", "lease_s", "poll_s"):
        value = getattr(ex, key)
        if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
            raise ConfigError(f"execution.{key}", f"must be a finite number of seconds in (0, {MAX_SECONDS:g}], "
                              f"got {value!r}", spec.source)
    if not ex.heartbeat_s < ex.lease_s:
        raise ConfigError("execution.heartbeat_s", f"must be less than execution.lease_s: a lease is renewed every "
                          f"heartbeat_s and presumed dead after lease_s; got heartbeat_s = {ex.heartbeat_s:g}, "
                          f"lease_s = {ex.lease_s:g}", spec.source)


def _check_mode(spec: SweepSpec) -> None:
    if spec.mode == "grid":
        if spec.grid.lr is None:
            raise ConfigError("grid.lr", "required key is missing (a list of learning rates)", spec.source)
        if spec.search is not None:
            raise ConfigError("search", 'only allowed with mode = "search"', spec.source)
        return
    if spec.search is None:
        raise ConfigError("search", 'mode = "search" needs a [search] table with trials, lr_min, lr_max',
                          spec.source)
    if spec.grid.lr is not None:
        raise ConfigError("grid.lr", 'not allowed with mode = "search": the sampler chooses lr in '
                          "[search.lr_min, search.lr_max]", spec.source)
    if not spec.search.lr_min < spec.search.lr_max:
        raise ConfigError("search.lr_max", f"must be > lr_min ({spec.search.lr_min:g})", spec.source)


def _check_points(spec: SweepSpec, check_data: bool, check_machine: bool = True) -> None:
    """Check every axis value once, then one full RunConfig per stabilizer variant."""
    from ..stabilizers import StabilizerError, load_stabilizer_class, make_stabilizer

    src = spec.source
    for i, m in enumerate(spec.grid.models):
        if m not in PRESETS:
            raise ConfigError(f"grid.models[{i}]", f"unknown preset {m!r}; allowed: {', '.join(PRESETS)}", src)
    for i, lr in enumerate(spec.grid.lr or []):
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"grid.lr[{i}]", f"must be > 0, got {lr!r}", src)
    for stab, grids in spec.stabilizers.items():
        try:
            cls = load_stabilizer_class(stab)
        except StabilizerError as e:
            raise ConfigError(f"stabilizers.{_quote(stab)}", str(e), src) from None
        allowed = cls.hyperparameter_names()
        for hp, values in grids.items():
            key = f"stabilizers.{_quote(stab)}.{hp}"
            if hp not in allowed:
                raise ConfigError(key, f"{stab!r} has no hyperparameter {hp!r}; allowed: "
                                  f"{', '.join(allowed) or '(none)'}", src)
            if not values:
                raise ConfigError(key, "must not be empty; give at least one value", src)
        for hps in hparam_grid(grids):
            try:
                make_stabilizer(stab, **hps)
            except StabilizerError as e:
                raise ConfigError(f"stabilizers.{_quote(stab)}", str(e), src) from None
    from .grid import variants  # grid imports this module

    for v in variants(spec):  # every trial is a variant at one of the lr values checked above
        cfg = v.config if check_data else v.config.replace(data="synthetic")
        try:
            cfg.check(machine=check_machine)
        except ConfigError as e:
            raise _rekey(e, _sweep_key(e.key, spec, cfg), src) from None


def _sweep_key(key: str, spec: SweepSpec, cfg: RunConfig) -> str:
    """Where a sweep file sets RunConfig field ``key`` of trial ``cfg``: ``train.<key>`` or its axis."""
    field = key.split(".")[0]
    if field in ("stabilizer", "hparams"):
        return f"stabilizers.{_quote(cfg.stabilizer)}"
    if field in AXES:
        return {"model": "grid.models", "seed": "grid.seeds", "sweep": "name"}.get(field, f"grid.{field}")
    if field == "precision" and spec.grid.precision is not None:
        return "grid.precision"
    return f"train.{key}"


def hparam_grid(grids: dict[str, list[float]]) -> list[dict[str, float]]:
    """Cartesian product of one stabilizer's hyperparameter grids ([{}] if it has none)."""
    names = sorted(grids)
    return [dict(zip(names, values)) for values in itertools.product(*(grids[n] for n in names))]


def _rekey(e: ConfigError, key: str, source: str) -> ConfigError:
    """The same error under the key a sweep file uses for it."""
    prefix = f"{e.source}: {e.key}: " if e.source else f"{e.key}: "
    return ConfigError(key, str(e)[len(prefix):], source)


def _quote(spec: str) -> str:
    return spec if re.fullmatch(r"[A-Za-z0-9_-]+", spec) else f'"{spec}"'
