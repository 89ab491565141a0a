"""Run records: the Parquet schema (with documentation) and crash-safe writing.

Layout of an output directory::

    OUT/runs.parquet            one row per run     (merged view)
    OUT/curves.parquet          one row per logged step of every run
    OUT/parts/runs/<id>.parquet, OUT/parts/curves/<id>.parquet   one pair per run

A finished run writes its part files (temp file + atomic rename), then merges all
parts with the existing merged files under an exclusive file lock, so concurrent
writers never lose or duplicate a row (a run id appears at most once; the newest
part wins). Every file carries ``schema_version`` in its Parquet metadata.

Schema versions: 1 had ``started_at`` as an ISO 8601 string and no ``final_loss_clipped``;
2 stores ``started_at`` as ``timestamp[us, tz=UTC]`` and adds ``final_loss_clipped``; 3 adds
``arch_version`` (rows of older files: 1, the model before issue 14), ``final_loss_fp32``,
``divergence_events`` and the curves' ``val_loss_fp32`` (null in older files; a null
``arch_version`` reads as 1). Files of older
versions are upgraded when read (:func:`read_runs`) and when merged with newer rows.
"""
from __future__ import annotations

import fcntl
import math
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 3

# (column, type, unit / definition) — the single source of the schema and its documentation.
RUN_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("run_id", pa.string(), "stable hash of the run's defining config (RunConfig.key())"),
    ("sweep", pa.string(), "sweep name ('' for a single `stabench run`)"),
    ("model", pa.string(), "model preset name (e.g. micro, 16M)"),
    ("n_params", pa.int64(), "number of distinct parameters (a tied matrix once)"),
    ("vocab_size", pa.int64(), "V, vocabulary size (tokens)"),
    ("seq_len", pa.int64(), "T, sequence length (tokens)"),
    ("batch_size", pa.int64(), "B, sequences per optimizer step"),
    ("steps", pa.int64(), "optimizer steps planned"),
    ("warmup", pa.int64(), "linear warmup steps"),
    ("arch_version", pa.int64(), "version of the model architecture (bench.presets.ARCH_VERSION; 1 in files "
                                 "of schema < 3)"),
    ("stabilizer", pa.string(), "stabilizer spec (built-in name, entry point or module:Class)"),
    ("lam", pa.float64(), "λ of z-loss / μ-loss (null if the stabilizer has none)"),
    ("cap", pa.float64(), "soft-capping constant c (null if none)"),
    ("hparams", pa.string(), "all stabilizer hyperparameters, JSON"),
    ("lr", pa.float64(), "peak learning rate"),
    ("seed", pa.int64(), "initialization seed"),
    ("data_seed", pa.int64(), "batch-order seed"),
    ("weight_tying", pa.bool_(), "input and output embeddings shared"),
    ("precision", pa.string(), "fp32, bf16 (autocast) or fp64, as actually used"),
    ("data", pa.string(), "data spec (synthetic…, text:PATH, bin:PATH)"),
    ("L0", pa.float64(), "loss at initialization ln V (nats)"),
    ("final_loss", pa.float64(), "final validation cross-entropy, no regularization term (nats); "
                                 "in the run's precision, on final_eval_batches batches; at the stopping step "
                                 "for a diverged run; may be NaN/inf"),
    ("final_loss_clipped", pa.float64(), "min(final_loss, L0); L0 for a diverged run or a non-finite loss "
                                         "(nats): the loss every table and the LRS formula use"),
    ("final_loss_fp32", pa.float64(), "the same weights and batches evaluated in fp32 (no autocast, no bf16 "
                                      "emulation; fp64 runs in fp64): equal to final_loss for fp32/fp64 runs, "
                                      "differs by the rounding for bf16 and bf16-emu runs (nats)"),
    ("best_val_loss", pa.float64(), "lowest validation cross-entropy over all evaluations (nats)"),
    ("diverged", pa.bool_(), "run stopped by the divergence rules"),
    ("diverged_step", pa.int64(), "step at which divergence was detected (null if not diverged)"),
    ("diverged_reason", pa.string(), "nonfinite | loss_above_L0 | loss_spike ('' if not diverged)"),
    ("divergence_events", pa.string(), "reason@step of every divergence rule that fired (first step each), "
                                       "in stop or record mode, comma-separated ('' if none)"),
    ("spike_score", pa.float64(), "largest z-score of a train loss vs the previous window (σ units)"),
    ("steps_done", pa.int64(), "optimizer steps actually taken"),
    ("logit_mean", pa.float64(), "mean of the logits the loss sees, final validation batches"),
    ("logit_std", pa.float64(), "standard deviation of those logits"),
    ("logit_absmax", pa.float64(), "max |logit| over those logits"),
    ("mean_log2z", pa.float64(), "mean over tokens of (log Z)², Z the softmax normalizer"),
    ("mu_norm", pa.float64(), "‖μ‖, μ = mean of the output-embedding rows"),
    ("isotropy", pa.float64(), "1 − ‖μ‖² / mean_i ‖e_i‖² ∈ [0, 1]; 1 = centred rows, 0 = all rows equal"),
    ("mu_hidden_cos", pa.float64(), "cosine between μ and the mean final hidden state (validation tokens)"),
    ("logit_precision_error", pa.float64(), "max |logits(run precision) − logits(fp32)| on one fixed batch "
                                            "(its first micro-batch when micro_batch_size is set)"),
    ("wall_time_s", pa.float64(), "training wall time (s): optimizer steps only, evaluation and set-up excluded"),
    ("step_time_s", pa.float64(), "median wall time of one training step (s)"),
    ("tokens_per_s", pa.float64(), "training tokens per second"),
    ("device", pa.string(), "cpu or cuda device name"),
    ("threads", pa.int64(), "intra-op threads used"),
    ("torch_version", pa.string(), "torch.__version__"),
    ("stabench_version", pa.string(), "bench.__version__"),
    ("git_commit", pa.string(), "commit of the stabench checkout ('' if unknown)"),
    ("started_at", pa.timestamp("us", tz="UTC"), "start time (UTC); an ISO 8601 string in schema 1 files, "
                                                 "converted when read"),
    ("config", pa.string(), "the full resolved RunConfig, JSON"),
    ("schema_version", pa.int64(), "version of this schema"),
]
CURVE_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("run_id", pa.string(), "run this row belongs to"),
    ("step", pa.int64(), "optimizer step (1-based: after `step` updates)"),
    ("lr", pa.float64(), "learning rate used at this step"),
    ("train_loss", pa.float64(), "training cross-entropy of this step's batch (nats)"),
    ("reg_loss", pa.float64(), "stabilizer loss term of this step (nats; 0 if none)"),
    ("val_loss", pa.float64(), "validation cross-entropy in the run's precision (null between evaluations)"),
    ("val_loss_fp32", pa.float64(), "the same evaluation in fp32 (equal to val_loss for fp32/fp64 runs)"),
    ("grad_norm", pa.float64(), "global gradient L2 norm before clipping"),
    ("logit_mean", pa.float64(), "mean logit of this step's batch"),
    ("logit_absmax", pa.float64(), "max |logit| of this step's batch"),
    ("mean_log2z", pa.float64(), "mean (log Z)² of this step's batch"),
    ("mu_norm", pa.float64(), "‖μ‖ after this step"),
]
RUNS_SCHEMA = pa.schema([(n, t) for n, t, _ in RUN_COLUMNS],
                        metadata={"schema_version": str(SCHEMA_VERSION)})
