"""One self-contained HTML report of a results directory.

Figures are embedded as base64 PNG, styles are inline, and the only links are anchors
within the page, so the file opens in any browser without a server or network.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from pathlib import Path

import pandas as pd

from .figures import DPI, draw_all
from .results import Results, model_order, prepare_runs, stabilizer_order
from .tables import build_tables, to_html

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fff}
main{max-width:1180px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:1.7em;margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#f1f3f5} td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}
tbody tr:nth-child(even){background:#fafafa}
figure{margin:1.2em 0 2em} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.92em;margin-top:.4em}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:10px;overflow-x:auto;font-size:.85em}
.note{color:#555;font-size:.9em} .skipped{color:#8a6d3b}
nav ul{columns:2;font-size:.95em} .prov td{text-align:left}
"""


def figure_png_base64(fig, dpi: int = 110) -> str:
    """A figure as base64-encoded PNG (tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _kv_table(items: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v or '–')}</td></tr>" for k, v in items)
    return f'<table class="prov"><tbody>{rows}</tbody></table>'


def run_settings(runs: pd.DataFrame) -> tuple[dict[str, str], dict[str, str]]:
    """(settings shared by every run, settings that vary with their values) from the runs' config JSON."""
    configs = []
    for c in runs.get("config", pd.Series(dtype=object)).dropna():
        try:
            configs.append(json.loads(c))
        except (TypeError, json.JSONDecodeError):
            continue
    if not configs:
        return {}, {}
    keys = sorted({k for c in configs for k in c})
    same, vary = {}, {}
    for k in keys:
        vals = sorted({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs})
        (same if len(vals) == 1 else vary)[k] = ", ".join(vals)
    return same, vary


def _tables_html(runs: pd.DataFrame, prefix: str) -> tuple[str, list[tuple[str, str]]]:
    parts, toc = [], []
    for spec, df in build_tables(runs):
        anchor = f"{prefix}table-{spec.name}"
        toc.append((anchor, spec.title))
        note = f'<p class="note">{html.escape(spec.note)}</p>' if spec.note else ""
        parts.append(f'<h3 id="{anchor}">{html.escape(spec.title)}</h3>{to_html(df)}{note}')
    return "".join(parts), toc


def build_report(results: Results, published: pd.DataFrame | None = None) -> str:
    """The report's HTML text."""
    runs = prepare_runs(results.runs)
    prov = results.provenance()
    title = f"stabench report — {prov['sweep'] or results.path.name}"
    toc: list[tuple[str, str]] = [("provenance", "Provenance")]

    prov_rows = [("results directory", str(results.path)), ("sweep", prov["sweep"]),
                 ("sweep file hash (sha256)", prov["sweep_hash"] or "no sweep.toml / sweep.json"),
                 ("stabench version", prov["stabench_version"]), ("git commit", prov["git_commit"]),
                 ("torch version", prov["torch_version"]), ("device", prov["device"]),
                 ("precision", prov["precision"]), ("runs", prov["n_runs"]),
                 ("models", ", ".join(model_order(runs))),
                 ("stabilizers", ", ".join(stabilizer_order(runs["stabilizer"]))),
                 ("learning rates", ", ".join(f"{x:g}" for x in sorted(runs["lr"].unique()))),
                 ("seeds", prov["seeds"]),
                 ("weight tying", ", ".join(str(x).lower() for x in sorted(runs["weight_tying"].unique()))),
                 ("diverged runs", f"{int(runs['failed'].sum())} of {len(runs)}"),
                 ("report generated", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))]
    body = [f'<h2 id="provenance">Provenance</h2>{_kv_table(prov_rows)}']

    tables, ttoc = _tables_html(runs, "")
    toc += [("tables", "Tables")] + [(a, "— " + t) for a, t in ttoc]
    body.append(f'<h2 id="tables">Tables</h2>{tables}')

    toc.append(("figures", "Figures"))
    body.append('<h2 id="figures">Figures</h2>')
    for d in draw_all(runs, results.curves, published):
        anchor = f"fig-{d.name}"
        if d.fig is None:
            body.append(f'<p id="{anchor}" class="skipped">Figure <b>{html.escape(d.name)}</b> not drawn: '
                        f"{html.escape(d.note)}.</p>")
            continue
        toc.append((anchor, "— " + d.name))
        body.append(f'<figure id="{anchor}"><img alt="{html.escape(d.name)}" '
                    f'src="data:image/png;base64,{figure_png_base64(d.fig)}">'
                    f"<figcaption><b>{html.escape(d.name)}.</b> {html.escape(d.caption)}</figcaption></figure>")

    if published is not None and not published.empty:
        ptables, pttoc = _tables_html(published, "published-")
        toc += [("published", "Published results")] + [(a, "— " + t) for a, t in pttoc]
        src = ", ".join(sorted(published["sweep"].astype(str).unique())) if "sweep" in published.columns else ""
        body.append(f'<h2 id="published">Published results</h2><p class="note">{html.escape(src)}</p>{ptables}')

    toc.append(("config", "Sweep configuration"))
    body.append('<h2 id="config">Sweep configuration</h2>')
    if results.sweep_toml is not None:
        body.append(f"<h3>sweep.toml</h3><pre>{html.escape(results.sweep_toml)}</pre>")
    if results.sweep_meta:
        body.append("<h3>sweep.json</h3><pre>"
                    f"{html.escape(json.dumps(results.sweep_meta, indent=2, sort_keys=True, default=str))}</pre>")
    same, vary = run_settings(runs)
    if same or vary:
        body.append('<h3>Run configuration (from runs.parquet)</h3><p class="note">Settings shared by every run:</p>'
                    + _kv_table(sorted(same.items())))
        if vary:
            body.append('<p class="note">Settings that vary between runs:</p>' + _kv_table(sorted(vary.items())))
    elif results.sweep_toml is None:
        body.append('<p class="note">No sweep file and no run configuration recorded.</p>')

    nav = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in toc)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{html.escape(title)}</h1><p class=\"note\">LR sensitivity LRS = Σ<sub>lr</sub> "
            "[min(L(lr), L0) − min<sub>lr</sub> L(lr)] / (n − 1), L0 = ln V; diverged or non-finite runs count "
            f"as L0. Losses are validation cross-entropies in nats.</p><nav><ul>{nav}</ul></nav>"
            + "".join(body) + "</main></body></html>\n")


def write_report(results: Results, out: str | Path, published: pd.DataFrame | None = None) -> Path:
    """Write the report to ``out`` (parent directories created); returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(results, published), encoding="utf-8")
    return path


__all__ = ["DPI", "build_report", "figure_png_base64", "run_settings", "write_report"]
