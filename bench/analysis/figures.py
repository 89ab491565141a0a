"""Figures of a sweep (matplotlib object API + seaborn; no pyplot state, so any backend works).

Each figure function takes a runs frame (and curves / published runs where it needs them)
and returns a :class:`matplotlib.figure.Figure`, or raises :class:`SkipFigure` with the
reason when the data cannot show it (one model size, no diverged run, no λ grid, …).
Conventions: one fixed colour per stabilizer (:mod:`bench.analysis.palette`), log-scaled
learning-rate axes, axes labelled with units, legends outside the data area.
Losses are the treated losses of the LRS formula: a diverged or non-finite run is drawn
at L0 with a × marker.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .metrics import lrs_table, stats_vs_lr
from .palette import LINESTYLES, MARKERS, stabilizer_colors
from .results import HP_SYMBOLS, format_value, model_order, prepare_runs, setting_order, stabilizer_label, stabilizer_order

LR_LABEL = "peak learning rate (log scale)"
LOSS_LABEL = "final validation loss (nats)"
DPI = 150


class SkipFigure(Exception):
    """The data cannot show this figure; ``str()`` says why."""


@contextmanager
def style() -> Iterator[None]:
    """seaborn's whitegrid style and paper context, for figures created inside the block."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.15),
          "axes.titlesize": 11, "legend.fontsize": 9, "legend.title_fontsize": 9.5,
          "savefig.dpi": DPI, "figure.dpi": 100, "pdf.fonttype": 42}
    with mpl.rc_context(rc):
        yield


