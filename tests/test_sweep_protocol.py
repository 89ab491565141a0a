"""A sweep never mixes protocols: re-running a sweep whose [train] settings changed into the same
study or results directory is refused before anything is written; ``--force-new-protocol`` starts a
new study beside the old one and keeps the rows apart."""
from __future__ import annotations

import pandas as pd

from bench.cli import main
from test_sweep_run import sweep_file


def _files(out):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def _worker(path, out, *extra) -> int:
    return main(["worker", str(path), "--out", str(out), "--threads", "1", *extra])


def test_a_changed_train_section_is_refused_naming_the_change_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "results" / "proto"
    assert _worker(sweep_file(tmp_path, "proto", steps=20), out) == 0
    before = _files(out)
    capsys.readouterr()
    assert _worker(sweep_file(tmp_path, "proto", steps=30), out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "steps: 20 → 30" in err and "--out" in err and "--force-new-protocol" in err
    assert _files(out) == before  # nothing written: not the journal, not the records, not sweep.json


def test_the_same_protocol_in_the_results_directory_is_refused_even_on_a_fresh_storage(tmp_path, capsys):
    out = tmp_path / "results" / "proto"
    assert _worker(sweep_file(tmp_path, "proto", steps=20), out) == 0
    capsys.readouterr()
    other = tmp_path / "other-journal.log"
    assert main(["worker", str(sweep_file(tmp_path, "proto", steps=30)), "--out", str(out), "--storage", str(other),
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "runs.parquet" in err and "steps: 20 → 30" in err


def test_force_new_protocol_starts_a_new_study_whose_rows_stay_apart(tmp_path, capsys):
    out = tmp_path / "results" / "proto"
    assert _worker(sweep_file(tmp_path, "proto", steps=20), out) == 0
    changed = sweep_file(tmp_path, "proto", steps=30)
    assert _worker(changed, out, "--force-new-protocol") == 0
    runs = pd.read_parquet(out / "runs.parquet")
    by_sweep = runs.groupby("sweep")["steps"].unique().to_dict()
    assert len(by_sweep) == 2 and by_sweep["proto"].tolist() == [20]
    (new,) = [name for name in by_sweep if name != "proto"]
    assert new.startswith("proto-") and by_sweep[new].tolist() == [30]
    assert _worker(changed, out, "--force-new-protocol") == 0  # the new study is resumed, not refused
    assert len(pd.read_parquet(out / "runs.parquet")) == len(runs)


def test_analysis_refuses_to_pool_two_protocols_and_says_which_unless_told(tmp_path, capsys):
    out = tmp_path / "results" / "proto"
    assert _worker(sweep_file(tmp_path, "proto", steps=20), out) == 0
    assert _worker(sweep_file(tmp_path, "proto", steps=30), out, "--force-new-protocol") == 0
    capsys.readouterr()
    assert main(["figures", str(out), "--figures", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 protocols" in err and "steps: 20 → 30" in err and "--study" in err
    assert main(["figures", str(out), "--figures", str(tmp_path / "f"), "--study", "proto"]) == 0
    assert main(["figures", str(out), "--figures", str(tmp_path / "g"), "--mixed-protocols"]) == 0
