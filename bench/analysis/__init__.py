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
cli          ``stabench figures``, ``stabench report``, ``stabench leaderboard``
"""
from .external import read_published
from .metrics import divergence_rate, lambda_sensitivity, lr_sensitivity, lrs_table, step_time_overhead
from .results import Results, load_results, prepare_runs

__all__ = ["Results", "divergence_rate", "lambda_sensitivity", "load_results", "lr_sensitivity", "lrs_table",
           "prepare_runs", "read_published", "step_time_overhead"]
