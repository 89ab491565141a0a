"""Experiment-tracker logging (``log = "tensorboard" | "wandb" | "mlflow"``): the curve rows the loop
makes at its log cadence reach the tracker, one tracker run per run key, read back from what the
tracker wrote."""
from __future__ import annotations

import json
import math

import pytest

from bench.trainer import train, train_members
from bench.tracking import METRICS, open_tracker
from helpers import tiny_config


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_receives_every_curve_row_and_the_final_loss(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (in the dev extra)")
    cfg = tiny_config(steps=20)
    result = train(cfg, tracker=open_tracker("tensorboard", tmp_path))
    scalars = _scalars(tmp_path / "tensorboard" / cfg.key())
    assert scalars["train_loss"] == [(r["step"], pytest.approx(r["train_loss"])) for r in result.curve]
    assert [s for s, _ in scalars["val_loss"]] == [r["step"] for r in result.curve if r["val_loss"] is not None]
    assert set(scalars) >= set(METRICS)
    assert scalars["final/final_loss"][0][1] == pytest.approx(result.run["final_loss"])


def test_a_pack_logs_one_tracker_run_per_member_and_a_diverged_member_ends_early(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (in the dev extra)")
    cfgs = [tiny_config(lr=lr, data_seed=3, precision="fp64", steps=30) for lr in (3e-3, 1e30)]
    results = train_members(cfgs, tracker=open_tracker("tensorboard", tmp_path))
    for cfg, r in zip(cfgs, results):
        scalars = _scalars(tmp_path / "tensorboard" / cfg.key())
        assert [s for s, _ in scalars["lr"]] == [row["step"] for row in r.curve]  # lr: finite even when diverged
    assert results[1].run["diverged"] and len(results[1].curve) < len(results[0].curve)


def _wandb_records(path):
    """(kind, {key: value}) of the history and summary records of a W&B transaction log (.wandb):
    a 7-byte file header, then 32 KiB blocks of chunks, each behind a 7-byte header (crc32c,
    length, type: 1 full, 2 first, 3 middle, 4 last), a chunk never starting in a block's last 6 bytes."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            what = r.WhichOneof("record_type")
            items = r.history.item if what == "history" else r.summary.update if what == "summary" else ()
            yield what, {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_holds_the_history_and_the_run_summary(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install wandb (in the dev extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(steps=20, warmup=2)
    result = train(cfg, tracker=open_tracker("wandb", tmp_path))
    # the W&B service writes the transaction log in its own process and may still hold its last
    # records after run.finish(); they are on disk once the service stops, as at the end of
    # `stabench run` (CI once read the file a moment too early and found no records)
    wandb.teardown()
    (log,) = (tmp_path / "wandb").glob(f"wandb/offline-run-*-{cfg.key()}/run-{cfg.key()}.wandb")
    recs = list(_wandb_records(log))
    history = [h for kind, h in recs if kind == "history"]
    assert history, [kind for kind, _ in recs]
    assert [h["_step"] for h in history] == [r["step"] for r in result.curve]
    assert [h["train_loss"] for h in history] == pytest.approx([r["train_loss"] for r in result.curve])
    summary = {}
    for kind, s in recs:
        if kind == "summary":
            summary.update(s)
    assert summary["final_loss"] == pytest.approx(result.run["final_loss"])


def test_mlflow_run_holds_the_metrics(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="optional: pip install mlflow (not in the dev extra: heavy)")
    cfg = tiny_config(steps=10, warmup=2)
    result = train(cfg, tracker=open_tracker("mlflow", tmp_path))
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.search_runs([client.get_experiment_by_name("stabench").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [r["step"] for r in result.curve]
    assert math.isclose(run.data.metrics["final_final_loss"], result.run["final_loss"], rel_tol=1e-6)


def test_stabench_run_logs_to_tensorboard_with_one_flag(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (in the dev extra)")
    from bench.cli import main

    out = tmp_path / "out"
    assert main(["run", "--model", "nano", "--steps", "10", "--warmup", "2", "--vocab-size", "256",
                 "--seq-len", "32", "--batch-size", "4", "--data", "synthetic:tokens=50000", "--threads", "1",
                 "--log", "tensorboard", "--out", str(out), "--quiet"]) == 0
    (run_dir,) = (out / "tensorboard").iterdir()
    assert len(_scalars(run_dir)["train_loss"]) == 1  # log_every 10, 10 steps


def test_an_unknown_tracker_is_one_line_and_exit_2(capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--log", "neptune", "--steps", "2", "--warmup", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "log" in err and "tensorboard" in err
