"""The regime search (issue 15): does a cheap CPU run reach the reference study's logit regime?

The study's untied baselines end with a large positive mean logit and a large mean (log Z)²
(16M at 100k steps: mean logit +588 / +1152 nats and (log Z)² 3.9e5 / 1.7e6 nats² at lr 0.1 / 0.3).
A run *reaches the regime* when it ends with a mean logit >= ``REGIME_LOGIT`` or a mean (log Z)²
>= ``REGIME_LOG2Z`` without diverging. ``regime_table`` says, per run, whether it did, the largest
values its curve saw, and how fast they grew: a power-law fit over the later part of training,
extrapolated to the study's ``STUDY_STEPS``, and a model-free ratio (the end of the run over its
middle). ``figure`` draws the curves, fits and thresholds beside the study's values; ``markdown``
renders the table with a one-line verdict.

Units: logits in nats, (log Z)² in nats², steps are optimizer steps. The statistics of the curves
are those of the training batch logged every ``log_every`` steps (``curves.parquet``); the final
ones are from ``runs.parquet``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

REGIME_LOGIT = 100.0
"""Threshold on the final mean logit (nats): the study's 16M untied baseline at lr 0.03 ends at 92.5, at 0.1 at 588."""
REGIME_LOG2Z = 1e4
"""Threshold on the final mean (log Z)² (nats²): the study's 16M untied baseline at lr 0.03 ends at 1.3e4."""
STUDY_STEPS = 100_000
"""Training length of the study's runs (optimizer steps): the step the fits are extrapolated to."""
FIT_FROM = 0.2
"""The fits use the curve from max(warmup, FIT_FROM · steps done) on: the later part of training."""

RATIO_WINDOW = 0.1
"""Fraction of the run each median of :func:`growth_ratio` spans."""
SMOOTH = 9
"""Logged rows in the rolling median the figure draws over each raw curve."""

STATS = {"logit": "logit_mean", "log2z": "mean_log2z"}
"""Prefix of the table's fit columns -> the curve column fitted (|logit_mean| and mean_log2z)."""

RUN_COLUMNS = ("run_id", "sweep", "model", "data", "vocab_size", "seq_len", "batch_size", "lr", "precision",
               "stabilizer", "weight_tying", "steps_done", "diverged", "logit_mean", "mean_log2z", "mu_norm",
               "mu_hidden_cos")
"""Columns of ``runs.parquet`` the table keeps (missing ones are null)."""


def growth_fit(curve: pd.DataFrame, column: str, steps_from: float) -> tuple[float, float, float]:
    """Power-law fit |value| ≈ a · step^b of ``curve[column]`` over the rows with step >= ``steps_from``.

    Least squares of log|value| = log a + b · log step; rows whose value is zero or not finite (or
    whose step is not positive) are skipped. Returns (exponent b, prefactor a in the column's unit,
    the extrapolation a · STUDY_STEPS^b). All NaN with fewer than 3 usable rows (or a single step).

    A power law is a modelling choice, not a finding: it is the simplest trend with a constant growth
    exponent, and extrapolating it five-fold or more past a run (whose learning rate decays to its end)
    is an order-of-magnitude guide only. :func:`growth_ratio` is the model-free companion.
    """
    if curve.empty or column not in curve.columns:
        return math.nan, math.nan, math.nan
    step = pd.to_numeric(curve["step"], errors="coerce").to_numpy(dtype=float)
    y = np.abs(pd.to_numeric(curve[column], errors="coerce").to_numpy(dtype=float))
    ok = (step >= steps_from) & (step > 0) & np.isfinite(step) & np.isfinite(y) & (y > 0)
    if ok.sum() < 3 or np.unique(step[ok]).size < 2:
        return math.nan, math.nan, math.nan
    b, log_a = np.polyfit(np.log(step[ok]), np.log(y[ok]), 1)
    a = math.exp(log_a)
    return float(b), a, a * STUDY_STEPS ** float(b)


