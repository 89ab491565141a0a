"""runs.parquet schema 2: ``started_at`` a UTC timestamp, ``final_loss_clipped`` written with the row,
and schema-1 files (string ``started_at``, no clipped column) upgraded on read and on merge."""
import datetime as dt
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import records
from bench.analysis.results import prepare_runs
from bench.analysis.tables import sensitivity_table

ROOT = Path(__file__).parents[1]
L0 = math.log(256)


def row(run_id: str, final_loss: float, diverged: bool = False, **kw) -> dict:
    return {"run_id": run_id, "model": "nano", "stabilizer": "baseline", "hparams": "{}", "lr": 1e-2, "seed": 1,
            "vocab_size": 256, "L0": L0, "final_loss": final_loss, "diverged": diverged,
            "started_at": "2025-03-04T05:06:07+00:00", "schema_version": records.SCHEMA_VERSION, **kw}


def test_clipped_final_loss():
    assert records.clipped_final_loss(3.0, L0) == 3.0
    assert records.clipped_final_loss(9.0, L0) == L0             # above L0: L0
    assert records.clipped_final_loss(3.0, L0, True) == L0       # diverged: L0 whatever the loss
    assert records.clipped_final_loss(math.nan, L0) == L0
    assert records.clipped_final_loss(math.inf, L0) == L0
    assert records.clipped_final_loss(None, L0) == L0


def test_written_rows_carry_a_utc_timestamp_and_the_clipped_loss(tmp_path):
    for rid, loss, div in (("a", 3.0, False), ("b", 9.0, False), ("c", 3.5, True), ("d", math.nan, False)):
        records.write_run(tmp_path, row(rid, loss, div), [])
    table = pq.read_table(tmp_path / "runs.parquet")
    assert table.schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert table.schema.metadata[b"schema_version"] == b"3" == str(records.SCHEMA_VERSION).encode()
    assert table.schema.names.index("final_loss_clipped") == table.schema.names.index("final_loss") + 1
    runs = records.read_runs(tmp_path).set_index("run_id")
    assert runs["final_loss_clipped"].to_dict() == {"a": 3.0, "b": L0, "c": L0, "d": L0}
    assert isinstance(runs["started_at"].dtype, pd.DatetimeTZDtype) and str(runs["started_at"].dt.tz) == "UTC"
    assert runs.loc["a", "started_at"] == pd.Timestamp("2025-03-04T05:06:07", tz="UTC")
    # a datetime (any zone) is stored as the same instant in UTC
    cet = dt.timezone(dt.timedelta(hours=1))
    records.write_run(tmp_path, row("e", 3.0, started_at=dt.datetime(2025, 3, 4, 6, 6, 7, tzinfo=cet)), [])
    assert records.read_runs(tmp_path).set_index("run_id").loc["e", "started_at"] == runs.loc["a", "started_at"]


def _schema1_file(path: Path, rows: list[dict]) -> None:
    """A runs.parquet as schema 1 wrote it: started_at a string, no final_loss_clipped (nor the
    columns of schema 3)."""
    cols = [(n, pa.string() if n == "started_at" else t) for n, t, _ in records.RUN_COLUMNS
            if n not in ("final_loss_clipped", "arch_version", "final_loss_fp32", "divergence_events")]
    schema = pa.schema(cols, metadata={"schema_version": "1"})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({n: [r.get(n) for r in rows] for n, _ in cols}, schema=schema), path)


