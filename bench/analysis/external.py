"""Published results (a CSV) as a runs frame, so they are tabulated and drawn like local runs.

Required columns: ``model, stabilizer, lam, lr, weight_tying, final_loss`` (as in the
reference study's ``oec_paper_runs.csv``); optional: ``cap``, ``seed``, ``diverged``,
``n_params``, ``vocab_size``, ``L0``. How rows map to the runs frame:

- ``lam`` is kept for stabilizers that have a λ (built-in z-loss and μ-loss, or any row
  with a non-zero λ); the CSV's ``lam = 0`` for baseline / μ-centering means "none" → null.
- ``L0`` = ln(vocab_size), vocab_size 50,304 (the study's tokenizer) unless given.
- ``n_params`` is the nominal size in the model name (``16M`` → 16·10⁶) unless given.
- ``diverged`` is "final loss not finite or ≥ L0" unless given; ``seed`` 0 unless given.
- ``sweep`` is ``published:<file name>`` so published rows never mix with local ones.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .results import prepare_runs

REQUIRED = ("model", "stabilizer", "lam", "lr", "weight_tying", "final_loss")
STUDY_VOCAB_SIZE = 50304
LAMBDA_STABILIZERS = ("zloss", "muloss")
_SUFFIX = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}


def nominal_params(model: str) -> float:
    """Parameter count written in a model name: ``16M`` → 1.6e7, ``1.3B`` → 1.3e9 (NaN if none)."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*([kKMBG])", str(model))
    return float(m.group(1)) * _SUFFIX[m.group(2)] if m else math.nan


def _as_bool(s: pd.Series) -> pd.Series:
    if s.dtype == bool:
        return s
    text = s.astype(str).str.strip().str.lower()
    bad = ~text.isin(["true", "false", "1", "0", "yes", "no"])
    if bad.any():
        raise ValueError(f"weight_tying: not a boolean: {s[bad].iloc[0]!r}")
    return text.isin(["true", "1", "yes"])


def published_frame(df: pd.DataFrame, vocab_size: int = STUDY_VOCAB_SIZE, source: str = "published"
                    ) -> pd.DataFrame:
    """Map a published-results table to a prepared runs frame (see module doc)."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"missing column(s) {', '.join(missing)} (a published-results CSV needs "
                         f"{', '.join(REQUIRED)})")
    out = df.copy()
    out["model"] = out["model"].astype(str)
    out["stabilizer"] = out["stabilizer"].astype(str)
    out["lr"] = pd.to_numeric(out["lr"], errors="raise").astype(float)
    out["final_loss"] = pd.to_numeric(out["final_loss"], errors="coerce").astype(float)
    out["weight_tying"] = _as_bool(out["weight_tying"])
    lam = pd.to_numeric(out["lam"], errors="coerce").astype(float)
    has_lam = out["stabilizer"].isin(LAMBDA_STABILIZERS) | (lam.fillna(0.0) != 0.0)
    out["lam"] = lam.where(has_lam)
    out["cap"] = pd.to_numeric(out["cap"], errors="coerce").astype(float) if "cap" in out.columns else np.nan
    out["hparams"] = None  # rebuilt from lam / cap by prepare_runs
    if "vocab_size" not in out.columns:
        out["vocab_size"] = vocab_size
    if "L0" not in out.columns:
        out["L0"] = np.log(out["vocab_size"].astype(float))
    if "n_params" not in out.columns:
        out["n_params"] = out["model"].map(nominal_params)
    if "seed" not in out.columns:
        out["seed"] = 0
    if "diverged" not in out.columns:
        loss = out["final_loss"].to_numpy(dtype=float)
        out["diverged"] = ~np.isfinite(loss) | (loss >= out["L0"].to_numpy(dtype=float))
    out["sweep"] = source
    return prepare_runs(out)


def read_published(path: str | Path, vocab_size: int = STUDY_VOCAB_SIZE) -> pd.DataFrame:
    """Read a published-results CSV into a prepared runs frame; ValueError names file and problem."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    try:
        df = pd.read_csv(p)
        return published_frame(df, vocab_size=vocab_size, source=f"published:{p.name}")
    except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{p}: {e}") from None
