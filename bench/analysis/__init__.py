"""Analysis of stabench results: sensitivity metrics, statistics over seeds, figures, tables,
an HTML report and a leaderboard — pure functions over the runs frame of ``runs.parquet``.

Modules
-------
results      load a results directory; ``prepare_runs`` adds the derived columns every function uses
metrics      ``lr_sensitivity`` (LRS), ``lrs_table``, ``lambda_sensitivity``, divergence rate, step-time overhead
stats        mean ± SE, bootstrap CIs over seeds, the paired sign-flip test
external     published results (CSV) as a runs frame
tables       display tables and their Markdown / LaTeX / HTML renderings
palette      one fixed colour per stabilizer
figures      every figure (matplotlib Figure objects; PNG and PDF)
report       one self-contained HTML report
leaderboard  stabilizers ranked per protocol across results directories
notebook     display helpers for the notebooks in ``analysis/``
compare      ``stabench compare``: result folders of one protocol side by side
cli          ``stabench figures``, ``report``, ``leaderboard``, ``claims``, ``compare``
"""
import importlib

# name -> submodule; imported on first use (PEP 562), so that ``bench.analysis.cli`` (``stabench
# figures --help``) does not pay for pandas, numpy or matplotlib
_EXPORTS = {"read_published": "external", "divergence_rate": "metrics", "lambda_sensitivity": "metrics",
            "lr_sensitivity": "metrics", "lrs_table": "metrics", "step_time_overhead": "metrics",
            "Results": "results", "load_results": "results", "prepare_runs": "results"}

__all__ = ["Results", "divergence_rate", "lambda_sensitivity", "load_results", "lr_sensitivity", "lrs_table",
           "prepare_runs", "read_published", "step_time_overhead"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
