"""A results directory as analysis input: runs, curves, the sweep file and provenance.

Every analysis function takes the *runs frame*: the rows of ``runs.parquet`` (see
``bench.records.RUN_COLUMNS``), or published rows read by :mod:`bench.analysis.external`,
passed through :func:`prepare_runs`, which adds the derived columns below. ``prepare_runs``
is idempotent and every public function calls it, so raw frames work everywhere.

Derived columns
---------------
``hp``        canonical JSON of the stabilizer hyperparameters (``"{}"`` if none): the group key
              that separates, e.g., z-loss λ=1e-4 from z-loss λ=1e-1.
``hp_name``   name of the single scalar hyperparameter (``lam``, ``cap``, …), ``""`` if the
              stabilizer has none, names joined by ``,`` if it has several.
``hp_value``  its value (NaN unless exactly one hyperparameter).
``setting``   display label, e.g. ``zloss (λ=0.0001)``; ``, tied`` is appended when the frame
              holds both weight-tying values, ``, bf16-emu`` when it holds several precisions.
``precision`` the run's precision (``""`` where unknown, e.g. published rows).
``failed``    the run diverged or its final loss is not finite.
``final_loss_clipped``  the loss every table and the LR-sensitivity formula use: L0 for a failed run,
              else min(final_loss, L0). Written into runs.parquet since schema 2; computed here for
              older files and published rows that lack it (or where it is null).
``loss``      the same values as ``final_loss_clipped`` (the name the figures use).
"""
from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

GROUP = ["model", "stabilizer", "hp", "weight_tying", "precision"]
"""A learning-rate curve is identified by these columns (plus ``seed`` for one seed's curve)."""

HP_SYMBOLS = {"lam": "λ", "cap": "c"}
"""How hyperparameter names are written in labels."""


def _hparams_of_row(hparams: Any, lam: Any, cap: Any) -> dict[str, float]:
    """Hyperparameters of one run: the ``hparams`` JSON when present, else ``lam`` / ``cap``."""
    if isinstance(hparams, str) and hparams.strip():
        try:
            parsed = json.loads(hparams)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return {str(k): float(v) for k, v in parsed.items()}
    out = {}
    for name, value in (("lam", lam), ("cap", cap)):
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[name] = float(value)
    return out


def canonical_hp(hp: dict[str, float]) -> str:
    """The group key of a hyperparameter dict: sorted JSON, values as floats."""
    return json.dumps({k: float(hp[k]) for k in sorted(hp)}, sort_keys=True)


def format_value(x: float) -> str:
    """A number as it appears in labels: ``1e-07`` → ``1e-7``, ``0.0001`` → ``1e-4``, ``100.0`` → ``100``."""
    if x != 0 and math.isfinite(x) and (abs(x) < 1e-2 or abs(x) >= 1e4):
        mantissa, exponent = f"{x:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


def stabilizer_label(spec: str) -> str:
    """Short display name of a stabilizer spec (a file path's directories are dropped)."""
    return spec.rsplit("/", 1)[-1]


def hp_label(hp_json: str) -> str:
    """``λ=1e-4``, ``c=30``, ``alpha=0.5, beta=2``; ``""`` for no hyperparameters."""
    hp = json.loads(hp_json)
    return ", ".join(f"{HP_SYMBOLS.get(k, k)}={format_value(v)}" for k, v in hp.items())


def setting_label(stabilizer: str, hp_json: str) -> str:
    """``zloss (λ=1e-4)``, ``softcap (c=30)``, ``baseline``."""
    name, inner = stabilizer_label(stabilizer), hp_label(hp_json)
    return f"{name} ({inner})" if inner else name


LOSSES = ("final_loss", "final_loss_fp32")
"""The final losses an analysis can use: in the run's precision (default) or re-evaluated in fp32."""


