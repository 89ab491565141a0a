"""``stabench compare A B [C…]``: result folders of one protocol side by side.

Per learning-rate curve group (model × stabilizer × hyperparameters × weight tying × precision,
as every analysis groups runs) and per folder: LRS and best loss, mean over seeds with a
bootstrap CI; and for every folder after the first, the paired difference of LRS to the first
folder over the seeds both ran, with the exact sign-flip test (``stats.paired_signflip_test``).

Folders are compared only when they were made under the same protocol: the resolved run
configs (the ``config`` JSON column) minus the grid axes (model, stabilizer, hparams,
weight_tying, lr, seed, data_seed) and the execution fields (how and where a run was trained)
must agree, precision included. Otherwise :func:`check_protocols` raises UsageError naming
the first setting that differs.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .metrics import lrs_table
from .results import GROUP, Results, model_order, setting_order
from .stats import bootstrap_ci, paired_signflip_test, seed_summary
from .tables import fmt, fmt_diff, to_markdown

GRID_FIELDS = ("model", "stabilizer", "hparams", "weight_tying", "lr", "seed", "data_seed")
"""Run fields a sweep varies within one protocol (never compared)."""
PROTOCOL_COLUMNS = ("vocab_size", "seq_len", "batch_size", "steps", "warmup", "data", "precision")
"""Runs-frame columns compared when a runs frame has no ``config`` column."""


def _execution_fields() -> tuple[str, ...]:
    from bench.config import RunConfig

    return RunConfig.EXECUTION_FIELDS


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def protocol_settings(runs: pd.DataFrame) -> dict[str, list[Any]]:
    """Setting -> its sorted distinct values over the runs, for every setting of the protocol.

    From each run's resolved config (``config`` JSON) minus the grid axes and execution fields;
    ``precision`` is the resolved one of the ``precision`` column where present (``auto`` names
    a different precision on different machines).
    """
    skip = set(GRID_FIELDS) | set(_execution_fields())
    values: dict[str, set[str]] = {}

    def add(key: str, value: Any) -> None:
        values.setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))

    configs = runs["config"].dropna() if "config" in runs.columns else pd.Series([], dtype=object)
    parsed = []
    for c in configs:
        try:
            d = json.loads(c)
        except (TypeError, json.JSONDecodeError):
            continue
        if isinstance(d, dict):
            parsed.append(d)
    if parsed:
        for d in parsed:
            for k, v in _flatten({k: v for k, v in d.items() if k not in skip}).items():
                add(k, v)
    else:
        for col in PROTOCOL_COLUMNS:
            if col in runs.columns:
                for v in runs[col].dropna().unique():
                    add(col, v.item() if hasattr(v, "item") else v)
    if "precision" in runs.columns and runs["precision"].astype(str).ne("").any():
        values["precision"] = {json.dumps(str(p)) for p in runs["precision"] if str(p)}
    return {k: sorted(json.loads(v) for v in vs) if len(vs) > 1 else [json.loads(next(iter(vs)))]
            for k, vs in sorted(values.items())}


def _show(values: list[Any]) -> str:
    return ", ".join(str(v) for v in values) if values else "(unset)"


def protocol_difference(results: Sequence[Results], labels: Sequence[str]) -> str | None:
    """One line naming the first protocol setting that differs between the folders, or None."""
    settings = [protocol_settings(r.runs) for r in results]
    for key in sorted(set().union(*settings)):
        first = settings[0].get(key, [])
        for label, s in zip(labels[1:], settings[1:]):
            if s.get(key, []) != first:
                return (f"protocols differ: {key} is {_show(first)} in {labels[0]} but {_show(s.get(key, []))} "
                        f"in {label}; compare only result folders of one protocol")
    return None


def check_protocols(results: Sequence[Results], labels: Sequence[str]) -> None:
    """Raise UsageError (one line) unless all folders share one protocol."""
    from bench.errors import UsageError

    msg = protocol_difference(results, labels)
    if msg is not None:
        raise UsageError(msg)


def folder_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short, distinct names of the folders: their names, or their paths when names repeat."""
    names = [Path(p).name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


@dataclass
class Comparison:
    """``summary``: one row per curve group and folder (``folder``, GROUP, ``setting``, ``n_seeds``,
    ``lrs_mean``/``_ci_lo``/``_ci_hi``, ``best_loss_mean``/…); ``paired``: one row per curve group and
    folder after the first (``folder``, GROUP, ``n_pairs``, ``diff`` = mean of its per-seed LRS minus the
    first folder's, ``diff_ci_lo``/``_hi`` (bootstrap), ``p_value``)."""

    labels: list[str]
    summary: pd.DataFrame
    paired: pd.DataFrame


def compare(results: Sequence[Results], labels: Sequence[str] | None = None) -> Comparison:
    """The comparison of folders already checked to share a protocol (see :func:`check_protocols`)."""
    labels = list(labels or folder_labels([r.path for r in results]))
    # one frame for every folder, so that group labels (``setting``) are the same across folders
    runs = pd.concat([r.runs.assign(_folder=lab) for r, lab in zip(results, labels)], ignore_index=True)
    per_seed = {lab: lrs_table(runs[runs["_folder"] == lab].drop(columns="_folder"), by_seed=True)
                for lab in labels}
    summary = pd.concat([seed_summary(ps).assign(folder=lab) for lab, ps in per_seed.items() if not ps.empty],
                        ignore_index=True)
    settings = runs.drop(columns="_folder")
    from .results import prepare_runs

    labelled = prepare_runs(settings)[GROUP + ["setting", "hp_value"]].drop_duplicates(GROUP)
    summary = summary.drop(columns="setting").merge(labelled, on=GROUP, how="left")
    rows = []
    ref = per_seed[labels[0]]
    for lab in labels[1:]:
        mine = per_seed[lab]
        for key, g in mine.groupby(GROUP, sort=False, dropna=False):
            r = ref
            for col, v in zip(GROUP, key):
                r = r[r[col] == v]
            a = g.groupby("seed")["lrs"].mean()
            b = r.groupby("seed")["lrs"].mean()
            seeds = sorted(set(a.index) & set(b.index))
            d = (a.loc[seeds] - b.loc[seeds]).to_numpy(dtype=float)
            lo, hi = bootstrap_ci(d)
            rows.append({"folder": lab, **dict(zip(GROUP, key)), "n_pairs": len(seeds),
                         "diff": float(np.nanmean(d)) if len(seeds) and np.isfinite(d).any() else math.nan,
                         "diff_ci_lo": lo, "diff_ci_hi": hi,
                         "p_value": paired_signflip_test(a.loc[seeds], b.loc[seeds]) if len(seeds) >= 2
                         else math.nan})
    paired = pd.DataFrame(rows, columns=["folder", *GROUP, "n_pairs", "diff", "diff_ci_lo", "diff_ci_hi",
                                         "p_value"])
    return Comparison(labels, summary, paired)


def _ci(mean: float, lo: float, hi: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if lo is None or math.isnan(lo):
        return fmt(mean)
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def _ordered_groups(c: Comparison) -> pd.DataFrame:
    s = c.summary
    groups = s[GROUP + ["setting", "n_params"]].drop_duplicates(GROUP)
    models = {m: i for i, m in enumerate(model_order(s))}
    settings = {x: i for i, x in enumerate(setting_order(s))}
    return (groups.assign(_m=groups["model"].map(models), _s=groups["setting"].map(settings))
            .sort_values(["_m", "_s"], kind="stable").drop(columns=["_m", "_s"]))


def table(c: Comparison) -> pd.DataFrame:
    """The display table: a row per curve group; LRS and best loss [95% CI] per folder, ΔLRS vs the first."""
    cols = ["model", "setting"]
    out = []
    for _, g in _ordered_groups(c).iterrows():
        row: dict[str, Any] = {"model": g["model"], "setting": g["setting"]}
        for lab in c.labels:
            m = c.summary[(c.summary["folder"] == lab)]
            for col in GROUP:
                m = m[m[col] == g[col]]
            if m.empty:
                row[f"LRS {lab}"] = row[f"best loss {lab}"] = row[f"seeds {lab}"] = "–"
                continue
            m = m.iloc[0]
            row[f"LRS {lab}"] = _ci(m["lrs_mean"], m["lrs_ci_lo"], m["lrs_ci_hi"])
            row[f"best loss {lab}"] = _ci(m["best_loss_mean"], m["best_loss_ci_lo"], m["best_loss_ci_hi"])
            row[f"seeds {lab}"] = int(m["n_seeds"])
        for lab in c.labels[1:]:
            p = c.paired[c.paired["folder"] == lab]
            for col in GROUP:
                p = p[p[col] == g[col]]
            row[f"ΔLRS {lab} − {c.labels[0]}"] = ("–" if p.empty else
                                                   fmt_diff(p.iloc[0]["diff"], p.iloc[0]["p_value"],
                                                            int(p.iloc[0]["n_pairs"])))
        out.append(row)
    for lab in c.labels:
        cols += [f"LRS {lab}", f"best loss {lab}", f"seeds {lab}"]
    cols += [f"ΔLRS {lab} − {c.labels[0]}" for lab in c.labels[1:]]
    return pd.DataFrame(out, columns=cols)


def markdown(c: Comparison, protocol: dict[str, list[Any]] | None = None) -> str:
    """The comparison as Markdown: a heading, the protocol line, the table and how to read it."""
    lines = [f"# Comparison: {', '.join(c.labels)}", ""]
    if protocol:
        keys = [k for k in ("steps", "warmup", "batch_size", "seq_len", "vocab_size", "data", "precision")
                if k in protocol]
        lines += ["Protocol (shared): " + ", ".join(f"{k} = {_show(protocol[k])}" for k in keys), ""]
    lines += [to_markdown(table(c)),
              f"LRS and best loss in nats: mean over seeds [95% bootstrap CI over seeds; none with one seed]. "
              f"ΔLRS: mean over the seeds both folders ran of the per-seed LRS difference to {c.labels[0]}, "
              "with the exact paired sign-flip test (n.s.: p >= 0.05; at least 6 seeds are needed for p < 0.05).",
              ""]
    return "\n".join(lines)


def figure(c: Comparison):
    """One figure: LRS (top) and best loss (bottom) per setting, mean and 95% CI over seeds, a marker
    per folder, a column per model."""
    from matplotlib.figure import Figure

    groups = _ordered_groups(c)
    models = list(dict.fromkeys(groups["model"]))
    per_panel = max(4.0, 1.5 + 0.8 * int(groups.groupby("model").size().max()))
    fig = Figure(figsize=(per_panel * len(models), 6.5), layout="constrained")
    axes = fig.subplots(2, len(models), squeeze=False, sharex="col")
    width = 0.8 / len(c.labels)
    for col, model in enumerate(models):
        g = groups[groups["model"] == model].reset_index(drop=True)
        for row, (metric, ylabel) in enumerate((("lrs", "LR sensitivity (nats)"), ("best_loss", "best loss (nats)"))):
            ax = axes[row, col]
            for j, lab in enumerate(c.labels):
                xs, ys, lo, hi = [], [], [], []
                for i, grp in g.iterrows():
                    m = c.summary[c.summary["folder"] == lab]
                    for key in GROUP:
                        m = m[m[key] == grp[key]]
                    if m.empty or not np.isfinite(m.iloc[0][f"{metric}_mean"]):
                        continue
                    m = m.iloc[0]
                    mean, ci_lo, ci_hi = m[f"{metric}_mean"], m[f"{metric}_ci_lo"], m[f"{metric}_ci_hi"]
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(mean)
                    lo.append(mean - ci_lo if np.isfinite(ci_lo) else 0.0)
                    hi.append(ci_hi - mean if np.isfinite(ci_hi) else 0.0)
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=lab, color=f"C{j}")
            ax.set_xticks(range(len(g)), g["setting"], rotation=30, ha="right")
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(model)
                ax.set_ylim(bottom=0)
    axes[0, 0].legend(title="results", fontsize="small")
    fig.suptitle("Per stabilizer: mean and 95% CI over seeds")
    return fig