def growth_ratio(curve: pd.DataFrame, column: str, window: float = RATIO_WINDOW) -> float:
    """Model-free growth: median |value| over the last ``window`` of the logged steps, over the median
    |value| over the ``window`` centred on half the last step (> 1 still growing, ~1 saturated).

    Medians over a tenth of the run rather than single rows: the curves are statistics of one training
    batch, noisy from row to row. NaN when either median is zero or not finite, or fewer than 2 rows."""
    if curve.empty or column not in curve.columns:
        return math.nan
    step = pd.to_numeric(curve["step"], errors="coerce").to_numpy(dtype=float)
    y = np.abs(pd.to_numeric(curve[column], errors="coerce").to_numpy(dtype=float))
    ok = np.isfinite(step) & np.isfinite(y)
    step, y = step[ok], y[ok]
    if step.size < 2:
        return math.nan
    last, width = step.max(), window * step.max()
    end = y[step >= last - width]
    mid = y[np.abs(step - last / 2) <= width / 2]
    if mid.size == 0:
        mid = y[[int(np.argmin(np.abs(step - last / 2)))]]
    lo, hi = float(np.median(mid)), float(np.median(end))
    return hi / lo if lo > 0 and math.isfinite(hi / lo) else math.nan


def fit_start(run: pd.Series | dict) -> float:
    """First step of a run's fits: max(warmup, FIT_FROM · steps done) (steps done: else steps)."""
    get = run.get
    done = get("steps_done")
    done = get("steps") if done is None or pd.isna(done) else done
    warmup = get("warmup")
    warmup = 0.0 if warmup is None or pd.isna(warmup) else float(warmup)
    return max(warmup, FIT_FROM * float(done)) if done is not None and not pd.isna(done) else warmup


