"""Sensitivity metrics: pure functions of a runs frame (see :mod:`bench.analysis.results`).

Learning-rate sensitivity of one loss curve L(lr) over a grid of n learning rates::

    LRS = Σ_lr [min(L(lr), L0) − min_lr L(lr)] / (n − 1)

L0 is the loss at initialization (ln V). A diverged run or a non-finite loss counts as L0,
and the minimum is taken over the same treated values (so a curve that never gets below L0
has LRS 0, never a negative one). LRS is in nats: the mean excess loss over the best
learning rate, 0 for a flat curve, L0 − min L when every other rate fails.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .results import GROUP, format_value, prepare_runs

_CARRY = ["setting", "hp_name", "hp_value", "L0"]


def treated_losses(losses: Sequence[float] | np.ndarray, L0: float,
                   diverged: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
    """min(L, L0) per point; L0 where the loss is not finite or the run diverged."""
    L = np.asarray(losses, dtype=float)
    bad = ~np.isfinite(L)
    if diverged is not None:
        bad = bad | np.asarray(diverged, dtype=bool)
    return np.where(bad, float(L0), np.minimum(L, float(L0)))


def lr_sensitivity(losses: Sequence[float] | np.ndarray, L0: float,
                   diverged: Sequence[bool] | np.ndarray | None = None) -> float:
    """LRS of one curve: final losses over a grid of n ≥ 2 learning rates (NaN for n < 2).

    ``diverged`` optionally flags points that count as L0 whatever their loss.
    """
    L = treated_losses(losses, L0, diverged)
    if L.size < 2:
        return math.nan
    return float(np.sum(L - L.min()) / (L.size - 1))


def _summarize(points: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """LRS, best loss, best lr and n_lrs of every curve in ``points`` (one row per curve and lr,
    columns ``loss`` (treated) and ``all_failed``), indexed by ``keys``.

    The best lr is the lr of the lowest loss among points that did not fail (NaN when all
    failed); ties go to the smallest lr.
    """
    points = points.sort_values("lr", kind="stable").reset_index(drop=True)
    excess = points["loss"] - points.groupby(keys, sort=False, dropna=False)["loss"].transform("min")
    out = (points.assign(_excess=excess).groupby(keys, sort=False, dropna=False)
           .agg(n_lrs=("lr", "size"), best_loss=("loss", "min"), _excess=("_excess", "sum")))
    out["lrs"] = (out["_excess"] / (out["n_lrs"] - 1).clip(lower=1)).where(out["n_lrs"] > 1)
    ok = points[~points["all_failed"]]
    best = ok.loc[ok.groupby(keys, sort=False, dropna=False)["loss"].idxmin()].set_index(keys)["lr"]
    out["best_lr"] = best.reindex(out.index)
    return out.drop(columns="_excess")


def lrs_table(runs: pd.DataFrame, by_seed: bool = False) -> pd.DataFrame:
    """LRS, best loss and best learning rate per model × stabilizer × hyperparameters × weight tying.

    ``by_seed=True``: one row per seed (each seed's own curve). Otherwise one row per group,
    aggregated over seeds: ``lrs`` and ``best_loss`` are the means of the per-seed values,
    ``best_lr`` minimizes the seed-averaged curve. A learning rate run twice in one curve
    counts once, with the mean of its treated losses. Columns: the group keys, ``seed`` (by
    seed) or ``n_seeds`` / ``seeds``, ``setting``, ``hp_name``, ``hp_value``, ``L0``,
    ``n_params``, ``lrs``, ``best_loss``, ``best_lr``, ``n_lrs``, ``n_runs``, ``n_diverged``.
    """
    df = prepare_runs(runs)
    if "n_params" not in df.columns:
        df["n_params"] = np.nan
    keys = GROUP + ["seed"]
    points = (df.groupby(keys + ["lr"], sort=False, dropna=False)
              .agg(loss=("final_loss_clipped", "mean"), all_failed=("failed", "all")).reset_index())
    meta = df.groupby(keys, sort=False, dropna=False).agg(
        **{c: (c, "first") for c in _CARRY}, n_params=("n_params", "max"), n_runs=("failed", "size"),
        n_diverged=("failed", "sum"))
    per_seed = meta.join(_summarize(points, keys)).reset_index()
    per_seed["n_diverged"] = per_seed["n_diverged"].astype(int)
    columns = keys + _CARRY + ["n_params", "lrs", "best_loss", "best_lr", "n_lrs", "n_runs", "n_diverged"]
    if by_seed:
        return per_seed[columns]

    mean_points = (points.groupby(GROUP + ["lr"], sort=False, dropna=False)
                   .agg(loss=("loss", "mean"), all_failed=("all_failed", "all")).reset_index())
    mean_curve = _summarize(mean_points, GROUP)[["best_lr", "n_lrs"]]
    pooled = per_seed.groupby(GROUP, sort=False, dropna=False).agg(
        **{c: (c, "first") for c in _CARRY}, n_params=("n_params", "max"), lrs=("lrs", "mean"),
        best_loss=("best_loss", "mean"), n_runs=("n_runs", "sum"), n_diverged=("n_diverged", "sum"),
        n_seeds=("seed", "nunique"), seeds=("seed", lambda s: ",".join(str(x) for x in sorted(s.unique()))))
    pooled = pooled.join(mean_curve).reset_index()
    columns = GROUP + _CARRY + ["n_params", "lrs", "best_loss", "best_lr", "n_lrs", "n_runs", "n_diverged",
                                "n_seeds", "seeds"]
    return pooled[columns]


def lambda_sensitivity(runs: pd.DataFrame) -> pd.DataFrame:
    """Sensitivity to a stabilizer's scalar hyperparameter (λ of z-loss / μ-loss, c of soft-cap, …).

    For every model × stabilizer × weight tying whose runs span at least two values of one
    scalar hyperparameter: the LRS and best loss at each value (from :func:`lrs_table`,
    aggregated over seeds) and their spread max − min. Columns: ``model``, ``stabilizer``,
    ``weight_tying``, ``hp_name``, ``n_params``, ``n_values``, ``values`` (text), ``lrs_min``,
    ``lrs_max``, ``lrs_spread``, ``best_loss_min``, ``best_loss_max``, ``best_loss_spread``,
    ``hp_at_min_lrs``, ``hp_at_best_loss``.
    """
    table = lrs_table(runs)
    scalar = table[(table["hp_name"] != "") & ~table["hp_name"].str.contains(",")]
    rows = []
    keys = ["model", "stabilizer", "weight_tying", "precision", "hp_name"]
    for key, g in scalar.groupby(keys, sort=False):
        if g["hp_value"].nunique() < 2:
            continue
        g = g.sort_values("hp_value")
        rows.append({**dict(zip(keys, key)), "n_params": g["n_params"].max(), "n_values": g["hp_value"].nunique(),
                     "values": ", ".join(format_value(v) for v in g["hp_value"]),
                     "lrs_min": g["lrs"].min(), "lrs_max": g["lrs"].max(),
                     "lrs_spread": g["lrs"].max() - g["lrs"].min(),
                     "best_loss_min": g["best_loss"].min(), "best_loss_max": g["best_loss"].max(),
                     "best_loss_spread": g["best_loss"].max() - g["best_loss"].min(),
                     "hp_at_min_lrs": float(g.loc[g["lrs"].idxmin(), "hp_value"]),
                     "hp_at_best_loss": float(g.loc[g["best_loss"].idxmin(), "hp_value"])})
    columns = keys + ["n_params", "n_values", "values", "lrs_min", "lrs_max", "lrs_spread", "best_loss_min",
                      "best_loss_max", "best_loss_spread", "hp_at_min_lrs", "hp_at_best_loss"]
    return pd.DataFrame(rows, columns=columns)


def divergence_rate(runs: pd.DataFrame, by: Sequence[str] = ("stabilizer",)) -> pd.DataFrame:
    """Fraction of runs that failed (diverged or non-finite final loss) per ``by`` group.

    Columns: ``by`` …, ``n_runs``, ``n_diverged``, ``rate``.
    """
    df = prepare_runs(runs)
    out = (df.groupby(list(by), sort=False, dropna=False)
           .agg(n_runs=("failed", "size"), n_diverged=("failed", "sum")).reset_index())
    out["n_diverged"] = out["n_diverged"].astype(int)
    out["rate"] = out["n_diverged"] / out["n_runs"]
    return out


def run_step_time(runs: pd.DataFrame) -> pd.Series:
    """Seconds per training step of each run: ``step_time_s``, else ``wall_time_s / steps_done``."""
    nan = pd.Series(np.nan, index=runs.index)
    step = pd.to_numeric(runs["step_time_s"], errors="coerce") if "step_time_s" in runs.columns else nan
    if {"wall_time_s", "steps_done"} <= set(runs.columns):
        wall = pd.to_numeric(runs["wall_time_s"], errors="coerce") / pd.to_numeric(runs["steps_done"],
                                                                                   errors="coerce")
    else:
        wall = nan
    step = step.where(np.isfinite(step) & (step > 0))
    return step.fillna(wall.where(np.isfinite(wall) & (wall > 0)))


def step_time_overhead(runs: pd.DataFrame, reference: str = "baseline") -> pd.DataFrame:
    """Relative step-time overhead of each stabilizer vs ``reference`` on the same model and tying.

    Step time per group is the median over its runs (all hyperparameter values and learning
    rates pooled: a stabilizer's cost does not depend on them). ``overhead`` =
    t / t_reference − 1 (0.05 = 5 % slower); NaN without a reference run. Columns: ``model``,
    ``stabilizer``, ``weight_tying``, ``n_runs``, ``step_time_s``, ``reference_step_time_s``, ``overhead``.
    """
    df = prepare_runs(runs)
    df["_t"] = run_step_time(df)
    keys = ["model", "stabilizer", "weight_tying", "precision"]
    df = df[df["_t"].notna()]
    columns = keys + ["n_runs", "step_time_s", "reference_step_time_s", "overhead"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    t = df.groupby(keys, sort=False).agg(n_runs=("_t", "size"), step_time_s=("_t", "median")).reset_index()
    ref = t[t["stabilizer"] == reference][["model", "weight_tying", "precision", "step_time_s"]]
    ref = ref.rename(columns={"step_time_s": "reference_step_time_s"})
    t = t.merge(ref, on=["model", "weight_tying", "precision"], how="left")
    t["overhead"] = t["step_time_s"] / t["reference_step_time_s"] - 1.0
    return t[columns]


def stats_vs_lr(runs: pd.DataFrame, columns: Sequence[str] = ("loss", "logit_mean", "logit_absmax", "mu_norm")
                ) -> pd.DataFrame:
    """Mean over seeds of final run statistics at each learning rate, per curve group.

    Columns: the group keys, ``setting``, ``n_params``, ``lr``, ``n_runs``, ``n_diverged`` and
    each of ``columns`` present in ``runs`` (non-finite values ignored in the mean).
    """
    df = prepare_runs(runs)
    cols = [c for c in columns if c in df.columns]
    for c in cols:
        df[c] = pd.to_numeric(df[c], errors="coerce").where(lambda s: np.isfinite(s))
    if "n_params" not in df.columns:
        df["n_params"] = np.nan
    agg = {c: (c, "mean") for c in cols}
    return (df.groupby(GROUP + ["setting", "lr"], sort=False, dropna=False)
            .agg(n_params=("n_params", "max"), n_runs=("failed", "size"), n_diverged=("failed", "sum"), **agg)
            .reset_index())