CURVES_SCHEMA = pa.schema([(n, t) for n, t, _ in CURVE_COLUMNS],
                          metadata={"schema_version": str(SCHEMA_VERSION)})


def clipped_final_loss(final_loss: Any, L0: Any, diverged: Any = False) -> float:
    """``final_loss_clipped``: min(final_loss, L0); L0 when the run diverged or the loss is not finite."""
    L0 = float(L0) if L0 is not None else math.nan
    try:
        loss = float(final_loss) if final_loss is not None else math.nan
    except (TypeError, ValueError):
        loss = math.nan
    if bool(diverged) or not math.isfinite(loss):
        return L0
    return min(loss, L0)


def _utc_timestamps(values: Any) -> pd.Series:
    """ISO 8601 strings (with or without an offset; naive ones are taken as UTC), datetimes or
    nulls as a tz-aware UTC datetime series (unparseable values become NaT)."""
    s = pd.Series(values, dtype=object) if not isinstance(values, pd.Series) else values
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        return s.dt.tz_convert("UTC")
    return pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")


def complete_run(run: dict[str, Any]) -> dict[str, Any]:
    """A runs.parquet row with its derived columns: ``final_loss_clipped`` (when missing) and
    ``started_at`` as a UTC datetime (the trainer passes an ISO 8601 string)."""
    out = dict(run)
    if out.get("final_loss_clipped") is None:
        out["final_loss_clipped"] = clipped_final_loss(out.get("final_loss"), out.get("L0"), out.get("diverged"))
    ts = _utc_timestamps([out.get("started_at")]).iloc[0]
    out["started_at"] = None if pd.isna(ts) else ts.to_pydatetime()
    return out


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    if schema.names == RUNS_SCHEMA.names:
        rows = [complete_run(r) for r in rows]
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.table(cols, schema=schema)


