"""``stabench regime``: does a CPU run reach the study's regime (final mean logit >= 100 or mean (log Z)² >= 1e4,
not diverged), and how fast do its logit statistics grow (a power law fitted to the later curve, extrapolated to
the study's 100k steps)? Planted curves and runs; the CLI on results directories written by the real writer."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import records
from bench.analysis.regime import (REGIME_LOG2Z, REGIME_LOGIT, STUDY_STEPS, growth_fit, growth_ratio, markdown,
                                   regime_table, verdict)
from bench.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
STEPS = np.arange(100, 10_001, 100)


def curve(run_id: str, logit=lambda s: -5.0 + 0 * s, log2z=lambda s: 40.0 + 0 * s) -> pd.DataFrame:
    """A curves.parquet frame of one run logged every 100 steps, with the planted statistics."""
    s = STEPS.astype(float)
    return pd.DataFrame({"run_id": run_id, "step": STEPS, "lr": 0.1, "train_loss": 3.0, "reg_loss": 0.0,
                         "val_loss": np.nan, "val_loss_fp32": np.nan, "grad_norm": 1.0, "logit_mean": logit(s),
                         "logit_absmax": 20.0, "mean_log2z": log2z(s), "mu_norm": 1.0})


def run(run_id: str, logit_mean: float, mean_log2z: float = 40.0, diverged: bool = False, lr: float = 0.1,
        sweep: str = "planted") -> dict:
    """A runs.parquet row: an untied nano baseline of 10,000 steps with the given final statistics."""
    return {"run_id": run_id, "sweep": sweep, "model": "nano", "n_params": 3e4, "vocab_size": 256, "seq_len": 32,
            "batch_size": 4, "steps": 10_000, "warmup": 200, "stabilizer": "baseline", "hparams": "{}", "lr": lr,
            "seed": 1, "weight_tying": False, "precision": "fp32", "data": "synthetic:tokens=50000",
            "L0": math.log(256), "final_loss": 3.0, "diverged": diverged,
            "diverged_step": 5000 if diverged else None, "steps_done": 5000 if diverged else 10_000,
            "logit_mean": logit_mean, "mean_log2z": mean_log2z, "mu_norm": 10.0, "mu_hidden_cos": 0.1,
            "started_at": "2025-03-04T05:06:07+00:00", "schema_version": records.SCHEMA_VERSION}


# -- growth_fit: a power law over the later curve, extrapolated to 100k steps ------------------

def test_growth_fit_recovers_a_planted_power_law_and_extrapolates_it_to_the_study_length():
    c = curve("a", logit=lambda s: 3.0 * s ** 0.5)
    b, a, at = growth_fit(c, "logit_mean", steps_from=2000)
    assert b == pytest.approx(0.5, abs=1e-9)
    assert a == pytest.approx(3.0, rel=1e-9)
    assert at == pytest.approx(3.0 * STUDY_STEPS ** 0.5, rel=1e-9)  # 948.7


def test_growth_fit_uses_only_the_steps_from_on_and_skips_zero_and_non_finite_values():
    c = curve("a", logit=lambda s: 3.0 * s ** 0.5)
    c.loc[c["step"] < 2000, "logit_mean"] = 1e6       # warmup transient: must not bend the fit
    c.loc[c["step"] == 5000, "logit_mean"] = 0.0      # log 0
    c.loc[c["step"] == 6000, "logit_mean"] = np.nan
    c.loc[c["step"] == 7000, "logit_mean"] = np.inf
    assert growth_fit(c, "logit_mean", 2000)[0] == pytest.approx(0.5, abs=1e-9)
    assert growth_fit(c, "logit_mean", 100)[0] < 0     # with the transient the fit is another one


def test_growth_fit_fits_the_magnitude_of_a_negative_statistic():
    c = curve("a", logit=lambda s: -2.0 * s ** 0.25)
    b, a, _ = growth_fit(c, "logit_mean", 1000)
    assert (b, a) == (pytest.approx(0.25), pytest.approx(2.0))


def test_growth_fit_is_nan_with_fewer_than_three_usable_points():
    c = curve("a", logit=lambda s: 3.0 * s ** 0.5)
    assert all(math.isnan(x) for x in growth_fit(c, "logit_mean", steps_from=9900))    # two rows: 9,900 and 10,000
    c.loc[c["step"] == 9800, "logit_mean"] = 0.0
    assert all(math.isnan(x) for x in growth_fit(c, "logit_mean", steps_from=9800))    # three rows, one unusable
    assert all(math.isnan(x) for x in growth_fit(c.iloc[:0], "logit_mean", 0))


def test_growth_ratio_is_end_over_middle_without_a_model():
    assert growth_ratio(curve("a", logit=lambda s: 0.01 * s), "logit_mean") == pytest.approx(2.0, rel=0.1)
    assert growth_ratio(curve("a"), "mean_log2z") == pytest.approx(1.0)   # flat: saturated
    assert math.isnan(growth_ratio(curve("a").iloc[:1], "mean_log2z"))


# -- regime_table: reached, maxima, fits ------------------------------------------------------

@pytest.fixture
def planted() -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = pd.DataFrame([run("hit", 150.0), run("diverged", 150.0, diverged=True), run("below", 50.0),
                         run("log2z", -3.0, mean_log2z=2e4), run("growing", -5.0, lr=0.3)])
    curves = pd.concat([curve("hit", logit=lambda s: 1.5 * s ** 0.5), curve("diverged"), curve("below"),
                        curve("log2z"), curve("growing", logit=lambda s: -0.5 * s ** 0.25,
                                              log2z=lambda s: 0.01 * s ** 1.5)])
    return runs, curves


def test_reached_needs_a_final_mean_logit_of_100_or_log2z_of_1e4_and_no_divergence(planted):
    t = regime_table(*planted).set_index("run_id")
    assert REGIME_LOGIT == 100 and REGIME_LOG2Z == 1e4
    assert t.loc["hit", "reached"]                    # mean logit 150
    assert not t.loc["diverged", "reached"]           # 150, but diverged
    assert not t.loc["below", "reached"]              # 50
    assert t.loc["log2z", "reached"]                  # (log Z)² 2e4, whatever the mean logit
    assert not t.loc["growing", "reached"]


def test_table_carries_curve_maxima_fits_and_a_signed_logit_extrapolation(planted):
    t = regime_table(*planted).set_index("run_id")
    assert t.loc["hit", "max_abs_logit_mean"] == pytest.approx(150.0)          # 1.5 · 10,000^0.5
    assert t.loc["hit", "fit_from"] == 2000                                     # max(warmup 200, 20% of 10,000)
    assert t.loc["diverged", "fit_from"] == 1000                                # 20% of the 5,000 steps it ran
    assert t.loc["hit", "logit_exponent"] == pytest.approx(0.5)
    assert t.loc["hit", "logit_at_100k"] == pytest.approx(1.5 * STUDY_STEPS ** 0.5)
    g = t.loc["growing"]
    assert g["logit_at_100k"] == pytest.approx(-0.5 * STUDY_STEPS ** 0.25)     # negative: not the study's regime
    assert (g["log2z_exponent"], g["log2z_at_100k"]) == (pytest.approx(1.5), pytest.approx(0.01 * STUDY_STEPS ** 1.5))
    assert g["max_log2z"] == pytest.approx(0.01 * 10_000 ** 1.5)
    for col in ("sweep", "model", "data", "vocab_size", "seq_len", "batch_size", "lr", "precision", "stabilizer",
                "weight_tying", "steps_done", "diverged", "mean_log2z", "mu_norm", "mu_hidden_cos", "logit_ratio",
                "log2z_ratio", "logit_prefactor", "log2z_prefactor"):
        assert col in t.columns, col


def test_a_run_without_a_curve_gets_nan_fits_not_an_error(planted):
    runs, curves = planted
    t = regime_table(runs, curves[curves["run_id"] != "hit"]).set_index("run_id")
    assert t.loc["hit", "reached"] and math.isnan(t.loc["hit", "logit_exponent"])
    assert math.isnan(t.loc["hit", "max_abs_logit_mean"])


def test_verdict_names_the_runs_that_reached_or_else_the_largest_extrapolation(planted):
    runs, curves = planted
    assert verdict(regime_table(runs, curves)).startswith("**Verdict:** 2 of 5 run(s) reached the regime")
    none = regime_table(runs[runs["run_id"].isin(["below", "growing"])], curves)
    line = verdict(none)
    assert "no run reached the regime" in line
    assert "(log Z)² 3.16e5 (planted, lr 0.3) against 1e4" in line     # 0.01 · 1e5^1.5
    assert markdown(none).rstrip().endswith(line)


# -- the command line ---------------------------------------------------------------------------

def _write(out: Path, runs: list[dict], curves: list[pd.DataFrame]) -> Path:
    """A results directory written by the real writer (part files, then the merged parquet files)."""
    for r, c in zip(runs, curves):
        records.write_run(out, r, c.to_dict("records"), merge=False)
    records.merge_parts(out)
    return out


def test_cli_writes_the_figure_and_markdown_into_the_common_parent_regime_folder(tmp_path, capsys):
    from bench.trainer import train
    from helpers import tiny_config

    planted = _write(tmp_path / "results" / "planted", [run("hit", 150.0), run("below", 50.0)],
                     [curve("hit", logit=lambda s: 1.5 * s ** 0.5), curve("below")])
    real = tiny_config(sweep="tiny", lr=3e-2)                      # a real 30-step run: the real curve columns
    r = train(real)
    trained = _write(tmp_path / "results" / "tiny", [r.run], [pd.DataFrame(r.curve)])
    study = tmp_path / "diagnostics.csv"
    pd.DataFrame({"model": ["16M", "16M", "16M"], "stabilizer": ["baseline", "baseline", "mucentering"],
                  "lam": 0.0, "lr": [0.1, 0.3, 0.1], "weight_tying": False, "final_loss": [4.27, 5.07, 4.0],
                  "logit_mean": [588.0, 1152.0, 0.0], "mean_log2z": [389120.0, 1703936.0, 10.0]}).to_csv(study,
                                                                                                        index=False)
    assert main(["regime", str(planted), str(trained), "--compare", str(study)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "results" / "regime"
    assert (folder / "regime.png").read_bytes()[:8] == PNG
    md = (folder / "regime.md").read_text()
    assert md in out
    assert "| sweep |" in md and "| planted |" in md and "| tiny |" in md
    assert "Study, 16M untied baseline" in md and "lr 0.3: 1,152 / 1.7e6" in md
    assert "**Verdict:** 1 of 3 run(s) reached the regime (planted lr 0.1)" in md


def test_cli_writes_where_it_is_told(tmp_path, capsys):
    d = _write(tmp_path / "planted", [run("below", 50.0)], [curve("below")])
    md = tmp_path / "elsewhere" / "r.md"
    assert main(["regime", str(d), "--figures", str(tmp_path / "figs"), "--markdown", str(md)]) == 0
    assert (tmp_path / "figs" / "regime.png").is_file() and "no run reached the regime" in md.read_text()
    assert not (tmp_path / "figs" / "regime.md").exists()


def _refused(capsys, argv: list[str], *words: str) -> None:
    """Exit code 2 and one stderr line with ``words``."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("stabench regime: error:") and all(w in lines[0] for w in words), lines[0]


def test_cli_refuses_a_missing_directory_a_directory_without_runs_and_a_csv_without_diagnostics(tmp_path, capsys):
    d = _write(tmp_path / "planted", [run("below", 50.0)], [curve("below")])
    _refused(capsys, ["regime", str(d), str(tmp_path / "nope")], "nope", "not a directory")
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["regime", str(tmp_path / "empty")], "no runs.parquet")
    runs_only = tmp_path / "runs.csv"
    pd.DataFrame({"model": ["16M"], "stabilizer": ["baseline"], "lam": [0.0], "lr": [0.1], "weight_tying": [False],
                  "final_loss": [4.27]}).to_csv(runs_only, index=False)
    _refused(capsys, ["regime", str(d), "--compare", str(runs_only)], "--compare", "logit_mean")
    assert not (tmp_path / "regime").exists()         # nothing written
