"""Display tables (LRS, best loss, best learning rate, λ sensitivity, divergence, overhead)
and their Markdown, LaTeX and HTML renderings (no extra dependencies).

Builders take a runs frame and return a DataFrame of display strings (or an empty frame
when the data has nothing to show). Where several seeds exist, values are "mean ± SE" and
the difference to baseline carries the paired sign-flip test of :mod:`bench.analysis.stats`;
a difference that is not significant at α = 0.05 is marked ``n.s.``.
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .metrics import divergence_rate, lambda_sensitivity, lrs_table, step_time_overhead
from .results import (GROUP, HP_SYMBOLS, format_value, model_order, prepare_runs, setting_order, stabilizer_label,
                      stabilizer_order)
from .stats import ALPHA, compare_to_reference, seed_summary


def fmt(x: float, digits: int = 3) -> str:
    """Fixed-point number, ``–`` for NaN / None."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def fmt_lr(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:g}"


def fmt_pm(mean: float, se: float, digits: int = 3) -> str:
    """``mean ± se`` (just the mean when SE is undefined, i.e. one seed)."""
    if se is None or math.isnan(se):
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} ± {fmt(se, digits)}"


def fmt_diff(diff: float, p: float, n_pairs: int, mark_untested: bool = True) -> str:
    """Difference to the reference with its test result: ``-0.29 (p=0.03)`` / ``(n.s., p=0.25)``.

    With fewer than two paired seeds the difference is untested: marked ``(1 seed, untested)``
    unless ``mark_untested`` is False (a table where no row has several seeds says so once).
    """
    if diff is None or math.isnan(diff):
        return "–"
    if n_pairs < 2 or math.isnan(p):
        return f"{diff:+.3f}" + (" (1 seed, untested)" if mark_untested else "")
    if p < ALPHA:
        return f"{diff:+.3f} (p={p:.3g})"
    return f"{diff:+.3f} (n.s., p={p:.2g})"


# -- builders -------------------------------------------------------------------------------