def _warn(message: str) -> None:
    import sys
    print(f"stabench: warning: {message}", file=sys.stderr, flush=True)


def _tmp_path(path: Path) -> Path:
    """The writer's temporary for ``path``: named with its host and pid, so that one left by a
    killed writer is recognized as such (``clean_stale_temporaries``)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` to the writer's temporary of ``path``, then rename it into place (removed on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` of this host (and pid namespace) alive? A zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def clean_stale_temporaries(directory: Path) -> list[Path]:
    """Remove ``.NAME.HOST.PID.tmp`` files whose writer, a process on this host, is dead (a kill
    mid-write leaves them); temporaries of live processes and of other hosts are kept."""
    host, removed = socket.gethostname(), []
    try:
        candidates = [p for p in Path(directory).iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    except OSError:
        return removed
    for p in candidates:
        stem = p.name[1:-len(".tmp")]
        name_host, _, pid = stem.rpartition(".")
        if not pid.isdigit() or not name_host.endswith("." + host) or pid_alive(int(pid)):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _set_aside(path: Path, error: Exception) -> None:
    """Rename an unreadable file to ``*.corrupt`` (kept for inspection), with a warning."""
    aside = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, aside)
    except OSError:
        return
    _warn(f"{path} is unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
          f"moved it to {aside}")


def _readable(path: Path, schema: pa.Schema | None = None, **kw: Any) -> pa.Table | None:
    """The table in ``path``; None if missing, or unreadable (then set aside as ``*.corrupt``).

    The file is opened once and read through that one descriptor: writers replace these files by
    rename while others read them, and a reader that reopened the path mid-read would mix the
    footer of one file with the pages of the next, which looks like damage. A file replaced while
    it was being read is read again, never set aside."""
    for _ in range(5):
        try:
            before = os.stat(path)
            f = pa.OSFile(str(path), "r")  # a native file: a Python file object here left pyarrow
        except FileNotFoundError:         # threads holding it at exit (abort at interpreter shutdown)
            return None
        with f:
            try:
                return pq.read_table(f, schema=schema, **kw)
            except (pa.ArrowException, OSError, ValueError) as e:
                if isinstance(e, OSError) and getattr(e, "errno", None) is not None:
                    raise  # an I/O error (not a damaged file): nothing to set aside
                if _replaced(before, path):
                    continue  # a writer renamed a new file into place: read that one
                _set_aside(path, e)
                return None
    return None


def _replaced(before: os.stat_result, path: Path) -> bool:
    """Has ``path`` been replaced (or removed) since it was stat'ed as ``before``?"""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino)


@contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Exclusive advisory lock on OUT/.lock (works across processes on one machine and NFSv4)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_run(out_dir: str | Path, run: dict[str, Any], curve: list[dict[str, Any]], merge: bool = True) -> None:
    """Record one finished run: part files first (atomic), then the merged view.

    The part files are the record; the merged files are derived from them, so a failed merge
    (a full disk, a damaged file) is a warning, never a failure of the run: the next merge, or
    the next read, rebuilds them."""
    out = Path(out_dir)
    rid = run["run_id"]
    _atomic_write_table(_table(curve, CURVES_SCHEMA), out / "parts" / "curves" / f"{rid}.parquet")
    _atomic_write_table(_table([run], RUNS_SCHEMA), out / "parts" / "runs" / f"{rid}.parquet")
    if merge:
        try:
            merge_parts(out)
        except Exception as e:
            _warn(f"run {rid} is recorded in {out / 'parts'}, but merging it into {out / 'runs.parquet'} failed "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the next merge or read "
                  "rebuilds it")


def _parts(out: Path, kind: str) -> list[Path]:
    return sorted((out / "parts" / kind).glob("*.parquet"))


