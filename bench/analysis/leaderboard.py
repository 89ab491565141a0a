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
from .results import Results, hp_label, model_order, prepare_runs, stabilizer_label
from .tables import fmt, to_markdown

PER_TRIAL_FIELDS = ("stabilizer", "hparams", "lr", "seed", "data_seed", "model", "weight_tying", "sweep",
                    "log_every", "micro_batch_size", "device", "compile", "threads", "precision")
PROTOCOL_COLUMNS = ("vocab_size", "seq_len", "batch_size", "steps", "warmup", "data", "L0")


def _protocol_part(config: object) -> str:
    try:
        d = json.loads(config) if isinstance(config, str) else None
    except json.JSONDecodeError:
        d = None
    if not isinstance(d, dict):
        return ""
    return json.dumps({k: v for k, v in d.items() if k not in PER_TRIAL_FIELDS}, sort_keys=True, default=str)


def protocol_of(runs: pd.DataFrame) -> tuple[str, str]:
    """(12-hex fingerprint, one-line description) of the protocol a runs frame was made under."""
    runs = prepare_runs(runs)
    if "config" in runs.columns and runs["config"].notna().any():
        settings = sorted({_protocol_part(c) for c in runs["config"]})
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
    lam = lambda_sensitivity(runs)
    rows = []
    for stab, g in pooled.groupby("stabilizer", sort=False):
        cells = g.sort_values(["lrs", "best_loss"]).groupby(["model", "weight_tying"], sort=False)
        tuned = cells.head(1)
        best = g.groupby(["model", "weight_tying"])["best_loss"].min()
        spread = lam.loc[lam["stabilizer"] == stab, "lrs_spread"]
        r = runs[runs["stabilizer"] == stab]
        rows.append({
            "stabilizer": stab, "lrs": float(tuned["lrs"].mean()),
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
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def display(board: pd.DataFrame) -> pd.DataFrame:
    """Display strings of :func:`rank_stabilizers` output."""
    return pd.DataFrame({
        "rank": board["rank"].astype(str), "stabilizer": board["stabilizer"].map(stabilizer_label),
        "LRS (nats)": board["lrs"].map(fmt), "tuned": board["tuned"].replace("", "–"),
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
           "ranked as 0). Only runs of the same protocol are ranked together.", ""]
    for b in boards:
        out += [f"## Protocol {b.protocol}", "", f"{b.description}  ", f"results: {', '.join(b.sources)}", "",
                to_markdown(b.table)]
    return "\n".join(out)
