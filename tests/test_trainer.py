"""One training run: determinism, divergence as a result, checkpoints, records on disk."""
import contextlib
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


@pytest.mark.parametrize("mode,stops,recorded", [("stop", True, True), ("record", False, True), ("off", False, False)])
def test_each_divergence_rule_stops_records_or_is_off(mode, stops, recorded):
    from bench.config import DivergenceConfig
    from bench.divergence import DivergenceMonitor

    mon = DivergenceMonitor(DivergenceConfig(spike_window=32, spike=mode, loss_above_L0=mode), L0=4.0, warmup=0)
    for s in range(1, 40):
        assert mon.update(s, 3.0 + 0.01 * (s % 3), 1.0) is None
    assert (mon.update(40, 5.5, 1.0) is not None) == stops  # a spike and above L0 + 1 nat at once
    assert mon.update(41, 3.0, 1.0) is None
    assert (mon.events_text() == "loss_above_L0@40,loss_spike@40") == recorded
    assert (mon.events_text() == "") == (not recorded)


def test_a_run_whose_rules_only_record_trains_to_the_end_and_records_what_fired():
    """The study's protocol: no early stop but on a non-finite loss; the rules that fired are in the row."""
    div = {"loss_above_L0": "record", "spike": "record"}
    cfg = tiny_config(model="micro", lr=3.0, steps=60, warmup=5, log_every=1, divergence=div)
    r = train(cfg).run
    stopped = train(cfg.replace(divergence={})).run  # the default rules stop
    assert stopped["diverged"] and stopped["steps_done"] < 60
    if r["diverged"]:  # only a non-finite loss may stop it
        assert r["diverged_reason"] == "nonfinite"
    else:
        assert r["steps_done"] == 60 and r["diverged_step"] is None
    assert stopped["diverged_reason"] in r["divergence_events"]
    assert f"{stopped['diverged_reason']}@{stopped['diverged_step']}" in r["divergence_events"]


def test_final_loss_fp32_equals_final_loss_for_fp32_runs():
    r = train(tiny_config(precision="fp32")).run
    assert r["final_loss_fp32"] == r["final_loss"]
    res = train(tiny_config(precision="fp32"))
    evals = [c for c in res.curve if c["val_loss"] is not None]
    assert evals and all(c["val_loss_fp32"] == c["val_loss"] for c in evals)


def test_a_bf16_emu_run_is_evaluated_again_in_fp32_on_its_final_weights():
    from bench.data import load_data
    from bench.model import GPT
    from bench.trainer import evaluate
    from bench.stabilizers import make_stabilizer

    cfg = tiny_config(precision="bf16-emu", final_eval_batches=3)
    res = train(cfg, keep_weights=True)
    r = res.run
    assert r["final_loss_fp32"] != r["final_loss"]
    assert abs(r["final_loss_fp32"] - r["final_loss"]) < 0.05  # the rounding, not another model
    model = GPT(cfg.model_config())
    model.load_state_dict(res.weights)
    batches = load_data(cfg.data, cfg.vocab_size).val_batches(3, cfg.batch_size, cfg.seq_len)
    fp32 = evaluate(model, make_stabilizer("baseline"), batches, torch.device("cpu"), contextlib.nullcontext())
    assert r["final_loss_fp32"] == pytest.approx(fp32["val_loss"], rel=1e-6)
    evals = [c for c in res.curve if c["val_loss"] is not None]
    assert all(c["val_loss_fp32"] is not None and c["val_loss_fp32"] != c["val_loss"] for c in evals)


def test_evaluation_in_micro_batches_equals_the_whole_batch_evaluation():
    from bench.data import load_data
    from bench.model import GPT
    from bench.stabilizers import make_stabilizer
    from bench.trainer import evaluate

    cfg = tiny_config(batch_size=4)
    model = GPT(cfg.model_config())
    batches = load_data(cfg.data, cfg.vocab_size).val_batches(2, 4, cfg.seq_len)
    args = (model, make_stabilizer("baseline"), batches, torch.device("cpu"), contextlib.nullcontext())
    whole, parts = evaluate(*args), evaluate(*args, micro_batch=1)
    for k in ("val_loss", "logit_mean", "logit_std", "logit_absmax", "mean_log2z"):
        assert parts[k] == pytest.approx(whole[k], rel=1e-6), k


def test_the_final_evaluation_uses_final_eval_batches():
    a = train(tiny_config(final_eval_batches=2)).run  # eval_batches = 2: the same evaluation
    b = train(tiny_config(final_eval_batches=5)).run
    assert a["final_loss"] == train(tiny_config()).run["final_loss"]
    assert b["final_loss"] != a["final_loss"] and b["run_id"] != a["run_id"]


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


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"shared text not found at {SHAKESPEARE} (../shared/data)")
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