def _merge(out: Path, kind: str, schema: pa.Schema) -> None:
    tables, ids = [], set()
    for p in _parts(out, kind):
        table = _readable(p)
        if table is not None:
            tables.append(_conform(table, schema))  # an older schema's part is upgraded
            ids.add(p.stem)
    merged = out / f"{kind}.parquet"
    old = _readable(merged)
    if old is not None:  # rows that exist only in the merged file (e.g. committed results) are kept
        old = old.filter(pa.compute.invert(pa.compute.is_in(old["run_id"], pa.array(sorted(ids), pa.string()))))
        tables.insert(0, _conform(old, schema))
    if not tables:
        return
    table = pa.concat_tables(tables).replace_schema_metadata(schema.metadata)
    _atomic_write_table(table, merged)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """An older file's table in ``schema``: columns it lacks added (as nulls, or derived: a run's
    ``final_loss_clipped``), a string ``started_at`` parsed (schema 1), so older files still merge."""
    if schema.names == RUNS_SCHEMA.names and table.num_rows:
        names = table.column_names
        if "started_at" in names and not pa.types.is_timestamp(table["started_at"].type):
            ts = _utc_timestamps(table["started_at"].to_pylist()).astype("datetime64[us, UTC]")
            table = table.set_column(names.index("started_at"), "started_at",
                                     pa.array(ts, type=pa.timestamp("us", tz="UTC"), from_pandas=True))
        if {"final_loss", "L0"} <= set(names):
            have = table["final_loss_clipped"].to_pylist() if "final_loss_clipped" in names else [None] * table.num_rows
            div = table["diverged"].to_pylist() if "diverged" in names else [False] * table.num_rows
            clipped = [h if h is not None else clipped_final_loss(f, l0, d) for h, f, l0, d in
                       zip(have, table["final_loss"].to_pylist(), table["L0"].to_pylist(), div)]
            col = pa.array(clipped, type=pa.float64())
            table = (table.set_column(names.index("final_loss_clipped"), "final_loss_clipped", col)
                     if "final_loss_clipped" in names else table.append_column("final_loss_clipped", col))
        if "arch_version" not in table.column_names:  # schema < 3: the model before issue 14
            table = table.append_column("arch_version", pa.array([1] * table.num_rows, pa.int64()))
        elif table["arch_version"].null_count:  # a row that does not say: the model before issue 14
            filled = pa.compute.fill_null(table["arch_version"].cast(pa.int64()), 1)
            table = table.set_column(table.column_names.index("arch_version"), "arch_version", filled)
    cols = [table[n].cast(t) if n in table.column_names else pa.nulls(len(table), t)
            for n, t in zip(schema.names, schema.types)]
    return pa.table(cols, schema=schema)


