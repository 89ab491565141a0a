"""Leaderboard: stabilizers (built-in and submitted) ranked across one or more results directories.

Only runs made under the same *protocol* are ranked together. The protocol fingerprint is
computed from the runs themselves (not from the sweep file, whose stabilizer list differs
when a new stabilizer is submitted): the resolved training settings of every run except
the per-trial fields (stabilizer, its hyperparameters, learning rate, seeds), plus the
learning-rate grid, the model presets and the weight-tying values. Directories with the
same fingerprint are pooled (a run id that appears twice is counted once); every other
protocol gets its own table.

One row per stabilizer:
- ``LRS``: for each model × weight tying, the stabilizer's hyperparameter setting with the
  lowest LRS (its tuned setting, shown as ``tuned``), averaged over models (and seeds);
- ``λ-sensitivity``: the LRS spread (max − min) across its hyperparameter grid, averaged
  over models; ``–`` when it has no grid (ranked as 0: there is nothing to tune);
- ``best loss``: the lowest loss over all its settings and learning rates, averaged over models.
Rows are ranked by LRS, then λ-sensitivity, then best loss. Each row
shows the stabench version(s), sweep file hash(es), seeds and the number of runs behind it.

Ties: with two or more seeds, each stabilizer's LRS gets a 95 % bootstrap confidence interval
over seeds (per seed: the tuned settings' LRS averaged over models). A row whose interval
overlaps the interval of the row ranked just above it is *tied* with it: tied rows share the
rank of the first of them (1, 1, 3, …) and the ``ties`` column names the others. Overlap is
chained (a ~ b and b ~ c put a, b, c in one group even if a and c do not overlap), so a tie
says "these seeds cannot order them", never "they are equal". With one seed there are no
intervals and no ties.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .metrics import lambda_sensitivity, lrs_table
from .results import Results, hp_label, model_order, prepare_runs, protocol_part, stabilizer_label
from .stats import bootstrap_ci
from .tables import fmt, to_markdown

CI_LEVEL = 0.95

PROTOCOL_COLUMNS = ("vocab_size", "seq_len", "batch_size", "steps", "warmup", "data", "L0")


def protocol_of(runs: pd.DataFrame) -> tuple[str, str]:
    """(12-hex fingerprint, one-line description) of the protocol a runs frame was made under."""
    runs = prepare_runs(runs)
    if "config" in runs.columns and runs["config"].notna().any():
        settings = sorted({protocol_part(c) for c in runs["config"]})
    else:
        cols = [c for c in PROTOCOL_COLUMNS if c in runs.columns]
        settings = sorted({json.dumps([str(v) for v in row]) for row in runs[cols].itertuples(index=False)})
    lrs = sorted(float(x) for x in runs["lr"].unique())
    models = model_order(runs)
    tying = sorted(bool(x) for x in runs["weight_tying"].unique())
    blob = json.dumps({"settings": settings, "lr": lrs, "models": models, "weight_tying": tying}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    parts = [f"models {', '.join(models)}", f"lr {', '.join(f'{x:g}' for x in lrs)}"]
    for col in ("steps", "vocab_size", "batch_size", "seq_len"):
        if col in runs.columns and runs[col].notna().any():
            parts.append(f"{col} {', '.join(str(v) for v in sorted(runs[col].dropna().unique()))}")
    if len(tying) > 1 or tying[0]:
        parts.append("weight tying " + ", ".join(str(t).lower() for t in tying))
    return digest, "; ".join(parts)


@dataclass
class Board:
    """The ranking of one protocol: ``data`` numeric, ``table`` display strings."""

    protocol: str
    description: str
    sources: list[str]
    data: pd.DataFrame
    table: pd.DataFrame


def _joined(values) -> str:
    return ", ".join(sorted({str(v) for v in values if v is not None and str(v) not in ("", "nan")}))


def rank_stabilizers(runs: pd.DataFrame) -> pd.DataFrame:
    """Numeric leaderboard of one protocol's runs (see module doc); rank 1 is best.

    ``runs`` may carry ``sweep_hash`` and ``source`` columns (added by :func:`leaderboard`).
    """
    runs = prepare_runs(runs)
    pooled = lrs_table(runs)
    per_seed = lrs_table(runs, by_seed=True)
    lam = lambda_sensitivity(runs)
    rows = []
    for stab, g in pooled.groupby("stabilizer", sort=False):
        cells = g.sort_values(["lrs", "best_loss"]).groupby(["model", "weight_tying"], sort=False)
        tuned = cells.head(1)
        lo, hi = _tuned_lrs_ci(per_seed, tuned)
        best = g.groupby(["model", "weight_tying"])["best_loss"].min()
        spread = lam.loc[lam["stabilizer"] == stab, "lrs_spread"]
        r = runs[runs["stabilizer"] == stab]
        rows.append({
            "stabilizer": stab, "lrs": float(tuned["lrs"].mean()), "lrs_ci_lo": lo, "lrs_ci_hi": hi,
            "tuned": _joined(tuned["hp"].map(hp_label)),
            "lambda_sensitivity": float(spread.mean()) if not spread.empty else math.nan,
            "best_loss": float(best.mean()), "n_settings": g["hp"].nunique(),
            "models": ", ".join(m for m in model_order(runs) if m in set(g["model"])),
            "seeds": ",".join(str(s) for s in sorted(r["seed"].unique())), "n_runs": len(r),
            "stabench_version": _joined(r["stabench_version"]) if "stabench_version" in r.columns else "",
            "sweep_hash": _joined(h[:12] for h in r["sweep_hash"]) if "sweep_hash" in r.columns else "",
            "sources": _joined(r["source"]) if "source" in r.columns else "",
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.assign(_ls=df["lambda_sensitivity"].fillna(0.0)).sort_values(["lrs", "_ls", "best_loss"])
    df = df.drop(columns="_ls").reset_index(drop=True)
    rank, ties = _tie_groups(df)
    df.insert(0, "rank", rank)
    df.insert(1, "ties", ties)
    return df


def _tuned_lrs_ci(per_seed: pd.DataFrame, tuned: pd.DataFrame) -> tuple[float, float]:
    """Bootstrap CI over seeds of a stabilizer's LRS: per seed, its tuned settings' LRS averaged over
    the model × weight-tying cells (seeds missing a cell are left out); NaNs with fewer than 2 seeds."""
    keys = ["model", "stabilizer", "hp", "weight_tying", "precision"]
    mine = per_seed.merge(tuned[keys], on=keys)
    n_cells = len(tuned)
    by_seed = mine.groupby("seed").agg(lrs=("lrs", "mean"), n=("lrs", "size"))
    values = by_seed.loc[by_seed["n"] == n_cells, "lrs"].to_numpy(dtype=float)
    return bootstrap_ci(values, CI_LEVEL)


def _tie_groups(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(rank, ties) of rows already in ranking order: a row whose LRS interval overlaps the previous
    row's joins its group; a group shares the rank of its first row (see module doc)."""
    n = len(df)
    lo, hi = df["lrs_ci_lo"].to_numpy(dtype=float), df["lrs_ci_hi"].to_numpy(dtype=float)
    group = np.zeros(n, dtype=int)
    for i in range(1, n):
        overlap = (np.isfinite([lo[i], hi[i], lo[i - 1], hi[i - 1]]).all()
                   and lo[i] <= hi[i - 1] and lo[i - 1] <= hi[i])
        group[i] = group[i - 1] if overlap else i
    rank = group + 1
    names = df["stabilizer"].map(stabilizer_label).tolist()
    ties = [", ".join(names[j] for j in range(n) if group[j] == group[i] and j != i) for i in range(n)]
    return rank, ties