def test_a_schema_1_file_is_upgraded_on_read_and_on_merge(tmp_path):
    old = [row("old1", 2.5, started_at="2024-01-02T03:04:05+00:00", schema_version=1),
           row("old2", 3.0, True, started_at="2024-01-02T03:04:06+00:00", schema_version=1)]
    _schema1_file(tmp_path / "runs.parquet", old)
    runs = records.read_runs(tmp_path).set_index("run_id")
    assert isinstance(runs["started_at"].dtype, pd.DatetimeTZDtype)
    assert runs.loc["old1", "started_at"] == pd.Timestamp("2024-01-02T03:04:05", tz="UTC")
    assert runs["final_loss_clipped"].to_dict() == {"old1": 2.5, "old2": L0}
    assert runs["arch_version"].to_dict() == {"old1": 1, "old2": 1}  # the model before issue 14
    # a new run merges with the old rows into a current-schema file
    records.write_run(tmp_path, row("new", 2.0, arch_version=2), [])
    table = pq.read_table(tmp_path / "runs.parquet")
    assert table.schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    merged = table.to_pandas().set_index("run_id")
    assert merged["final_loss_clipped"].to_dict() == {"old1": 2.5, "old2": L0, "new": 2.0}
    assert merged["arch_version"].to_dict() == {"old1": 1, "old2": 1, "new": 2}
    assert merged.loc["old1", "started_at"] == pd.Timestamp("2024-01-02T03:04:05", tz="UTC")


def test_a_schema_1_part_file_still_merges(tmp_path):
    _schema1_file(tmp_path / "parts" / "runs" / "old.parquet", [row("old", 2.5, schema_version=1)])
    records.write_run(tmp_path, row("new", 2.0), [])
    merged = records.read_runs(tmp_path).set_index("run_id")
    assert sorted(merged.index) == ["new", "old"] and merged.loc["old", "final_loss_clipped"] == 2.5


@pytest.mark.parametrize("name", ["cpu-repro", "cpu-lambda", "cpu-long"])
def test_committed_results_read_with_the_clipped_loss_and_their_version(name):
    path = ROOT / "results" / name
    if not (path / "runs.parquet").is_file():
        pytest.skip(f"{path} not committed")
    runs = records.read_runs(path)
    assert isinstance(runs["started_at"].dtype, pd.DatetimeTZDtype) and runs["started_at"].notna().all()
    prepared = prepare_runs(runs)
    assert (prepared["final_loss_clipped"] == prepared["loss"]).all()
    assert (prepared.loc[prepared["failed"], "final_loss_clipped"] == prepared.loc[prepared["failed"], "L0"]).all()
    assert (prepared["final_loss_clipped"] <= prepared["L0"]).all()
    assert (runs["arch_version"] == 2).all() and runs["final_loss_fp32"].notna().all()  # regenerated in issue 14


def test_tables_use_the_stored_clipped_loss():
    """The tables read final_loss_clipped: a planted value there (not derivable from final_loss) shows up."""
    base = dict(model="nano", vocab_size=256, L0=L0, stabilizer="baseline", hparams="{}", seed=1, diverged=False)
    runs = pd.DataFrame([{**base, "lr": 1e-2, "final_loss": 2.0, "final_loss_clipped": 2.0},
                         {**base, "lr": 1e-1, "final_loss": 3.0, "final_loss_clipped": 4.0}])
    t = sensitivity_table(runs)
    assert t["LRS (nats)"].iloc[0] == "2.000"  # (4 − 2) / 1, not (3 − 2)


def _replace_forever(path: str, stop) -> None:
    """Atomically replace ``path`` with tables of changing size until ``stop`` is set (a writer)."""
    n = 10
    while not stop.is_set():
        n = n % 3000 + 37
        records._atomic_write_table(pa.table({"run_id": [f"r{i}" for i in range(n)]}), Path(path))


def test_a_file_replaced_while_it_is_read_is_never_taken_for_damaged(tmp_path):
    """Writers rename a new runs.parquet into place while others read it. Reading by path reopened
    the file mid-read (footer of one file, pages of the next) and set a good file aside as corrupt
    in ~10 % of reads during a sweep (measured); one descriptor per read, and a re-read when the
    file was replaced, must never do so."""
    import multiprocessing as mp
    import time

    path = tmp_path / "runs.parquet"
    records._atomic_write_table(pa.table({"run_id": ["r0"]}), path)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    writer = ctx.Process(target=_replace_forever, args=(str(path), stop))
    writer.start()
    reads, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < 4 or reads < 500:
            table = records.read_table_or_none(path, columns=["run_id"])
            assert table is not None and table.num_rows > 0
            reads += 1
    finally:
        stop.set()
        writer.join(timeout=30)
    assert not list(tmp_path.glob("*.corrupt")) and reads >= 500
