"""``stabench compare A B``: result folders of one protocol side by side, and a clear refusal otherwise."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.records import merge_parts, write_run
from bench.trainer import train
from helpers import tiny_config

PNG = b"\x89PNG\r\n\x1a\n"
SETTINGS = [("baseline", {}), ("zloss", {"lam": 1e-4})]
LRS, SEEDS = (1e-3, 3e-2), (1, 2)


def _train(out: Path, sweep: str, settings=SETTINGS, lrs=LRS, seeds=SEEDS, **overrides) -> Path:
    for stabilizer, hparams in settings:
        for lr in lrs:
            for seed in seeds:
                cfg = tiny_config(sweep=sweep, stabilizer=stabilizer, hparams=hparams, lr=lr, seed=seed, **overrides)
                r = train(cfg)
                write_run(out, r.run, r.curve, merge=False)
    merge_parts(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    return {
        "a": _train(root / "results" / "a", "a"),
        # the same protocol, other batch orders (data_seed is a grid field): other losses, same seeds
        "b": _train(root / "results" / "b", "b", data_seed=7),
        # another protocol: fewer steps
        "short": _train(root / "results" / "short", "short", settings=SETTINGS[:1], seeds=(1,), steps=20),
    }


def test_compare_prints_a_table_with_cis_and_paired_tests_and_draws_one_figure(folders, tmp_path, capsys):
    md = tmp_path / "cmp.md"
    assert main(["compare", str(folders["a"]), str(folders["b"]), "--figures", str(tmp_path / "f"),
                 "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert md.read_text() in out
    text = md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    for col in ("LRS a", "best loss a", "seeds a", "LRS b", "best loss b", "seeds b", "ΔLRS b − a"):
        assert col in header, col
    rows = [line for line in text.splitlines() if line.startswith("| nano")]
    assert len(rows) == 2 and any("baseline" in r for r in rows) and any("zloss (λ=1e-4)" in r for r in rows)
    assert all(r.count(" [") >= 4 for r in rows), rows  # LRS and best loss with a CI in both folders
    assert "Protocol (shared): steps = 30" in text
    png = tmp_path / "f" / "compare.png"
    assert png.read_bytes().startswith(PNG) and f"wrote {png}" in out


def test_compare_numbers_are_the_analysis_numbers(folders):
    from bench.analysis import compare as cmp
    from bench.analysis.metrics import lrs_table
    from bench.analysis.results import load_results
    from bench.analysis.stats import paired_signflip_test

    a, b = load_results(folders["a"]), load_results(folders["b"])
    c = cmp.compare([a, b], ["a", "b"])
    assert len(c.summary) == 4 and set(c.summary["folder"]) == {"a", "b"}
    for folder, res in (("a", a), ("b", b)):
        expected = lrs_table(res.runs).set_index("stabilizer")["lrs"]
        got = c.summary[c.summary["folder"] == folder].set_index("stabilizer")["lrs_mean"]
        for stab in ("baseline", "zloss"):
            assert math.isclose(got[stab], expected[stab], rel_tol=1e-12)
    pa, pb = lrs_table(a.runs, by_seed=True), lrs_table(b.runs, by_seed=True)
    for stab in ("baseline", "zloss"):
        row = c.paired[c.paired["stabilizer"] == stab].iloc[0]
        x = pb[pb["stabilizer"] == stab].set_index("seed")["lrs"].sort_index()
        y = pa[pa["stabilizer"] == stab].set_index("seed")["lrs"].sort_index()
        assert row["n_pairs"] == 2
        assert math.isclose(row["diff"], float((x - y).mean()), rel_tol=1e-9, abs_tol=1e-12)
        assert row["p_value"] == paired_signflip_test(x.to_numpy(), y.to_numpy())


def test_compare_defaults_the_figure_beside_the_folders(folders, capsys):
    assert main(["compare", str(folders["a"]), str(folders["b"])]) == 0
    png = folders["a"].parent / "compare.png"
    assert png.read_bytes().startswith(PNG) and f"wrote {png}" in capsys.readouterr().out


def test_compare_refuses_folders_of_different_protocols(folders, tmp_path, capsys):
    rc = main(["compare", str(folders["a"]), str(folders["short"]), "--figures", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert err.startswith("stabench compare: error: protocols differ: steps is 30 in a but 20 in short"), err
    assert not (tmp_path / "f").exists()


def test_compare_refuses_a_different_precision(folders, tmp_path, capsys):
    """precision is part of the protocol (the resolved one, from the runs)."""
    other = tmp_path / "results" / "other"
    other.mkdir(parents=True)
    runs = pd.read_parquet(folders["b"] / "runs.parquet")
    mine = runs["precision"].iloc[0]  # auto resolves to fp32 or bf16 by machine
    theirs = "bf16-emu" if mine != "bf16-emu" else "fp32"
    runs = runs.assign(precision=theirs)
    runs.to_parquet(other / "runs.parquet")
    pd.read_parquet(folders["b"] / "curves.parquet").to_parquet(other / "curves.parquet")
    assert main(["compare", str(folders["a"]), str(other), "--figures", str(tmp_path / "f")]) == 2
    assert f"protocols differ: precision is {mine} in a but {theirs} in other" in capsys.readouterr().err


def test_compare_needs_two_folders(folders, capsys):
    assert main(["compare", str(folders["a"])]) == 2
    assert "two or more results directories" in capsys.readouterr().err