def use_loss(runs: pd.DataFrame, column: str = "final_loss") -> pd.DataFrame:
    """``runs`` with ``column`` as the final loss every table, figure and the LRS formula use
    (``final_loss`` and ``final_loss_clipped`` replaced; ``final_loss_run_precision`` keeps the
    original). ValueError when the runs do not carry it (results written before schema 3)."""
    if column not in LOSSES:
        raise ValueError(f"unknown loss {column!r}; allowed: {', '.join(LOSSES)}")
    if column == "final_loss":
        return runs
    values = pd.to_numeric(runs[column], errors="coerce") if column in runs.columns else None
    if values is None or values.isna().all():
        raise ValueError(f"these runs carry no {column} (recorded since schema 3: re-run the sweep to get it)")
    from bench.records import clipped_final_loss

    diverged = runs["diverged"].fillna(False) if "diverged" in runs.columns else pd.Series(False, index=runs.index)
    out = runs.assign(final_loss_run_precision=runs["final_loss"], final_loss=values)
    out["final_loss_clipped"] = [clipped_final_loss(v, l0, d) for v, l0, d in zip(values, out["L0"], diverged)]
    return prepare_runs(out.drop(columns=["loss"], errors="ignore"))


def prepare_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``runs`` with the derived columns of this module's docstring.

    Missing optional columns get neutral values: ``weight_tying`` False, ``seed`` 0,
    ``L0`` ln(vocab_size), ``diverged`` False. Never modifies its argument.
    """
    df = runs.copy()
    if df.empty and "model" not in df.columns:
        raise ValueError("runs frame has no 'model' column")
    for col in ("model", "stabilizer", "lr", "final_loss"):
        if col not in df.columns:
            raise ValueError(f"runs frame lacks required column {col!r}")
    n = len(df)
    if "weight_tying" not in df.columns:
        df["weight_tying"] = False
    df["weight_tying"] = df["weight_tying"].fillna(False).astype(bool)
    if "seed" not in df.columns:
        df["seed"] = 0
    df["seed"] = pd.to_numeric(df["seed"]).fillna(0).astype("int64")
    if "L0" not in df.columns:
        if "vocab_size" not in df.columns:
            raise ValueError("runs frame needs 'L0' or 'vocab_size' (L0 = ln V)")
        df["L0"] = np.log(df["vocab_size"].astype(float))
    elif "vocab_size" in df.columns:
        df["L0"] = df["L0"].astype(float).fillna(np.log(df["vocab_size"].astype(float)))
    if "diverged" not in df.columns:
        df["diverged"] = False
    df["diverged"] = df["diverged"].fillna(False).astype(bool)
    for col in ("lam", "cap", "hparams"):
        if col not in df.columns:
            df[col] = None
    df["model"] = df["model"].astype(str)
    df["stabilizer"] = df["stabilizer"].astype(str)
    df["lr"] = df["lr"].astype(float)
    df["final_loss"] = pd.to_numeric(df["final_loss"], errors="coerce").astype(float)

    hps = [_hparams_of_row(h, la, c) for h, la, c in zip(df["hparams"].tolist(), df["lam"].tolist(),
                                                           df["cap"].tolist())]
    df["hp"] = [canonical_hp(h) for h in hps]
    df["hp_name"] = [next(iter(h)) if len(h) == 1 else ",".join(sorted(h)) for h in hps]
    df["hp_value"] = [float(next(iter(h.values()))) if len(h) == 1 else np.nan for h in hps]
    tied_both = df["weight_tying"].nunique() > 1
    labels = [setting_label(s, h) for s, h in zip(df["stabilizer"], df["hp"])]
    if tied_both:
        labels = [lab + (", tied" if t else ", untied") for lab, t in zip(labels, df["weight_tying"])]
    if "precision" not in df.columns:
        df["precision"] = ""
    df["precision"] = df["precision"].fillna("").astype(str)
    if df["precision"].nunique() > 1:
        labels = [f"{lab}, {p}" for lab, p in zip(labels, df["precision"])]
    df["setting"] = labels if n else pd.Series([], dtype=object)
    finite = np.isfinite(df["final_loss"].to_numpy(dtype=float))
    df["failed"] = df["diverged"].to_numpy() | ~finite
    clipped = np.where(df["failed"], df["L0"], np.minimum(df["final_loss"], df["L0"]))
    if "final_loss_clipped" in df.columns:
        df["final_loss_clipped"] = pd.to_numeric(df["final_loss_clipped"], errors="coerce").astype(float)
        df["final_loss_clipped"] = df["final_loss_clipped"].fillna(pd.Series(clipped, index=df.index))
    else:
        df["final_loss_clipped"] = clipped
    df["loss"] = df["final_loss_clipped"]
    return df


def model_order(runs: pd.DataFrame) -> list[str]:
    """Model names from smallest to largest (by ``n_params`` when present, else by name)."""
    if runs.empty:
        return []
    if "n_params" in runs.columns and runs["n_params"].notna().any():
        sizes = runs.groupby("model")["n_params"].max().fillna(np.inf)
        return sorted(sizes.index, key=lambda m: (sizes[m], m))
    return sorted(runs["model"].unique())


def stabilizer_order(names: list[str] | pd.Series) -> list[str]:
    """Built-ins in the study's order (baseline first), then others alphabetically."""
    from .palette import BUILTIN_ORDER

    unique = list(dict.fromkeys(names))
    known = [s for s in BUILTIN_ORDER if s in unique]
    return known + sorted(s for s in unique if s not in BUILTIN_ORDER)