def _upgrade_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of an older schema as the current one: ``started_at`` a UTC timestamp and
    ``final_loss_clipped`` filled where missing. Returns ``df`` itself when nothing changes."""
    if "run_id" in df.columns and ("arch_version" not in df.columns or df["arch_version"].isna().any()):
        # schema < 3, or a row that does not say: the model before issue 14
        old = df["arch_version"] if "arch_version" in df.columns else pd.Series(pd.NA, index=df.index)
        df = df.assign(arch_version=old.fillna(1).astype("int64"))
    if "started_at" in df.columns and not isinstance(df["started_at"].dtype, pd.DatetimeTZDtype):
        df = df.assign(started_at=_utc_timestamps(df["started_at"]).astype("datetime64[us, UTC]"))
    if {"final_loss", "L0"} <= set(df.columns):
        missing = df["final_loss_clipped"].isna() if "final_loss_clipped" in df.columns else None
        if missing is None or missing.any():
            diverged = df["diverged"] if "diverged" in df.columns else pd.Series(False, index=df.index)
            computed = [clipped_final_loss(f, l0, d) for f, l0, d in
                        zip(df["final_loss"], df["L0"], diverged.fillna(False))]
            clipped = pd.Series(computed, index=df.index, dtype=float)
            df = df.assign(final_loss_clipped=clipped if missing is None else df["final_loss_clipped"].fillna(clipped))
            if missing is None:  # keep the schema's column order: right after final_loss
                cols = [c for c in df.columns if c != "final_loss_clipped"]
                cols.insert(cols.index("final_loss") + 1, "final_loss_clipped")
                df = df[cols]
    return df


def merge_parts(out_dir: str | Path) -> None:
    """Rebuild OUT/runs.parquet and OUT/curves.parquet from the parts (and the old merged files).
    Unreadable files are set aside as ``*.corrupt``; temporaries of dead writers are removed."""
    out = Path(out_dir)
    import pyarrow.compute  # noqa: F401  (pa.compute)
    with locked(out):
        for d in (out, out / "parts" / "runs", out / "parts" / "curves"):
            clean_stale_temporaries(d)
        _merge(out, "curves", CURVES_SCHEMA)
        _merge(out, "runs", RUNS_SCHEMA)


def _current(out: Path) -> bool:
    """Do the merged files exist, read, and hold every run part?"""
    parts = {p.stem for p in _parts(out, "runs")}
    runs = _readable(out / "runs.parquet", columns=["run_id"])
    if runs is None:
        return not parts and not _parts(out, "curves")
    if (out / "curves.parquet").exists() and _readable(out / "curves.parquet", columns=["run_id"]) is None:
        return False
    if not (out / "curves.parquet").exists() and _parts(out, "curves"):
        return False
    return parts <= set(runs.column("run_id").to_pylist())


def ensure_merged(out_dir: str | Path) -> None:
    """Rebuild the merged files if they are missing, damaged or behind their parts (best effort:
    a read-only results directory is left as it is)."""
    out = Path(out_dir)
    if _current(out):
        return
    try:
        merge_parts(out)
    except OSError as e:
        _warn(f"cannot rebuild {out / 'runs.parquet'} from its parts: {e}")


def recorded_ids(out_dir: str | Path) -> set[str]:
    """Run ids in the merged runs file and in readable-looking part files (written before the merge)."""
    out = Path(out_dir)
    ids = {p.stem for p in _parts(out, "runs")}
    merged = _readable(out / "runs.parquet", columns=["run_id"])
    if merged is not None:
        ids |= set(merged.column("run_id").to_pylist())
    return ids


def recorded_run(out_dir: str | Path, run_id: str) -> dict[str, Any] | None:
    """The recorded row of run ``run_id`` (its part file, else the merged file), or None."""
    out = Path(out_dir)
    part = _readable(out / "parts" / "runs" / f"{run_id}.parquet")
    if part is not None and len(part):
        return part.to_pylist()[0]
    merged = _readable(out / "runs.parquet", filters=[("run_id", "=", run_id)])
    rows = merged.to_pylist() if merged is not None else []
    return rows[0] if rows else None


def read_runs(out_dir: str | Path) -> pd.DataFrame:
    """OUT/runs.parquet as a frame in the current schema (rebuilt from its parts if needed; older
    files upgraded: see :func:`_upgrade_runs`)."""
    ensure_merged(out_dir)
    table = _readable(Path(out_dir) / "runs.parquet")
    return _upgrade_runs(table.to_pandas()) if table is not None else _table([], RUNS_SCHEMA).to_pandas()


def read_curves(out_dir: str | Path) -> pd.DataFrame:
    ensure_merged(out_dir)
    table = _readable(Path(out_dir) / "curves.parquet")
    return table.to_pandas() if table is not None else _table([], CURVES_SCHEMA).to_pandas()


def schema_markdown() -> str:
    """The schema as Markdown tables (README / docs)."""
    lines = []
    for title, cols in (("runs.parquet", RUN_COLUMNS), ("curves.parquet", CURVE_COLUMNS)):
        lines += [f"**{title}**", "", "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{n}` | {t} | {d} |" for n, t, d in cols]
        lines.append("")
    return "\n".join(lines)


read_table_or_none = _readable  # public name: the table in a Parquet file, or None (missing or set aside)


# --- final weights (optional: `stabench run --save-model`) -------------------------------------

def weights_path(out_dir: str | Path, run_id: str) -> Path:
    """``OUT/models/<run_id>.pt``: a run's final weights, when saved."""
    return Path(out_dir) / "models" / f"{run_id}.pt"


def save_weights(out_dir: str | Path, run_id: str, config: dict[str, Any], weights: dict[str, Any]) -> Path:
    """Write a run's final weights and its config (temp file + atomic rename); returns the path."""
    import torch

    path = weights_path(out_dir, run_id)
    atomic_write(path, lambda tmp: torch.save({"run_id": run_id, "config": config, "weights": weights}, tmp))
    return path


def load_weights(out_dir: str | Path, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config dict, state_dict) of a saved run (loaded with ``weights_only=True``); FileNotFoundError
    names the file and how to make it."""
    import torch

    path = weights_path(out_dir, run_id)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved weights for run {run_id} (train it with `stabench run "
                                "--save-model`)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["config"], saved["weights"]
