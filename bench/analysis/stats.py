"""Statistics over seeds: mean, standard error, bootstrap confidence intervals, a paired test.

numpy only. The paired test is the sign-flip (paired permutation) test on the per-seed
differences d_i = a_i − b_i: under H0 (no difference) every d_i is as likely to have the
opposite sign, so the p-value is the fraction of the 2^n sign patterns whose |mean| is at
least the observed |mean d|. It is exact for n ≤ 16 seeds (all patterns enumerated; Monte
Carlo with a fixed seed beyond), assumes no normality, and pairs runs that share their
initialization seed and batch order. With n seeds the smallest attainable two-sided
p-value is 2 / 2^n, so at least 6 seeds are needed for significance at α = 0.05.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .results import GROUP

ALPHA = 0.05


def _finite(x: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return a[np.isfinite(a)]


def mean_se(x: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(mean, standard error of the mean = sample std / √n) of the finite values; SE NaN for n < 2."""
    a = _finite(x)
    if a.size == 0:
        return math.nan, math.nan
    if a.size < 2:
        return float(a.mean()), math.nan
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))


def bootstrap_ci(x: Sequence[float] | np.ndarray, level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (resampling seeds); NaNs for n < 2."""
    a = _finite(x)
    if a.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_signflip_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                         n_resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value that paired samples ``a`` and ``b`` have the same mean (see module doc).

    Pairs where either value is not finite are dropped. NaN with fewer than 2 pairs;
    1.0 when all differences are zero.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    n = d.size
    if n < 2:
        return math.nan
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if observed <= tol:
        return 1.0
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(n_resamples, n))
        signs[0] = 1.0  # the observed pattern is one of the resamples
    stats = np.abs((signs * d).mean(axis=1))
    return float(np.mean(stats >= observed - tol))


def seed_summary(per_seed: pd.DataFrame, metrics: Sequence[str] = ("lrs", "best_loss"),
                 level: float = 0.95) -> pd.DataFrame:
    """Mean, SE and bootstrap CI over seeds of each metric, per curve group.

    ``per_seed`` is ``lrs_table(runs, by_seed=True)``. Columns: the group keys, ``setting``,
    ``n_params``, ``n_seeds``, and ``<metric>_mean``, ``<metric>_se``, ``<metric>_ci_lo``,
    ``<metric>_ci_hi`` for each metric.
    """
    rows = []
    for key, g in per_seed.groupby(GROUP, sort=False, dropna=False):
        row = {**dict(zip(GROUP, key)), "setting": g["setting"].iloc[0], "n_params": g["n_params"].max(),
               "n_seeds": g["seed"].nunique()}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_se"] = mean_se(g[m])
            row[f"{m}_ci_lo"], row[f"{m}_ci_hi"] = bootstrap_ci(g[m], level)
        rows.append(row)
    cols = GROUP + ["setting", "n_params", "n_seeds"] + [f"{m}_{s}" for m in metrics
                                                         for s in ("mean", "se", "ci_lo", "ci_hi")]
    return pd.DataFrame(rows, columns=cols)


def compare_to_reference(per_seed: pd.DataFrame, metric: str = "lrs", reference: str = "baseline",
                         alpha: float = ALPHA) -> pd.DataFrame:
    """Paired sign-flip test of each curve group's ``metric`` against the reference stabilizer.

    Pairs are the seeds both groups ran, on the same model, weight tying and precision. The reference
    group is ``reference`` with its first hyperparameter setting (baseline has none).
    Columns: ``model``, ``stabilizer``, ``hp``, ``weight_tying``, ``setting``, ``n_pairs``,
    ``mean``, ``reference_mean``, ``diff`` (mean of paired differences), ``p_value``,
    ``significant`` (True / False, or None when fewer than 2 pairs).
    """
    cols = ["model", "stabilizer", "hp", "weight_tying", "precision", "setting", "n_pairs", "mean",
            "reference_mean", "diff", "p_value", "significant"]
    rows = []
    for (model, tied, prec), g in per_seed.groupby(["model", "weight_tying", "precision"], sort=False,
                                                   dropna=False):
        ref = g[g["stabilizer"] == reference]
        if ref.empty:
            continue
        ref = ref[ref["hp"] == sorted(ref["hp"].unique())[0]].groupby("seed")[metric].mean()
        for (stab, hp), h in g[g["stabilizer"] != reference].groupby(["stabilizer", "hp"], sort=False):
            mine = h.groupby("seed")[metric].mean()
            seeds = sorted(set(mine.index) & set(ref.index))
            a, b = mine.loc[seeds].to_numpy(), ref.loc[seeds].to_numpy()
            p = paired_signflip_test(a, b) if len(seeds) >= 2 else math.nan
            rows.append({"model": model, "stabilizer": stab, "hp": hp, "weight_tying": tied, "precision": prec,
                         "setting": h["setting"].iloc[0], "n_pairs": len(seeds),
                         "mean": float(np.mean(a)) if seeds else math.nan,
                         "reference_mean": float(np.mean(b)) if seeds else math.nan,
                         "diff": float(np.mean(a - b)) if seeds else math.nan, "p_value": p,
                         "significant": None if math.isnan(p) else bool(p < alpha)})
    return pd.DataFrame(rows, columns=cols)