def _figure(nrows: int, ncols: int, panel: tuple[float, float] = (3.6, 2.8), extra_w: float = 2.4,
            **subplot_kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(panel[0] * ncols + extra_w, panel[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def params_label(n: float) -> str:
    """29808 → ``30k``, 3.77e6 → ``3.8M``, 1.6e7 → ``16M``."""
    if n is None or not math.isfinite(n):
        return "?"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.2g}{suffix}" if v < 10 else f"{v:.0f}{suffix}"
    return f"{n:.0f}"


def model_labels(runs: pd.DataFrame) -> dict[str, str]:
    """``nano (30k params)``; just the name when it already says the size (``16M``)."""
    out = {}
    for m in model_order(runs):
        n = runs.loc[runs["model"] == m, "n_params"].max() if "n_params" in runs.columns else math.nan
        label = params_label(n)
        out[m] = m if label == m or not math.isfinite(n) else f"{m} ({label} params)"
    return out


def model_colors(models: list[str]) -> dict[str, tuple[float, float, float]]:
    """A sequential palette over model sizes (small = light, large = dark)."""
    pal = sns.color_palette("viridis_r", n_colors=max(len(models), 2) + 1)[1:]
    return {m: pal[i] for i, m in enumerate(models)}


def setting_styles(runs: pd.DataFrame) -> dict[str, dict]:
    """Colour (the stabilizer's), line style and marker (by hyperparameter value) of each setting."""
    colors = stabilizer_colors(runs["stabilizer"].unique())
    out: dict[str, dict] = {}
    seen: dict[str, int] = {}
    stab_of = runs.drop_duplicates("setting").set_index("setting")["stabilizer"]
    for s in setting_order(runs):
        stab = stab_of[s]
        k = seen.get(stab, 0)
        seen[stab] = k + 1
        out[s] = {"color": colors[stab], "linestyle": LINESTYLES[k % len(LINESTYLES)],
                  "marker": MARKERS[k % len(MARKERS)]}
    return out


def _readable_log_ticks(axis, label: Callable[[float], str]) -> None:
    """Plain tick labels on a log axis (``0.15``, ``30k`` instead of 1.5×10⁻¹); minor ticks are
    labelled only when the axis spans less than one decade (else they would crowd)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = axis.get_view_interval()
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))
    narrow = lo > 0 and hi / lo < 10
    axis.set_minor_formatter(FuncFormatter(lambda v, _: label(v)) if narrow else NullFormatter())


def _spans_decade(values: pd.Series) -> bool:
    """True when the positive finite values span more than a factor of 10 (a log axis helps)."""
    v = pd.to_numeric(values, errors="coerce")
    v = v[np.isfinite(v) & (v > 0)]
    return bool(len(v)) and float(v.max() / v.min()) > 10


def _lr_ticks(axes: np.ndarray) -> None:
    """Learning rates as plain numbers (0.001, 0.01, …) on every visible log-scaled lr axis."""
    for ax in axes.flat:
        if ax.get_visible():
            _readable_log_ticks(ax.xaxis, "{:g}".format)


def _legend(fig: Figure, handles: list, labels: list[str], title: str | None = None) -> None:
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title=title, frameon=False)


def _l0_line(ax, L0: float) -> None:
    ax.axhline(L0, color="0.45", linestyle=(0, (4, 3)), linewidth=1.0, zorder=1)


def _loss_top(loss: np.ndarray, failed: np.ndarray, L0: float) -> float:
    """Top of the linear part of a loss axis: L0 when it is within 3 nats of the best loss, else
    best + 2 nats (so a large vocabulary's L0 ≈ 10.8 does not squash curves near 3). Above it the
    axis is compressed up to L0 (:func:`_loss_axis`), so nothing is clipped."""
    ok = loss[~failed & np.isfinite(loss)]
    best = float(ok.min()) if ok.size else L0
    return L0 if L0 <= best + 3.0 else best + 2.0


BAND = 0.18
"""Height of the compressed band [top, L0] of a loss axis, as a fraction of the linear part."""
BAND_COLOR = "#efe9dc"
DIVERGED_LABEL = "L0 = ln V: diverged / non-finite (×)"


def _loss_axis(axes, bottom: float, top: float, L0: float) -> bool:
    """Loss axes that always show L0: linear up to ``top``; when L0 > ``top`` the range [top, L0] is
    squeezed into a shaded band of height :data:`BAND` (a broken axis on one Axes), so a diverged run
    sits at its true value L0 and a loss between ``top`` and L0 at its (compressed) true value.
    Returns True when the axis is broken."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    axes = [ax for ax in np.ravel(axes)]
    broken = L0 > top + 1e-9
    ticks = [t for t in MaxNLocator(nbins=5).tick_values(bottom, top) if bottom - 1e-9 <= t <= top + 1e-9]
    if broken:
        k = BAND * (top - bottom) / (L0 - top)

        def fwd(y):
            y = np.asarray(y, dtype=float)
            return np.where(y <= top, y, top + (y - top) * k)

        def inv(z):
            z = np.asarray(z, dtype=float)
            return np.where(z <= top, z, top + (z - top) / k)

    for ax in axes:
        if broken:
            ax.set_yscale("function", functions=(fwd, inv))
            ax.axhspan(top, L0, color=BAND_COLOR, zorder=0, linewidth=0)
            ax.axhline(top, color="0.55", linewidth=0.8, linestyle=(0, (1, 1.5)), zorder=1)
        ax.set_ylim(bottom, L0 + (0.03 * (L0 - bottom) if not broken else 0.25 * (L0 - top)))
        ax.yaxis.set_major_locator(FixedLocator(ticks + ([L0] if broken or all(abs(t - L0) > 0.2 for t in ticks)
                                                         else [])))
        ax.yaxis.set_minor_locator(FixedLocator([]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"L0 {v:.2f}" if abs(v - L0) < 1e-9 else f"{v:g}"))
    return broken


def _plot_loss_curve(ax, lr: np.ndarray, loss: np.ndarray, failed: np.ndarray, L0: np.ndarray | float,
                     se: np.ndarray | None, **line_kw) -> Line2D:
    """A treated-loss curve at its true values; failed points (diverged / non-finite) at L0 as ×."""
    order = np.argsort(lr)
    lr, loss, failed = lr[order], loss[order], failed[order]
    L0 = np.broadcast_to(np.asarray(L0, dtype=float), loss.shape)[order] if np.ndim(L0) else np.full(loss.shape, L0)
    shown = np.where(failed, L0, np.minimum(loss, L0))
    (line,) = ax.plot(lr, shown, markersize=4.5, linewidth=1.6, **line_kw)
    color = line.get_color()
    if se is not None:
        se = se[order]
        ok = np.isfinite(se) & ~failed
        ax.fill_between(lr[ok], (shown - se)[ok], np.minimum(shown + se, L0)[ok], color=color, alpha=0.15,
                        linewidth=0)
    if failed.any():
        ax.plot(lr[failed], shown[failed], linestyle="none", marker="x", color=color, markersize=8,
                markeredgewidth=2, clip_on=False, gid="diverged")
    return line


def _loss_by_lr(g: pd.DataFrame) -> pd.DataFrame:
    """Per lr: mean treated loss over seeds, its SE (NaN for one seed), any failure."""
    per_seed = g.groupby(["lr", "seed"]).agg(loss=("loss", "mean"), failed=("failed", "any")).reset_index()
    out = per_seed.groupby("lr").agg(loss=("loss", "mean"), sd=("loss", "std"), n=("loss", "size"),
                                     failed=("failed", "all")).reset_index()
    out["se"] = out["sd"] / np.sqrt(out["n"])
    return out


def _marker_legend(runs: pd.DataFrame, broken: bool, top: float = math.nan) -> tuple[list, list[str]]:
    """Legend entries for the L0 line with its × (diverged) and the compressed band."""
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color="0.45", linestyle=(0, (4, 3)),
                      **({"marker": "x", "markersize": 7, "markeredgewidth": 2, "markeredgecolor": "0.3"}
                         if runs["failed"].any() else {}))]
    labels = [DIVERGED_LABEL if runs["failed"].any() else "L0 = ln V (loss at init)"]
    if broken:
        handles.append(Patch(facecolor=BAND_COLOR, edgecolor="0.55", linewidth=0.6))
        labels.append(f"axis compressed: {top:.2f} to L0" if math.isfinite(top) else "axis compressed up to L0")
    return handles, labels


# -- figures --------------------------------------------------------------------------------

def loss_vs_lr(runs: pd.DataFrame, title: str = "") -> Figure:
    """Final loss vs learning rate: a panel per stabilizer setting, a line per model size.

    Diverged / non-finite runs are drawn as × at L0 on the dashed L0 line; when L0 is far above the
    best loss the axis is compressed (shaded band) between the top of the curves and L0."""
    runs = prepare_runs(runs)
    if runs["lr"].nunique() < 2:
        raise SkipFigure("needs at least two learning rates")
    settings = setting_order(runs)
    models = model_order(runs)
    colors, labels = model_colors(models), model_labels(runs)
    L0max = float(runs["L0"].max())
    top = _loss_top(runs["loss"].to_numpy(), runs["failed"].to_numpy(), L0max)
    nrows = math.ceil(len(settings) / 4)
    ncols = math.ceil(len(settings) / nrows)  # balanced: 5 panels as 3 + 2, not 4 + 1
    with style():
        fig, axes = _figure(nrows, ncols, sharex=True, sharey=True)
        stab_colors = stabilizer_colors(runs["stabilizer"].unique())
        lows = []
        for ax, s in zip(axes.flat, settings):
            sub = runs[runs["setting"] == s]
            for m in models:
                g = sub[sub["model"] == m]
                if g.empty:
                    continue
                c = _loss_by_lr(g)
                lows.append(float((c["loss"] - c["se"].fillna(0)).min()))
                _plot_loss_curve(ax, c["lr"].to_numpy(), c["loss"].to_numpy(), c["failed"].to_numpy(),
                                 float(g["L0"].max()), c["se"].to_numpy() if (c["n"] > 1).any() else None,
                                 color=colors[m], marker="o")
            for L0 in sub["L0"].unique():
                _l0_line(ax, L0)
            ax.set_title(s, color=stab_colors[sub["stabilizer"].iloc[0]], fontweight="bold")
            ax.set_xscale("log")
        for ax in axes.flat[len(settings):]:
            ax.set_visible(False)
        bottom = _loss_bottom(lows, top)
        broken = _loss_axis(axes.flat[:len(settings)], bottom, top, L0max)
        for ax in axes[:, 0]:
            ax.set_ylabel(LOSS_LABEL)
        for ax in axes[-1, :]:
            ax.set_xlabel(LR_LABEL)
        for i, ax in enumerate(axes.flat[:len(settings)]):  # x labels on the last visible row of each column
            if i + ncols >= len(settings):
                ax.set_xlabel(LR_LABEL)
                ax.xaxis.set_tick_params(labelbottom=True)
        _lr_ticks(axes)
        handles = [Line2D([], [], color=colors[m], marker="o") for m in models]
        extra_h, extra_l = _marker_legend(runs, broken, top)
        _legend(fig, handles + extra_h, [labels[m] for m in models] + extra_l, title="model")
        if title:
            fig.suptitle(title)
    return fig


def _loss_bottom(lows: list[float], top: float) -> float:
    """Bottom of a loss axis: a little below the lowest point (or band) drawn."""
    finite = [v for v in lows if math.isfinite(v)]
    lo = min(finite) if finite else top - 1.0
    return lo - 0.05 * max(top - lo, 0.5)


def _per_setting_lines(ax, data: pd.DataFrame, value: str, styles: dict[str, dict]) -> None:
    for s, g in data.groupby("setting", sort=False):
        g = g.sort_values("lr")
        st = styles[s]
        ax.plot(g["lr"], g[value], color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                markersize=4.5, linewidth=1.5)
        bad = g[g["n_diverged"] > 0]
        if not bad.empty:
            ax.plot(bad["lr"], bad[value], linestyle="none", marker="x", color=st["color"], markersize=8,
                    markeredgewidth=2)


def _setting_legend(fig: Figure, settings: list[str], styles: dict[str, dict], diverged: bool) -> None:
    handles = [Line2D([], [], color=styles[s]["color"], linestyle=styles[s]["linestyle"],
                      marker=styles[s]["marker"]) for s in settings]
    labels = list(settings)
    if diverged:
        handles.append(Line2D([], [], color="0.3", marker="x", linestyle="none", markersize=7, markeredgewidth=2))
        labels.append("includes diverged runs")
    _legend(fig, handles, labels, title="stabilizer")


def _published_like(runs: pd.DataFrame, published: pd.DataFrame | None, columns: list[str]) -> pd.DataFrame | None:
    """The published rows that carry any of ``columns``, restricted to the settings drawn locally
    (same stabilizer, hyperparameter and tying), or None."""
    if published is None or published.empty or not any(c in published.columns for c in columns):
        return None
    pub = prepare_runs(published)
    local = set(zip(runs["stabilizer"], runs["hp"], runs["weight_tying"].astype(bool)))
    keep = [t in local for t in zip(pub["stabilizer"], pub["hp"], pub["weight_tying"].astype(bool))]
    pub = pub[keep]
    return pub if not pub.empty else None


def _stat_vs_lr_figure(runs: pd.DataFrame, panels: list[tuple[str, str, str]],
                       published: pd.DataFrame | None = None) -> Figure:
    """Rows = models, columns = ``panels`` (column, y label, y scale), a line per setting.

    With ``published`` rows (``--compare``) that carry these columns, their models follow as
    extra rows (titled "… (published)"), drawn in the local settings' styles: the same
    statistic of the study's runs beside ours, each row on its own y axis."""
    runs = prepare_runs(runs)
    cols = [p[0] for p in panels]
    present = [p for p in panels if p[0] in runs.columns and pd.to_numeric(runs[p[0]], errors="coerce").notna().any()]
    if not present:
        raise SkipFigure(f"runs carry no {' / '.join(cols)} (published results have final losses only)")
    pub = _published_like(runs, published, cols)
    groups = [(m, stats_vs_lr(runs[runs["model"] == m], cols), False) for m in model_order(runs)]
    if pub is not None:
        groups += [(m, stats_vs_lr(pub[pub["model"] == m], cols), True) for m in model_order(pub)]
    labels = model_labels(runs)
    styles = setting_styles(runs)
    label_of = dict(zip(zip(runs["stabilizer"], runs["hp"], runs["weight_tying"].astype(bool)), runs["setting"]))
    with style():
        fig, axes = _figure(len(groups), len(present), panel=(4.2, 2.9), sharex=True)
        for i, (m, data, is_pub) in enumerate(groups):
            if is_pub:  # published labels may lack local suffixes: draw them under the local setting's name
                data = data.assign(setting=[label_of[t] for t in zip(data["stabilizer"], data["hp"],
                                                                        data["weight_tying"].astype(bool))])
            for j, (col, ylabel, yscale) in enumerate(present):
                ax = axes[i, j]
                values = data[col].abs() if col in data.columns else pd.Series(dtype=float)
                if not values.notna().any():
                    ax.text(0.5, 0.5, "not published" if is_pub else "no data", ha="center", va="center",
                            transform=ax.transAxes, color="0.4")
                else:
                    _per_setting_lines(ax, data.dropna(subset=[col]), col, styles)
                ax.set_xscale("log")
                if yscale == "symlog":  # symlog only when diverged runs blow values up
                    wide = values.max() > 100
                    if wide:
                        ax.set_yscale("symlog", linthresh=1.0)
                else:  # log only when values span more than a decade
                    wide = _spans_decade(values.dropna())
                    if wide:
                        ax.set_yscale("log")
                        _readable_log_ticks(ax.yaxis, "{:g}".format)
                ax.set_ylabel(ylabel.format(scale={"symlog": "symlog", "log": "log"}[yscale] + " scale"
                                            if wide else "linear scale"))
                title = labels.get(m, m) if not is_pub else f"{m} (published)"
                ax.set_title(title if len(groups) > 1 else "")
                if i == len(groups) - 1:
                    ax.set_xlabel(LR_LABEL)
        _lr_ticks(axes)
        _setting_legend(fig, [s for s in setting_order(runs)], styles, bool(runs["failed"].any()))
    return fig


def logits_vs_lr(runs: pd.DataFrame, published: pd.DataFrame | None = None) -> Figure:
    """Mean logit and max |logit| (final validation batches) vs learning rate; the study's mean
    logit beside ours when ``published`` carries it."""
    return _stat_vs_lr_figure(runs, [("logit_mean", "mean logit (nats, {scale})", "symlog"),
                                     ("logit_absmax", "max |logit| (nats, {scale})", "log")], published)


def mu_norm_vs_lr(runs: pd.DataFrame, published: pd.DataFrame | None = None) -> Figure:
    """‖μ‖, the norm of the mean output-embedding row, vs learning rate (the study's beside ours)."""
    return _stat_vs_lr_figure(runs, [("mu_norm", "‖μ‖ (L2 norm, {scale})", "log")], published)


def log2z_vs_lr(runs: pd.DataFrame, published: pd.DataFrame | None = None) -> Figure:
    """Mean over tokens of (log Z)², the quantity z-loss penalizes, vs learning rate (the study's beside ours)."""
    return _stat_vs_lr_figure(runs, [("mean_log2z", "mean (log Z)² ({scale})", "log")], published)


def lrs_vs_size(runs: pd.DataFrame, published: pd.DataFrame | None = None) -> Figure:
    """LRS vs model size (log-log), a line per stabilizer setting; published runs dashed beside them."""
    runs = prepare_runs(runs)
    sources = [("local", lrs_table(runs), runs)]
    if published is not None and not published.empty:
        pub = prepare_runs(published)
        sources.append(("published", lrs_table(pub), pub))
    all_runs = pd.concat([r for _, _, r in sources], ignore_index=True)
    colors = stabilizer_colors(all_runs["stabilizer"].unique())
    lines, dropped = [], 0  # (source, setting, stabilizer, style, points)
    for src, table, r in sources:
        styles = setting_styles(r)
        stab_of = r.drop_duplicates("setting").set_index("setting")["stabilizer"]
        for s in setting_order(r):
            t = table[(table["setting"] == s) & table["n_params"].notna() & table["lrs"].notna()]
            positive = t[t["lrs"] > 0].sort_values("n_params")
            dropped += len(t) - len(positive)
            if not positive.empty:
                lines.append((src, s, stab_of[s], styles[s], positive))
    if not any(pts["n_params"].nunique() >= 2 for *_, pts in lines):
        raise SkipFigure("needs the LRS of one stabilizer at two or more model sizes (n_params)")
    with style():
        fig, axes = _figure(1, 1, panel=(5.6, 4.0), extra_w=3.2)
        ax = axes[0, 0]
        handles, labels = [], []
        for src, s, stab, st, pts in lines:
            kw = dict(color=colors[stab], marker=st["marker"],
                      linestyle=st["linestyle"] if src == "local" else (0, (2, 2)), linewidth=1.6)
            if src == "published":
                kw.update(markerfacecolor="white", linewidth=1.1, alpha=0.9)
            (line,) = ax.plot(pts["n_params"], pts["lrs"], **kw)
            handles.append(line)
            labels.append(s if len(sources) == 1 else f"{s} [{src}]")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _readable_log_ticks(ax.yaxis, "{:g}".format)
        _readable_log_ticks(ax.xaxis, params_label)
        ax.set_xlabel("model size (parameters, log scale)")
        ax.set_ylabel("LR sensitivity (nats, log scale)")
        if dropped:
            ax.set_title(f"{dropped} point(s) with LRS = 0 not shown (log axis)", fontsize=9)
        _legend(fig, handles, labels, title="stabilizer")
    return fig


VALUE_MARKERS = ("o", "s", "D", "^", "v", "P", "*", "h", "<", ">")
"""Markers of hyperparameter values: none is reused, none looks like the × of a diverged run."""


def value_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` colours from viridis trimmed to [0, 0.82]: dark purple to green, every one readable on white."""
    cmap = mpl.colormaps["viridis"]
    return [tuple(cmap(x)[:3]) for x in (np.linspace(0.0, 0.82, n) if n > 1 else [0.0])]


def lambda_sensitivity(runs: pd.DataFrame, title: str = "") -> Figure:
    """Loss vs learning rate per λ: stabilizers with a hyperparameter grid side by side, a row per model.

    A hyperparameter value has one colour (viridis, small → dark) and one marker in every panel, so the
    same λ reads the same for z-loss and μ-loss. Diverged points are × at L0, as in :func:`loss_vs_lr`."""
    runs = prepare_runs(runs)
    scalar = runs[(runs["hp_name"] != "") & ~runs["hp_name"].str.contains(",")]
    counts = scalar.groupby("stabilizer")["hp_value"].nunique()
    stabs = stabilizer_order([s for s in counts.index if counts[s] >= 2])
    if not stabs:
        raise SkipFigure("no stabilizer was run with two or more values of its hyperparameter (λ)")
    models = [m for m in model_order(runs) if m in set(scalar[scalar["stabilizer"].isin(stabs)]["model"])]
    labels = model_labels(runs)
    colors = stabilizer_colors(runs["stabilizer"].unique())
    sub_all = scalar[scalar["stabilizer"].isin(stabs)]
    L0max = float(sub_all["L0"].max())
    top = _loss_top(sub_all["loss"].to_numpy(), sub_all["failed"].to_numpy(), L0max)
    keys = sorted({(n, v) for n, v in zip(sub_all["hp_name"], sub_all["hp_value"])})  # (name, value)
    vcol = dict(zip(keys, value_colors(len(keys))))
    vmark = {k: VALUE_MARKERS[i % len(VALUE_MARKERS)] for i, k in enumerate(keys)}
    with style():
        fig, axes = _figure(len(models), len(stabs), panel=(4.0, 2.8), extra_w=2.6, sharex=True, sharey=True)
        lows = []
        for j, stab in enumerate(stabs):
            mine = scalar[scalar["stabilizer"] == stab]
            name = mine["hp_name"].iloc[0]
            for i, m in enumerate(models):
                ax = axes[i, j]
                for v in sorted(mine["hp_value"].unique()):
                    g = mine[(mine["model"] == m) & (mine["hp_value"] == v)]
                    if g.empty:
                        continue
                    c = _loss_by_lr(g)
                    lows.append(float(c["loss"].min()))
                    _plot_loss_curve(ax, c["lr"].to_numpy(), c["loss"].to_numpy(), c["failed"].to_numpy(),
                                     float(g["L0"].max()), None, color=vcol[(name, v)], marker=vmark[(name, v)])
                for L0 in runs.loc[runs["model"] == m, "L0"].unique():
                    _l0_line(ax, L0)
                ax.set_xscale("log")
                ax.set_title(f"{stabilizer_label(stab)} — {labels[m]}" if len(models) > 1 else stabilizer_label(stab),
                             color=colors[stab], fontweight="bold")
                if j == 0:
                    ax.set_ylabel(LOSS_LABEL)
                if i == len(models) - 1:
                    ax.set_xlabel(LR_LABEL)
        broken = _loss_axis(axes, _loss_bottom(lows, top), top, L0max)
        _lr_ticks(axes)
        handles = [Line2D([], [], color=vcol[k], marker=vmark[k]) for k in keys]
        leg_labels = [f"{HP_SYMBOLS.get(n, n)} = {format_value(v)}" for n, v in keys]
        extra_h, extra_l = _marker_legend(sub_all, broken, top)
        _legend(fig, handles + extra_h, leg_labels + extra_l, title="hyperparameter")
        if title:
            fig.suptitle(title)
    return fig


WORST_K = 5
"""Diverged runs drawn individually per stabilizer panel in :func:`diverging_curves` (the rest thin grey)."""


def _run_label(r) -> str:
    """``micro, lr=3, seed 2`` preceded by what the setting adds to the stabilizer (``λ=1e-4, tied``)."""
    extra = str(getattr(r, "setting", "")).replace(stabilizer_label(r.stabilizer), "", 1)
    extra = extra.replace("(", "").replace(")", "").strip(" ,")
    return ", ".join([*([extra] if extra else []), str(r.model), f"lr={r.lr:g}", f"seed {r.seed}"])


def diverging_curves(runs: pd.DataFrame, curves: pd.DataFrame, worst: int = WORST_K) -> Figure:
    """Training loss vs step of the diverged runs (from curves.parquet): a panel per stabilizer.

    In each panel the ``worst`` runs (highest peak training loss; non-finite counts as highest) are
    drawn in the stabilizer's colour, one line style and marker each, named in the panel's legend;
    every other diverged run of that stabilizer is a thin grey line. × marks the step where divergence
    was detected, on the curve."""
    runs = prepare_runs(runs)
    bad = runs[runs["failed"]]
    if bad.empty:
        raise SkipFigure("no run diverged")
    if curves is None or curves.empty or "run_id" not in bad.columns:
        raise SkipFigure("no training curves (curves.parquet) for the diverged runs")
    cur = curves[curves["run_id"].isin(bad["run_id"])]
    if cur.empty:
        raise SkipFigure("curves.parquet has no rows of the diverged runs")
    bad = bad[bad["run_id"].isin(cur["run_id"])]
    colors = stabilizer_colors(runs["stabilizer"].unique())
    stabs = stabilizer_order(bad["stabilizer"].unique())
    by_run = {rid: c.sort_values("step") for rid, c in cur.groupby("run_id", sort=False)}

    def peak(rid: str) -> float:
        y = by_run[rid]["train_loss"].to_numpy(dtype=float)
        return math.inf if (~np.isfinite(y)).any() else float(np.max(y)) if y.size else -math.inf

    ncols = min(len(stabs), 3)
    nrows = math.ceil(len(stabs) / ncols)
    log = _spans_decade(cur["train_loss"].abs())
    with style():
        fig, axes = _figure(nrows, ncols, panel=(4.3, 3.3), extra_w=2.6, sharex=True, sharey=True)
        n_grey = 0
        for ax, stab in zip(axes.flat, stabs):
            mine = bad[bad["stabilizer"] == stab].copy()
            mine["_peak"] = [peak(r) for r in mine["run_id"]]
            mine = mine.sort_values(["_peak", "lr", "seed"], ascending=[False, False, True])
            top_runs, rest = mine.head(worst), mine.iloc[worst:]
            for r in rest.itertuples(index=False):
                c = by_run[r.run_id]
                y = c["train_loss"].to_numpy(dtype=float)
                ax.plot(c["step"], np.where(np.isfinite(y) & (y > 0), y, np.nan), color="0.6", linewidth=0.7,
                        alpha=0.6, zorder=2, gid="rest")
            n_grey += len(rest)
            handles, labels = [], []
            for k, r in enumerate(top_runs.itertuples(index=False)):
                c = by_run[r.run_id]
                y = c["train_loss"].to_numpy(dtype=float)
                y = np.where(np.isfinite(y) & (y > 0), y, np.nan)
                (line,) = ax.plot(c["step"], y, color=colors[stab], linestyle=LINESTYLES[k % len(LINESTYLES)],
                                  marker=VALUE_MARKERS[k % len(VALUE_MARKERS)], markersize=3.5, linewidth=1.5,
                                  zorder=3, gid="worst")
                handles.append(line)
                labels.append(_run_label(r))
                dstep = getattr(r, "diverged_step", None)
                ok = np.isfinite(y)
                if dstep is not None and not pd.isna(dstep) and ok.any():  # on the curve, between logged steps
                    y_at = np.exp(np.interp(dstep, c["step"].to_numpy()[ok], np.log(y[ok])))
                    ax.plot([dstep], [y_at], marker="x", color=colors[stab], markersize=8, markeredgewidth=2,
                            linestyle="none", zorder=4)
            if len(rest):
                handles.append(Line2D([], [], color="0.6", linewidth=0.7))
                labels.append(f"{len(rest)} other diverged run(s)")
            for L0 in mine["L0"].unique():
                _l0_line(ax, L0)
            ax.set_title(f"{stabilizer_label(stab)}: {len(mine)} diverged", color=colors[stab], fontweight="bold")
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.0, -0.3),
                      fontsize=7.5, frameon=False, handlelength=3.2, borderaxespad=0.0)
        for ax in axes.flat[len(stabs):]:
            ax.set_visible(False)
        if log:
            for ax in axes.flat[:len(stabs)]:
                ax.set_yscale("log")
                _readable_log_ticks(ax.yaxis, "{:g}".format)
        for ax in axes[:, 0]:
            ax.set_ylabel(f"training loss (nats, {'log' if log else 'linear'} scale)")
        for i, ax in enumerate(axes.flat[:len(stabs)]):
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_tick_params(labelbottom=True)
        handles = [Line2D([], [], color="0.45", linestyle=(0, (4, 3))),
                   Line2D([], [], color="0.3", marker="x", linestyle="none", markeredgewidth=2),
                   *[Line2D([], [], color="0.3", linestyle=LINESTYLES[k % len(LINESTYLES)],
                            marker=VALUE_MARKERS[k % len(VALUE_MARKERS)], markersize=3.5) for k in range(worst)]]
        labels = ["L0 = ln V", "divergence detected (step)",
                  *[f"{_ordinal(k + 1)} highest peak loss" for k in range(worst)]]
        if n_grey:
            handles.append(Line2D([], [], color="0.6", linewidth=0.7))
            labels.append("other diverged runs")
        _legend(fig, handles, labels, title=f"{len(bad)} diverged runs")
    return fig


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def divergence_map(runs: pd.DataFrame) -> Figure:
    """Fraction of diverged runs per learning rate × stabilizer setting, a panel per model."""
    runs = prepare_runs(runs)
    models, labels = model_order(runs), model_labels(runs)
    settings = setting_order(runs)
    lrs = sorted(runs["lr"].unique())
    with style():
        fig, axes = _figure(1, len(models), panel=(0.55 * len(lrs) + 1.2, 0.42 * len(settings) + 1.0),
                            extra_w=2.4 + 0.6 * len(models))
        for j, m in enumerate(models):
            ax = axes[0, j]
            g = runs[runs["model"] == m]
            agg = g.groupby(["setting", "lr"]).agg(n=("failed", "size"), k=("failed", "sum")).reset_index()
            rate = agg.pivot(index="setting", columns="lr", values="k") / agg.pivot(index="setting", columns="lr",
                                                                                  values="n")
            rate = rate.reindex(index=settings, columns=lrs)
            annot = (agg.assign(t=agg["k"].astype(int).astype(str) + "/" + agg["n"].astype(str))
                     .pivot(index="setting", columns="lr", values="t").reindex(index=settings, columns=lrs)
                     .fillna(""))
            sns.heatmap(rate.astype(float), ax=ax, vmin=0, vmax=1, cmap="Reds", annot=annot.to_numpy(), fmt="",
                        linewidths=0.5, linecolor="white", cbar=j == len(models) - 1,
                        cbar_kws={"label": "fraction of runs diverged"}, annot_kws={"fontsize": 8},
                        xticklabels=[f"{x:g}" for x in lrs], yticklabels=settings if j == 0 else False)
            ax.set_xlabel("peak learning rate")
            ax.set_ylabel("stabilizer" if j == 0 else "")
            ax.set_title(labels[m])
            ax.tick_params(axis="x", rotation=45)
            ax.tick_params(axis="y", rotation=0)
    return fig


# -- all figures of a results directory -----------------------------------------------------

@dataclass
class FigureSpec:
    name: str
    caption: str
    draw: Callable[..., Figure]


@dataclass
class Drawn:
    """One figure of :func:`draw_all`: ``fig`` is None when skipped, ``note`` says why."""

    name: str
    caption: str
    fig: Figure | None = None
    note: str = ""
    files: list[Path] = field(default_factory=list)


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("loss_vs_lr", "Final validation loss vs peak learning rate, a panel per stabilizer setting and a "
               "line per model size (mean over seeds, band ± SE).", lambda r, c, p: loss_vs_lr(r)),
    FigureSpec("lrs_vs_size", "LR sensitivity vs model size (log-log); published results dashed with open "
               "markers when given.", lambda r, c, p: lrs_vs_size(r, p)),
    FigureSpec("lambda_sensitivity", "λ sensitivity: loss vs learning rate for each hyperparameter value, "
               "stabilizers side by side (z-loss vs μ-loss).", lambda r, c, p: lambda_sensitivity(r)),
    FigureSpec("logits_vs_lr", "Mean logit and max |logit| on the final validation batches vs learning rate; "
               "the study's published mean logits as extra rows when given.", lambda r, c, p: logits_vs_lr(r, p)),
    FigureSpec("mu_norm_vs_lr", "‖μ‖ (norm of the mean output-embedding row) at the end of training vs "
               "learning rate; the study's published values as extra rows when given.",
               lambda r, c, p: mu_norm_vs_lr(r, p)),
    FigureSpec("log2z_vs_lr", "Mean (log Z)² on the final validation batches vs learning rate; the study's "
               "published values as extra rows when given.", lambda r, c, p: log2z_vs_lr(r, p)),
    FigureSpec("divergence_map", "Divergence map: diverged runs / runs per learning rate and stabilizer setting.",
               lambda r, c, p: divergence_map(r)),
    FigureSpec("diverging_curves", "Training curves of the diverged runs (× marks the step where divergence "
               "was detected).", lambda r, c, p: diverging_curves(r, c)),
)
PUBLISHED_FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("loss_vs_lr_published", "Published results: final loss vs learning rate.",
               lambda r, c, p: loss_vs_lr(p, title="published results")),
    FigureSpec("lambda_sensitivity_published", "Published results: λ sensitivity.",
               lambda r, c, p: lambda_sensitivity(p, title="published results")),
)


def draw_all(runs: pd.DataFrame, curves: pd.DataFrame | None = None,
             published: pd.DataFrame | None = None) -> list[Drawn]:
    """Draw every figure; a figure the data cannot show comes back with ``fig=None`` and a note."""
    runs = prepare_runs(runs)
    curves = curves if curves is not None else pd.DataFrame()
    specs = FIGURES + (PUBLISHED_FIGURES if published is not None and not published.empty else ())
    out = []
    for spec in specs:
        try:
            out.append(Drawn(spec.name, spec.caption, spec.draw(runs, curves, published)))
        except SkipFigure as e:
            out.append(Drawn(spec.name, spec.caption, None, str(e)))
    return out


def save_figure(fig: Figure, out_dir: str | Path, name: str, formats: tuple[str, ...] = ("png", "pdf")
                ) -> list[Path]:
    """Write ``out_dir/name.<fmt>`` for each format (tight bounding box, legends included)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in formats:
        path = out / f"{name}.{f}"
        fig.savefig(path, format=f, dpi=DPI, bbox_inches="tight")
        paths.append(path)
    return paths