def _ordered(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    models = {m: i for i, m in enumerate(model_order(runs))}
    settings = {s: i for i, s in enumerate(setting_order(runs))}
    return (df.assign(_m=df["model"].map(models), _s=df["setting"].map(settings))
            .sort_values(["_m", "_s"]).drop(columns=["_m", "_s"]))


def sensitivity_table(runs: pd.DataFrame, reference: str = "baseline") -> pd.DataFrame:
    """Per model and setting: LRS, best loss, best lr, diverged runs, seeds, ΔLRS vs ``reference``."""
    runs = prepare_runs(runs)
    per_seed = lrs_table(runs, by_seed=True)
    pooled = lrs_table(runs)
    summary = seed_summary(per_seed).set_index(GROUP)
    tests = compare_to_reference(per_seed, "lrs", reference).set_index(GROUP)
    several_seeds = bool((pooled["n_seeds"] > 1).any())
    rows = []
    for r in _ordered(pooled, runs).itertuples(index=False):
        key = tuple(getattr(r, k) for k in GROUP)
        s = summary.loc[key]
        t = tests.loc[key] if key in tests.index else None
        rows.append({"model": r.model, "stabilizer": r.setting,
                     "LRS (nats)": fmt_pm(r.lrs, s["lrs_se"]),
                     "best loss (nats)": fmt_pm(r.best_loss, s["best_loss_se"]),
                     "best lr": fmt_lr(r.best_lr), "diverged": f"{r.n_diverged}/{r.n_runs}",
                     "seeds": str(r.n_seeds),
                     f"ΔLRS vs {reference}": "" if t is None else fmt_diff(t["diff"], t["p_value"], t["n_pairs"],
                                                                                 several_seeds)})
    return pd.DataFrame(rows)


def by_model_table(runs: pd.DataFrame, value: str = "lrs") -> pd.DataFrame:
    """Pivot of one :func:`lrs_table` column: a row per setting, a column per model (small → large)."""
    runs = prepare_runs(runs)
    pooled = lrs_table(runs)
    wide = pooled.pivot_table(index="setting", columns="model", values=value, aggfunc="first")
    wide = wide.reindex(index=[s for s in setting_order(runs) if s in wide.index],
                        columns=[m for m in model_order(runs) if m in wide.columns])
    formatter = fmt_lr if value == "best_lr" else fmt
    out = wide.apply(lambda col: col.map(formatter))
    out.columns = [str(c) for c in out.columns]
    return out.reset_index().rename(columns={"setting": "stabilizer"})


def lambda_table(runs: pd.DataFrame) -> pd.DataFrame:
    """λ (hyperparameter) sensitivity: LRS and best loss across the grid and their spread."""
    runs = prepare_runs(runs)
    lam = lambda_sensitivity(runs)
    if lam.empty:
        return pd.DataFrame()
    models = {m: i for i, m in enumerate(model_order(runs))}
    stabs = {s: i for i, s in enumerate(stabilizer_order(lam["stabilizer"]))}
    lam = lam.assign(_m=lam["model"].map(models), _s=lam["stabilizer"].map(stabs)).sort_values(["_m", "_s"])
    tied = runs["weight_tying"].nunique() > 1
    rows = []
    for r in lam.itertuples(index=False):
        sym = HP_SYMBOLS.get(r.hp_name, r.hp_name)
        rows.append({"model": r.model,
                     "stabilizer": stabilizer_label(r.stabilizer) + ((", tied" if r.weight_tying else ", untied")
                                                                     if tied else ""),
                     f"{sym} grid": r.values if len(lam["hp_name"].unique()) == 1 else f"{sym}: {r.values}",
                     "LRS min–max (nats)": f"{fmt(r.lrs_min)}–{fmt(r.lrs_max)}",
                     "LRS spread": fmt(r.lrs_spread),
                     "best loss min–max (nats)": f"{fmt(r.best_loss_min)}–{fmt(r.best_loss_max)}",
                     "best-loss spread": fmt(r.best_loss_spread),
                     f"{sym} at min LRS": format_value(r.hp_at_min_lrs)})
    return pd.DataFrame(rows)


def divergence_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Divergence rate per stabilizer setting (all models, learning rates and seeds pooled)."""
    runs = prepare_runs(runs)
    rate = divergence_rate(runs, by=["setting"])
    order = {s: i for i, s in enumerate(setting_order(runs))}
    rate = rate.assign(_s=rate["setting"].map(order)).sort_values("_s")
    return pd.DataFrame({"stabilizer": rate["setting"], "runs": rate["n_runs"].astype(str),
                         "diverged": rate["n_diverged"].astype(str),
                         "rate": [f"{100 * x:.0f} %" for x in rate["rate"]]}).reset_index(drop=True)


def overhead_table(runs: pd.DataFrame, reference: str = "baseline") -> pd.DataFrame:
    """Median step time per model and stabilizer and its overhead relative to ``reference``."""
    runs = prepare_runs(runs)
    t = step_time_overhead(runs, reference)
    if t.empty:
        return pd.DataFrame()
    models = {m: i for i, m in enumerate(model_order(runs))}
    stabs = {s: i for i, s in enumerate(stabilizer_order(t["stabilizer"]))}
    t = t.assign(_m=t["model"].map(models), _s=t["stabilizer"].map(stabs)).sort_values(["_m", "_s", "weight_tying"])
    tied = runs["weight_tying"].nunique() > 1
    return pd.DataFrame({
        "model": t["model"],
        "stabilizer": [stabilizer_label(s) + ((", tied" if w else ", untied") if tied else "")
                       for s, w in zip(t["stabilizer"], t["weight_tying"])],
        "runs": t["n_runs"].astype(str),
        "step time (ms)": [fmt(1000 * x, 2) for x in t["step_time_s"]],
        f"overhead vs {reference}": ["–" if math.isnan(x) else f"{100 * x:+.1f} %" for x in t["overhead"]],
    }).reset_index(drop=True)


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    build: Callable[[pd.DataFrame], pd.DataFrame]
    note: str = ""


TABLES: tuple[TableSpec, ...] = (
    TableSpec("sensitivity", "LR sensitivity, best loss and best learning rate", sensitivity_table,
              "LRS = Σ_lr [min(L(lr), L0) − min L] / (n − 1); diverged or non-finite runs count as L0. "
              "With several seeds: mean ± standard error over seeds; ΔLRS is the mean paired difference to "
              "baseline over shared seeds with the exact sign-flip test (n.s. = not significant at α = 0.05); "
              "with one seed differences are not tested."),
    TableSpec("lrs_by_model", "LR sensitivity (nats) by model size", lambda r: by_model_table(r, "lrs")),
    TableSpec("best_loss_by_model", "Best final validation loss (nats) by model size",
              lambda r: by_model_table(r, "best_loss")),
    TableSpec("best_lr_by_model", "Best learning rate by model size", lambda r: by_model_table(r, "best_lr")),
    TableSpec("lambda_sensitivity", "Hyperparameter (λ) sensitivity", lambda_table,
              "LRS and best loss at each grid value (mean over seeds); spread = max − min over the grid."),
    TableSpec("divergence", "Divergence rate", divergence_table,
              "A run counts as diverged when the divergence rules stopped it or its final loss is not finite."),
    TableSpec("overhead", "Step-time overhead", overhead_table,
              "Median wall time of one training step over all runs of a stabilizer; overhead relative to "
              "baseline on the same model. Inside a sweep, parallel workers share the cores, so this is "
              "indicative only; `stabench perf` measures it under controlled conditions."),
)


# -- renderers ------------------------------------------------------------------------------

def to_markdown(df: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    cols = [cell(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_TEXT = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
               # OT1 (pdflatex's default font encoding) has no < > | glyphs in text: they would print ¡ ¿ —
               "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
               "–": "--", "—": "---", "…": r"\ldots{}", "†": r"\dag{}", "‡": r"\ddag{}", "§": r"\S{}",
               "“": "``", "”": "''", "‘": "`", "’": "'", "\u00a0": "~", "\u2009": r"\,", "\u202f": r"\,"}
"""Characters written as LaTeX text (ASCII special characters and typographic non-ASCII)."""

_LATEX_MATH = {"λ": r"\lambda", "μ": r"\mu", "α": r"\alpha", "β": r"\beta", "γ": r"\gamma", "σ": r"\sigma",
               "Σ": r"\Sigma", "Δ": r"\Delta", "±": r"\pm", "−": "-", "×": r"\times", "·": r"\cdot",
               "→": r"\to", "←": r"\leftarrow", "≤": r"\leq", "≥": r"\geq", "≈": r"\approx", "≠": r"\neq",
               "√": r"\surd", "∞": r"\infty", "∈": r"\in", "‖": r"\|", "▲": r"\triangle", "°": r"^{\circ}",
               "\u0304": r"\bar{}"}
"""Characters written in math mode (``$\\lambda$``); neighbours share one ``$…$`` group."""

_SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+"))
"""Superscript characters: a run of them becomes one ``^{…}`` (``10⁻⁶`` → ``10$^{-6}$``)."""


def latex_escape(text: object) -> str:
    """``text`` as pure-ASCII LaTeX that pdflatex compiles without extra packages.

    LaTeX's special characters are escaped, the Greek letters and symbols the suite writes
    (λ, μ, α, Σ, Δ, ±, −, ×, →, ≤, ≥, ‖, …) become math (``$\\lambda$``), dashes and dots their
    LaTeX spellings; any other non-ASCII character is reduced to its ASCII base letter (é → e)
    or, failing that, written as ``?``. The result is always ASCII.
    """
    import unicodedata

    out: list[str] = []
    math: list[str] = []

    def flush() -> None:
        if math:
            out.append("$" + "".join(math) + "$")
            math.clear()

    for ch in str(text):
        if ch in _SUPERSCRIPTS:  # extend the superscript just before, else open one
            if math and math[-1].startswith("{}^{"):
                math[-1] = math[-1][:-1] + _SUPERSCRIPTS[ch] + "}"
            else:
                math.append("{}^{" + _SUPERSCRIPTS[ch] + "}")
            continue
        if ch in _LATEX_MATH:
            m = _LATEX_MATH[ch]
            if math and math[-1][-1].isalpha() and m[0].isalpha():  # \lambda then a letter: keep them apart
                m = " " + m
            math.append(m)
            continue
        flush()
        if ch in _LATEX_TEXT:
            out.append(_LATEX_TEXT[ch])
        elif ch.isascii():
            out.append(ch)
        else:
            base = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode("ascii")
            out.append("".join(_LATEX_TEXT.get(c, c) for c in base) if base else "?")
    flush()
    return "".join(out)


def to_latex(df: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    spec = "l" * min(2, len(df.columns)) + "r" * max(0, len(df.columns) - 2)
    lines = [r"\begin{table}[ht]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
              " & ".join(latex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(x) for x in row) + r" \\" for row in df.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(df: pd.DataFrame) -> str:
    """A plain ``<table>`` with escaped cells."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_tables(runs: pd.DataFrame) -> list[tuple[TableSpec, pd.DataFrame]]:
    """Every table of :data:`TABLES` that has rows for these runs."""
    runs = prepare_runs(runs)
    out = []
    for spec in TABLES:
        df = spec.build(runs)
        if not df.empty:
            out.append((spec, df))
    return out


def write_tables(runs: pd.DataFrame, out_dir: str | Path, suffix: str = "") -> list[Path]:
    """Write each table as ``<name><suffix>.md`` and ``.tex`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec, df in build_tables(runs):
        md = out / f"{spec.name}{suffix}.md"
        md.write_text(f"**{spec.title}**\n\n" + to_markdown(df) + (f"\n{spec.note}\n" if spec.note else ""))
        tex = out / f"{spec.name}{suffix}.tex"
        tex.write_text(to_latex(df, caption=spec.title + (". " + spec.note if spec.note else ""),
                                label=f"tab:{spec.name}{suffix}"))
        paths += [md, tex]
    return paths
