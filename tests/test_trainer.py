"""One training run: determinism, divergence as a result, checkpoints, records on disk."""
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from bench import records
from bench.records import CURVE_COLUMNS, RUN_COLUMNS
from bench.trainer import lr_at, train
from helpers import tiny_config

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def test_schedule_is_the_studys_linear_warmup_then_cosine_to_min_lr():
    cfg = tiny_config(lr=1.0, min_lr=0.01, warmup=10, steps=110)
    assert lr_at(cfg, 0) == pytest.approx(1 / 11)  # lr·(it+1)/(warmup+1), as the study's train.py
    assert lr_at(cfg, 9) == pytest.approx(10 / 11)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert lr_at(cfg, 109) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_at(cfg, 109) > 0.01


def test_two_identical_cpu_runs_give_identical_curves():
    a = train(tiny_config(stabilizer="zloss", hparams={"lam": 1e-3}))
    b = train(tiny_config(stabilizer="zloss", hparams={"lam": 1e-3}))
    assert a.curve == b.curve
    assert a.run["final_loss"] == b.run["final_loss"]


def test_training_learns_the_synthetic_corpus():
    r = train(tiny_config(lr=1e-2, steps=60)).run
    assert not r["diverged"]
    assert r["final_loss"] < r["L0"] - 0.5  # well below a uniform prediction


def test_planted_divergence_is_recorded_not_raised():
    r = train(tiny_config(model="micro", lr=10.0, steps=200, warmup=10, log_every=1)).run
    assert r["diverged"] is True
    assert r["diverged_reason"] in {"nonfinite", "loss_above_L0", "loss_spike"}
    assert 10 < r["diverged_step"] < 200
    assert r["steps_done"] == r["diverged_step"]


def test_spike_rule_stops_a_run_with_a_loss_jump():
    from bench.config import DivergenceConfig
    from bench.divergence import DivergenceMonitor

    mon = DivergenceMonitor(DivergenceConfig(spike_window=32), L0=10.0, warmup=0)
    reasons = [mon.update(s, 3.0 + 0.01 * (s % 3), 1.0) for s in range(1, 40)]
    assert not any(reasons) and mon.spike_score < 6
    assert mon.update(40, 5.0, 1.0) == "loss_spike"
    assert mon.spike_score > 6


def test_checkpoint_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = tiny_config(steps=30)
    full = train(cfg)
    ckpt = tmp_path / "run.pt"
    # interrupt: a run of the same key that stops after its first checkpoint at step 10
    first = train(cfg.replace(steps=30), checkpoint=ckpt, checkpoint_every=10, stop_at=10)
    assert ckpt.exists() and first is None
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 10
    resumed = train(cfg, checkpoint=ckpt, checkpoint_every=10)
    assert not ckpt.exists()  # removed once the run is recorded
    assert resumed.curve == full.curve
    assert resumed.run["final_loss"] == full.run["final_loss"]


def _check_written(out: Path, n_runs: int):
    runs = pq.read_table(out / "runs.parquet")
    curves = pq.read_table(out / "curves.parquet")
    assert runs.schema.names == [c for c, _, _ in RUN_COLUMNS]
    assert curves.schema.names == [c for c, _, _ in CURVE_COLUMNS]
    assert runs.schema.metadata[b"schema_version"] == str(records.SCHEMA_VERSION).encode()
    assert runs.num_rows == n_runs
    assert set(curves.column("run_id").to_pylist()) == set(runs.column("run_id").to_pylist())
    return runs.to_pandas(), curves.to_pandas()


def test_synthetic_and_text_runs_finish_and_write_valid_parquet(tmp_path, monkeypatch):
    monkeypatch.setenv("STABENCH_CACHE", str(tmp_path / "cache"))
    for cfg in (tiny_config(), tiny_config(data=f"text:{SHAKESPEARE}", vocab_size=512)):
        res = train(cfg)
        records.write_run(tmp_path / "out", res.run, res.curve)
    runs, curves = _check_written(tmp_path / "out", 2)
    assert set(runs["data"].str.split(":").str[0]) == {"synthetic", "text"}
    assert runs["final_loss"].between(0, runs["L0"].max() + 1).all()
    assert curves.groupby("run_id")["val_loss"].count().min() >= 3  # evals at 10, 20, 30


def test_rewriting_a_run_replaces_its_row_not_duplicates(tmp_path):
    res = train(tiny_config(steps=10, warmup=2))
    for _ in range(2):
        records.write_run(tmp_path, res.run, res.curve)
    runs, curves = _check_written(tmp_path, 1)
    assert len(curves) == len(res.curve)


def test_diagnostics_of_the_mechanism_are_recorded():
    r = train(tiny_config(precision="fp32")).run
    assert -1 <= r["mu_hidden_cos"] <= 1
    assert r["logit_precision_error"] == 0.0  # fp32 vs fp32
    assert 0 <= r["isotropy"] <= 1
    assert r["mu_norm"] > 0
    rb = train(tiny_config(precision="bf16", steps=10, warmup=2)).run
    assert rb["precision"] == "bf16" and rb["logit_precision_error"] > 0
    re = train(tiny_config(precision="bf16-emu", steps=10, warmup=2)).run
    assert re["precision"] == "bf16-emu" and re["logit_precision_error"] > 0


def test_emulated_bf16_rounds_logits_like_autocast():
    """bf16-emu (bf16-rounded matmul inputs and outputs, fp32 arithmetic) puts an error of the
    size of autocast's into the logits, is deterministic, and leaves fp32 untouched outside."""
    from bench.model import GPT
    from bench.precision import BF16Rounding, precision_context

    torch.manual_seed(0)
    model = GPT(tiny_config().model_config())
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        fp32, _ = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            native, _ = model(x)
        with precision_context("bf16-emu", torch.device("cpu")) as mode:
            emu, _ = model(x)
        with mode:  # one instance serves every step
            again, _ = model(x)
        after, _ = model(x)
    assert isinstance(mode, BF16Rounding) and emu.dtype == torch.float32
    err_native, err_emu = (native.float() - fp32).abs().max(), (emu - fp32).abs().max()
    assert err_emu > 0 and 0.25 < err_emu / err_native < 4
    assert torch.equal(emu, again) and torch.equal(after, fp32)
    assert torch.equal(emu, emu.to(torch.bfloat16).float())  # the logits are bf16 values


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_a_checkpoint_that_does_not_load_is_set_aside_and_the_run_restarts(tmp_path, capsys, content):
    cfg = tiny_config(steps=20)
    ckpt = tmp_path / "run.pt"
    if content == "truncated":  # a real checkpoint cut short, as a full disk or a kill mid-write leaves it
        train(cfg, checkpoint=ckpt, checkpoint_every=10, stop_at=10)
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    else:
        ckpt.write_bytes(content)
    result = train(cfg, checkpoint=ckpt, checkpoint_every=10)
    assert result.curve == train(cfg).curve  # trained from step 0
    assert (tmp_path / "run.pt.corrupt").exists() and not ckpt.exists()
    err = capsys.readouterr().err
    assert str(ckpt) in err and "set aside" in err