def regime_table(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run (by sweep, then lr): settings, final statistics, curve maxima, ``reached``, growth fits.

    Columns: ``RUN_COLUMNS`` (final logit_mean, mean_log2z, mu_norm, mu_hidden_cos from runs.parquet);
    ``max_abs_logit_mean`` (nats) and ``max_log2z`` (nats²), the largest |mean logit| and mean (log Z)²
    of its curve; ``reached``: final logit_mean >= REGIME_LOGIT or final mean_log2z >= REGIME_LOG2Z,
    and not diverged; ``fit_from``: first step of the fits (:func:`fit_start`); per statistic
    (prefix ``logit`` for |logit_mean|, ``log2z`` for mean_log2z, see :func:`growth_fit`):
    ``*_exponent`` b, ``*_prefactor`` a, ``*_at_100k`` a · STUDY_STEPS^b, ``*_ratio`` (:func:`growth_ratio`).
    ``logit_at_100k`` carries the sign of the final mean logit: the fit is of its magnitude, but only a
    positive mean logit is the study's regime.
    """
    rows = []
    curves = curves if curves is not None else pd.DataFrame(columns=["run_id", "step"])
    by_run = {rid: c.sort_values("step") for rid, c in curves.groupby("run_id", sort=False)} if len(curves) else {}
    empty = pd.DataFrame(columns=["step", *STATS.values()])
    for _, run in runs.iterrows():
        row = {c: run.get(c) for c in RUN_COLUMNS}
        row["diverged"] = bool(run.get("diverged")) if not pd.isna(run.get("diverged")) else False
        curve = by_run.get(run.get("run_id"), empty)
        logit = pd.to_numeric(curve.get("logit_mean", pd.Series(dtype=float)), errors="coerce").abs()
        log2z = pd.to_numeric(curve.get("mean_log2z", pd.Series(dtype=float)), errors="coerce")
        row["max_abs_logit_mean"] = float(logit.max()) if logit.notna().any() else math.nan
        row["max_log2z"] = float(log2z.max()) if log2z.notna().any() else math.nan
        final_logit, final_log2z = _float(run.get("logit_mean")), _float(run.get("mean_log2z"))
        row["reached"] = bool((final_logit >= REGIME_LOGIT or final_log2z >= REGIME_LOG2Z) and not row["diverged"])
        row["fit_from"] = fit_start(run)
        for prefix, column in STATS.items():
            b, a, at = growth_fit(curve, column, row["fit_from"])
            if prefix == "logit" and final_logit < 0:
                at = -at
            row.update({f"{prefix}_exponent": b, f"{prefix}_prefactor": a, f"{prefix}_at_100k": at,
                        f"{prefix}_ratio": growth_ratio(curve, column)})
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    order = {s: i for i, s in enumerate(dict.fromkeys(out["sweep"].astype(str)))}
    return out.sort_values(["sweep", "lr"], key=lambda c: c.astype(str).map(order) if c.name == "sweep" else c,
                           kind="stable").reset_index(drop=True)


def _float(x: object) -> float:
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def study_baselines(published: pd.DataFrame) -> pd.DataFrame:
    """The study's untied baselines (weight_tying false, stabilizer baseline) with their final mean logit
    (nats) and mean (log Z)² (nats²): columns model, lr, logit_mean, mean_log2z (from the diagnostics CSV)."""
    need = {"model", "stabilizer", "lr", "weight_tying", "logit_mean", "mean_log2z"}
    if missing := need - set(published.columns):
        raise ValueError(f"published results lack column(s) {', '.join(sorted(missing))} (use the diagnostics "
                         "CSV, oec_paper_diagnostics.csv)")
    pub = published[(~published["weight_tying"].astype(bool)) & (published["stabilizer"] == "baseline")]
    return pub[["model", "lr", "logit_mean", "mean_log2z"]].drop_duplicates().reset_index(drop=True)


# -- figure ---------------------------------------------------------------------------------

PANELS = (("logit_mean", "logit", "|mean logit| (nats, log scale)", REGIME_LOGIT),
          ("mean_log2z", "log2z", "mean (log Z)² (nats², log scale)", REGIME_LOG2Z))


def figure(table: pd.DataFrame, curves: pd.DataFrame, study: pd.DataFrame | None = None) -> Figure:
    """Two panels against step (log x, to STUDY_STEPS): |mean logit| and mean (log Z)², both log y.

    One line per run of ``table`` (its curve from ``curves``: raw and faint, with a rolling median of
    ``SMOOTH`` logged rows over it), coloured by peak lr (log colour scale, shared with the study's
    markers), one marker per sweep; its power-law fit dashed from ``fit_from``
    to STUDY_STEPS; the regime thresholds as horizontal lines; with ``study`` (:func:`study_baselines`)
    the study's untied baselines at STUDY_STEPS, a marker per model (hollow: a negative mean logit; the
    models spread a little around STUDY_STEPS so that they do not hide one another).
    """
    import matplotlib as mpl
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D

    from .figures import style
    from .palette import MARKERS

    study = study if study is not None and not study.empty else None
    lrs = [*table["lr"].astype(float)] + ([*study["lr"].astype(float)] if study is not None else [])
    lo, hi = min(lrs, default=1e-3), max(lrs, default=1.0)
    norm = LogNorm(vmin=lo / 1.5 if lo == hi else lo, vmax=hi * 1.5 if lo == hi else hi)
    cmap = mpl.colormaps["viridis"]
    sweeps = list(dict.fromkeys(table["sweep"].astype(str)))
    sweep_marker = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sweeps)}
    study_models = sorted(study["model"].unique(), key=_nominal) if study is not None else []
    study_marker = {m: ("*", "P", "X", "h", "<", ">", "v")[i % 7] for i, m in enumerate(study_models)}
    study_x = {m: STUDY_STEPS * 1.09 ** (i - (len(study_models) - 1) / 2) for i, m in enumerate(study_models)}
    by_run = {rid: c.sort_values("step") for rid, c in curves.groupby("run_id")} if len(curves) else {}
    x_fit = np.geomspace(1.0, STUDY_STEPS, 200)
    with style():
        fig = Figure(figsize=(11.5, 4.4), layout="constrained")
        axes = fig.subplots(1, 2, sharex=True)
        for ax, (column, prefix, ylabel, threshold) in zip(axes, PANELS):
            for r in table.itertuples(index=False):
                color = cmap(norm(r.lr))
                c = by_run.get(r.run_id)
                if c is not None and column in c:
                    y = np.abs(c[column].to_numpy(dtype=float))
                    y = pd.Series(np.where(np.isfinite(y) & (y > 0), y, np.nan), index=c.index)
                    ax.plot(c["step"], y, color=color, linewidth=0.5, alpha=0.3)
                    ax.plot(c["step"], y.rolling(SMOOTH, center=True, min_periods=1).median(), color=color,
                            linewidth=1.4, marker=sweep_marker[str(r.sweep)], markersize=4, markevery=0.1)
                a, b = getattr(r, f"{prefix}_prefactor"), getattr(r, f"{prefix}_exponent")
                if math.isfinite(a) and math.isfinite(b):
                    x = x_fit[x_fit >= r.fit_from]
                    ax.plot(x, a * x ** b, color=color, linestyle=(0, (4, 2)), linewidth=1.0, alpha=0.75)
                if r.diverged and c is not None and len(c):
                    last = c.iloc[-1]
                    ax.plot([last["step"]], [abs(float(last[column]))], marker="x", color="crimson",
                            markersize=8, markeredgewidth=2, linestyle="none", zorder=4)
            ax.axhline(threshold, color="crimson", linewidth=1.2, linestyle="-.", zorder=1)
            ax.text(0.02, threshold, f"regime: {num(threshold)}", color="crimson", fontsize=8, va="bottom",
                    transform=ax.get_yaxis_transform())
            if study is not None:
                for s in study.itertuples(index=False):
                    v = float(getattr(s, column))
                    if not math.isfinite(v) or v == 0:
                        continue
                    color = cmap(norm(s.lr))
                    ax.plot([study_x[s.model]], [abs(v)], marker=study_marker[s.model], markersize=8 if s.model == "16M"
                            else 6, linestyle="none", markeredgecolor="black", markeredgewidth=0.6,
                            color=color if v > 0 else "none", zorder=5)
            ax.axvline(STUDY_STEPS, color="0.6", linewidth=0.8, linestyle=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(80, STUDY_STEPS * 1.5)
            ax.set_xlabel("optimizer step (log scale; study: 100k)")
            ax.set_ylabel(ylabel)
        axes[0].set_title("mean logit of the training batch")
        axes[1].set_title("mean (log Z)² of the training batch")
        handles = [Line2D([], [], color="0.3", marker=sweep_marker[s], markersize=4, linewidth=1.1) for s in sweeps]
        labels = [f"sweep {s}" for s in sweeps]
        handles += [Line2D([], [], color="0.3", linestyle=(0, (4, 2)), linewidth=1.0),
                    Line2D([], [], color="crimson", linestyle="-.", linewidth=1.2)]
        labels += ["power-law fit, extrapolated", "regime threshold"]
        if table["diverged"].any():
            handles.append(Line2D([], [], color="crimson", marker="x", linestyle="none", markeredgewidth=2))
            labels.append("diverged (last logged step)")
        for m in study_models:
            handles.append(Line2D([], [], color="0.5", marker=study_marker[m], markeredgecolor="black",
                                  markersize=7, linestyle="none"))
            labels.append(f"study: {m} untied baseline")
        if study_models:
            handles.append(Line2D([], [], color="none", marker="o", markeredgecolor="black", linestyle="none"))
            labels.append("hollow: negative mean logit")
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="peak learning rate", pad=0.01)
        fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize=8)
    return fig


def _nominal(model: str) -> float:
    from .external import nominal_params

    n = nominal_params(model)
    return n if math.isfinite(n) else math.inf


# -- Markdown -------------------------------------------------------------------------------

def num(x: object) -> str:
    """A number for a table: 3 significant digits, ``1.2e4`` beyond 1e4 or below 1e-2, ``–`` for NaN."""
    v = _float(x)
    if not math.isfinite(v):
        return "–" if math.isnan(v) else str(v)
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
        mantissa, exponent = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _data_label(data: object) -> str:
    """``synthetic:tokens=8000000`` → ``synthetic``; ``text:../x/tiny.txt`` → ``text:tiny.txt``."""
    s = str(data)
    kind, _, rest = s.partition(":")
    return kind if kind == "synthetic" else f"{kind}:{Path(rest).name}" if rest else s


SETTINGS = (("model", "model"), ("data", "data"), ("vocab_size", "V"), ("seq_len", "T"), ("batch_size", "B"),
            ("precision", "precision"), ("stabilizer", "stabilizer"), ("weight_tying", "tied"))
"""Settings shown as table columns when they vary, else once in the header line."""


def markdown(table: pd.DataFrame, study: pd.DataFrame | None = None) -> str:
    """The table in Markdown (settings that do not vary named once above it) and a verdict line."""
    from .tables import to_markdown

    t = table.assign(data=table["data"].map(_data_label),
                     weight_tying=table["weight_tying"].map(lambda w: "tied" if bool(w) else "untied"))
    fixed = [(col, name) for col, name in SETTINGS if t[col].astype(str).nunique() <= 1]
    varying = [(col, name) for col, name in SETTINGS if (col, name) not in fixed]
    out = pd.DataFrame({"sweep": t["sweep"], **{name: t[col].astype(str) for col, name in varying},
                        "lr": t["lr"].map(num), "steps": t["steps_done"].map(lambda s: f"{int(s):,}"),
                        "diverged": t["diverged"].map({True: "yes", False: "no"}),
                        "mean logit": t["logit_mean"].map(num), "max |mean logit|": t["max_abs_logit_mean"].map(num),
                        "(log Z)²": t["mean_log2z"].map(num), "max (log Z)²": t["max_log2z"].map(num),
                        "‖μ‖": t["mu_norm"].map(num), "cos(μ, h)": t["mu_hidden_cos"].map(num),
                        "logit b": t["logit_exponent"].map(num), "logit @100k": t["logit_at_100k"].map(num),
                        "logit end/half": t["logit_ratio"].map(num),
                        "(log Z)² b": t["log2z_exponent"].map(num), "(log Z)² @100k": t["log2z_at_100k"].map(num),
                        "(log Z)² end/half": t["log2z_ratio"].map(num),
                        "reached": t["reached"].map({True: "**yes**", False: "no"})})
    head = ", ".join(str(t[col].iloc[0]) if col in ("weight_tying", "precision", "stabilizer", "model", "data")
                     else f"{name} = {t[col].iloc[0]}" for col, name in fixed) if len(t) else ""
    parts = [f"Regime search: {len(t)} run(s){f' (all: {head})' if head else ''}. Regime: final mean logit >= "
             f"{num(REGIME_LOGIT)} nats or mean (log Z)² >= {num(REGIME_LOG2Z)} nats², not diverged. b: exponent of "
             f"the power-law fit |x| ≈ a·step^b from max(warmup, {FIT_FROM:.0%} of the steps) on; @100k: that fit "
             f"at {STUDY_STEPS:,} steps (the study's length; signed by the final mean logit); end/half: last "
             "logged tenth of the run over the tenth around its half (medians).", "", to_markdown(out).rstrip("\n"), ""]
    if study is not None and not study.empty:
        parts += [_study_line(study), ""]
    parts += [verdict(table), ""]
    return "\n".join(parts)


def _study_line(study: pd.DataFrame) -> str:
    """The study's untied baselines of its smallest model, for scale."""
    model = min(study["model"].unique(), key=_nominal)
    s = study[study["model"] == model].sort_values("lr")
    values = "; ".join(f"lr {num(r.lr)}: {num(r.logit_mean)} / {num(r.mean_log2z)}" for r in s.itertuples())
    return f"Study, {model} untied baseline at {STUDY_STEPS:,} steps (mean logit / (log Z)²): {values}."


def verdict(table: pd.DataFrame) -> str:
    """One line: which runs reached the regime, or, if none, the largest extrapolations against the thresholds."""
    if table.empty:
        return "**Verdict:** no runs."
    hit = table[table["reached"]]
    if len(hit):
        which = ", ".join(f"{r.sweep} lr {num(r.lr)}" for r in hit.itertuples())
        return f"**Verdict:** {len(hit)} of {len(table)} run(s) reached the regime ({which})."
    ok = table[~table["diverged"]]

    def top(column: str) -> str:
        v = ok[column].where(np.isfinite(ok[column]))
        if v.notna().sum() == 0:
            return "– (no fit)"
        r = ok.loc[v.idxmax()]
        return f"{num(r[column])} ({r['sweep']}, lr {num(r['lr'])})"

    return (f"**Verdict:** no run reached the regime. Largest extrapolation to {STUDY_STEPS:,} steps among the "
            f"{len(ok)} run(s) that did not diverge: mean logit {top('logit_at_100k')} against {num(REGIME_LOGIT)}; "
            f"(log Z)² {top('log2z_at_100k')} against {num(REGIME_LOG2Z)}.")