def setting_order(runs: pd.DataFrame) -> list[str]:
    """Setting labels ordered by stabilizer (study order), then hyperparameter value."""
    if runs.empty:
        return []
    keys = runs[["stabilizer", "hp_value", "hp", "weight_tying", "setting"]].drop_duplicates("setting")
    rank = {s: i for i, s in enumerate(stabilizer_order(keys["stabilizer"]))}
    keys = keys.assign(_r=keys["stabilizer"].map(rank), _v=keys["hp_value"].fillna(-np.inf))
    return keys.sort_values(["_r", "_v", "hp", "weight_tying"])["setting"].tolist()


# -- a results directory --------------------------------------------------------------------

@dataclass
class Results:
    """What a results directory holds. ``runs`` is prepared (see :func:`prepare_runs`)."""

    path: Path
    runs: pd.DataFrame
    curves: pd.DataFrame
    sweep_toml: str | None = None
    sweep_meta: dict[str, Any] = field(default_factory=dict)
    sweep_toml_sha256: str = ""

    @property
    def sweep_hash(self) -> str:
        return sweep_hash(self.sweep_meta, self.sweep_toml_sha256)

    def provenance(self) -> dict[str, str]:
        return provenance(self.runs, self.sweep_toml, self.sweep_meta, self.sweep_toml_sha256)


SWEEP_HASH_KEYS = ("sweep_hash", "hash", "sha256", "file_hash", "sweep_sha256")


def sweep_hash(sweep_meta: dict[str, Any], sweep_toml_sha256: str = "") -> str:
    """The sweep file's hash: as ``sweep.json`` records it, else the sha256 of the ``sweep.toml`` copy."""
    for key in SWEEP_HASH_KEYS:
        value = sweep_meta.get(key)
        if isinstance(value, str) and value:
            return value
    return sweep_toml_sha256


def _joined(values: pd.Series) -> str:
    vals = sorted({str(v) for v in values.dropna() if str(v) != ""})
    return ", ".join(vals)


def provenance(runs: pd.DataFrame, sweep_toml: str | None = None, sweep_meta: dict[str, Any] | None = None,
               sweep_toml_sha256: str = "") -> dict[str, str]:
    """Versions, commits, sweep name and hash behind a runs frame (distinct values joined by ``, ``)."""
    meta = sweep_meta or {}
    out = {}
    for col in ("stabench_version", "git_commit", "torch_version", "device", "precision"):
        out[col] = _joined(runs[col]) if col in runs.columns else ""
    name = meta.get("name") or meta.get("sweep") or ""
    if not name and sweep_toml:
        try:
            name = str(tomllib.loads(sweep_toml).get("name", ""))
        except tomllib.TOMLDecodeError:
            name = ""
    if not name and "sweep" in runs.columns:
        name = _joined(runs["sweep"])
    out["sweep"] = name
    out["sweep_hash"] = sweep_hash(meta, sweep_toml_sha256)
    out["seeds"] = ", ".join(str(s) for s in sorted(runs["seed"].unique())) if "seed" in runs.columns else ""
    out["n_runs"] = str(len(runs))
    return out