def display(board: pd.DataFrame) -> pd.DataFrame:
    """Display strings of :func:`rank_stabilizers` output."""
    return pd.DataFrame({
        "rank": board["rank"].astype(str), "tied with": board["ties"].replace("", "–"),
        "stabilizer": board["stabilizer"].map(stabilizer_label),
        "LRS (nats)": board["lrs"].map(fmt),
        f"LRS {CI_LEVEL:.0%} CI": [f"[{fmt(a)}, {fmt(b)}]" if np.isfinite(a) and np.isfinite(b) else "–"
                                   for a, b in zip(board["lrs_ci_lo"], board["lrs_ci_hi"])],
        "tuned": board["tuned"].replace("", "–"),
        "λ-sensitivity (nats)": board["lambda_sensitivity"].map(fmt),
        "best loss (nats)": board["best_loss"].map(fmt), "models": board["models"], "seeds": board["seeds"],
        "runs": board["n_runs"].astype(str), "stabench": board["stabench_version"].replace("", "?"),
        "sweep hash": board["sweep_hash"].replace("", "–"),
    })


def leaderboard(results: Sequence[Results]) -> list[Board]:
    """One :class:`Board` per protocol found among ``results`` (largest first)."""
    frames = []
    for res in results:
        df = res.runs.copy()
        df["source"] = str(res.path)
        df["sweep_hash"] = res.sweep_hash
        df["_protocol"], df["_description"] = protocol_of(res.runs)
        frames.append(df)
    if not frames:
        return []
    allruns = pd.concat(frames, ignore_index=True)
    boards = []
    for proto, g in allruns.groupby("_protocol", sort=False):
        if "run_id" in g.columns:  # a run given twice (same config key) counts once
            g = g.drop_duplicates("run_id", keep="last")
        data = rank_stabilizers(g)
        boards.append(Board(proto, g["_description"].iloc[0], sorted(g["source"].unique()), data, display(data)))
    return sorted(boards, key=lambda b: -len(b.data))


def to_text(boards: Sequence[Board]) -> str:
    """The leaderboard as Markdown: a heading and a table per protocol."""
    out = ["# stabench leaderboard", "",
           "Ranked by LR sensitivity (LRS, lower is better), then λ-sensitivity, then best loss. "
           "LRS is at each stabilizer's tuned hyperparameter (lowest LRS per model), averaged over models "
           "and seeds; λ-sensitivity is the LRS spread across its hyperparameter grid (– = no hyperparameter, "
           "ranked as 0). Only runs of the same protocol are ranked together. With two or more seeds the LRS has a "
           f"{CI_LEVEL:.0%} bootstrap confidence interval over seeds; a stabilizer whose interval overlaps the one "
           "ranked above it is tied with it (same rank, named under \"tied with\"): the seeds cannot order them.",
           ""]
    for b in boards:
        out += [f"## Protocol {b.protocol}", "", f"{b.description}  ", f"results: {', '.join(b.sources)}", "",
                to_markdown(b.table)]
    return "\n".join(out)