PER_TRIAL_FIELDS = ("stabilizer", "hparams", "lr", "seed", "data_seed", "model", "weight_tying", "precision")
"""Config fields a sweep varies per trial (precision: a curve's identity in every table): not its protocol."""


def protocol_part(config: object) -> str:
    """The protocol a run's ``config`` JSON was made under, as canonical JSON ('' if unreadable):
    every setting but the per-trial and execution fields."""
    try:
        d = json.loads(config) if isinstance(config, str) else None
    except json.JSONDecodeError:
        d = None
    if not isinstance(d, dict):
        return ""
    skip, defaults = _not_protocol()
    return json.dumps({k: v for k, v in d.items() if k not in skip and not (k in defaults and v == defaults[k])},
                      sort_keys=True, default=str)


def _not_protocol() -> tuple[set[str], dict[str, Any]]:
    """Fields that never define a protocol (per-trial, execution) and the defaults of fields added
    since key version 1 (at their default they are absent from older configs: the same protocol)."""
    import dataclasses

    from bench.config import RunConfig, fields_with

    skip = set(PER_TRIAL_FIELDS) | {f.name for f in fields_with(role="execution")}
    defaults = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(RunConfig) if f.metadata.get("key") == "if_not_default"}
    return skip, defaults


def _changed(a: str, b: str) -> str:
    """``key: x → y`` for the settings in which two protocol parts differ."""
    from bench.config import protocol_changes

    return "; ".join(protocol_changes(json.loads(a or "{}"), json.loads(b or "{}")))


def one_protocol(runs: pd.DataFrame, where: str, study: str | None = None, mixed: bool = False) -> pd.DataFrame:
    """The runs of one protocol: all of them when they share one (or ``mixed``), those of sweep ``study``
    when given; else a ValueError naming the sweeps, what differs and the two ways out."""
    if study is not None:
        runs = runs[runs["sweep"] == study]
        if runs.empty:
            raise ValueError(f"{where}: no runs of sweep {study!r}")
    if mixed or "config" not in runs.columns:
        return runs
    parts = runs["config"].map(protocol_part)
    if parts.nunique() <= 1:
        return runs
    first, second = parts.unique()[:2]
    sweeps = {p: sorted(runs.loc[parts == p, "sweep"].astype(str).unique()) for p in (first, second)}
    raise ValueError(f"{where}: holds runs of {parts.nunique()} protocols (sweeps {', '.join(sweeps[first])} vs "
                     f"{', '.join(sweeps[second])}: {_changed(first, second)}); pick one with --study NAME, or "
                     "pool them anyway with --mixed-protocols")


def load_results(path: str | Path, study: str | None = None, mixed: bool = False) -> Results:
    """Read ``runs.parquet``, ``curves.parquet`` and, if present, ``sweep.toml`` / ``sweep.json``.

    ``sweep.toml`` is a copy of the sweep file, ``sweep.json`` the sweep engine's record of it
    (its ``sweep_hash`` / ``hash`` / ``sha256`` key is the sweep file hash; ``name`` its name).

    Raises FileNotFoundError when the directory or its ``runs.parquet`` is missing and
    ValueError when it holds no runs, or runs of several protocols (see :func:`one_protocol`:
    ``study`` selects one sweep's runs, ``mixed`` pools them all).
    """
    from bench import records

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a directory")
    if not (p / "runs.parquet").is_file():
        raise FileNotFoundError(f"{p}: no runs.parquet (is this a results directory?)")
    runs = records.read_runs(p)
    if runs.empty:
        raise ValueError(f"{p / 'runs.parquet'}: holds no runs")
    runs = one_protocol(runs, str(p / "runs.parquet"), study, mixed)
    curves = records.read_curves(p)
    toml_bytes = (p / "sweep.toml").read_bytes() if (p / "sweep.toml").is_file() else None
    toml_text = toml_bytes.decode("utf-8", errors="replace") if toml_bytes is not None else None
    toml_sha = hashlib.sha256(toml_bytes).hexdigest() if toml_bytes is not None else ""
    meta: dict[str, Any] = {}
    if (p / "sweep.json").is_file():
        try:
            loaded = json.loads((p / "sweep.json").read_text())
            meta = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            meta = {}
    return Results(p, prepare_runs(runs), curves, toml_text, meta, toml_sha)
