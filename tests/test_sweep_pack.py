"""Packed sweeps (``[execution] pack = K``): K compatible trials trained as one batched model.

The sweep engine's guarantees hold unchanged: one ``runs.parquet`` row and one complete trial
per grid point, and a worker killed mid-pack leaves every trial of its pack to be retried; the
retries are claimed as the same pack and resume from its checkpoint.
A packed sweep's results equal the unpacked sweep's (bench/pack's equivalence, end to end).
"""
from __future__ import annotations

import signal
import textwrap
import time
from collections import Counter

import pandas as pd
import pytest
from optuna.trial import TrialState

from test_sweep_run import (TIMEOUT_S, assert_exactly_once, stabench, start_worker, study_trials, sweep_file,
                            training_starts)

LRS = (1e-3, 1e-2, 3e-2, 3.0)  # lr = 3 diverges: a diverging member beside healthy ones
STABS = "baseline = {}\nzloss.lam = [1e-4, 1e-1]"


def test_packed_sweep_records_the_same_results_as_an_unpacked_one(tmp_path):
    packed = sweep_file(tmp_path, "packed", lrs=LRS, stabilizers=STABS, steps=40, extra="pack = 4\n")
    plain = sweep_file(tmp_path, "plain", lrs=LRS, stabilizers=STABS, steps=40)
    for path in (packed, plain):
        r = stabench("sweep", str(path), "--workers", "1", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    trials = assert_exactly_once(packed, tmp_path / "results" / "packed")
    assert {t.user_attrs["pack_size"] for t in trials} == {4}  # 12 trials: baseline 4 + z-loss 8
    assert len({tuple(t.user_attrs["pack"]) for t in trials}) == 3
    a, b = (pd.read_parquet(tmp_path / "results" / n / "runs.parquet").set_index("run_id").sort_index()
            for n in ("packed", "plain"))
    assert list(a.index) == list(b.index)  # the same keys: packing does not change what is trained
    assert (a["diverged"] == b["diverged"]).all() and a["diverged"].sum() == 3
    ok = ~a["diverged"]
    # float32, 40 steps: members' sums run in another order than a single model's
    pd.testing.assert_series_equal(a.loc[ok, "final_loss"], b.loc[ok, "final_loss"], rtol=1e-4)
    pd.testing.assert_series_equal(a["diverged_step"], b["diverged_step"])


def test_sigkilled_packed_worker_resumes_its_pack_from_the_checkpoint(tmp_path):
    path = sweep_file(tmp_path, "killpack", lrs=LRS, stabilizers="baseline = {}", steps=600, extra="pack = 4\n")
    out = tmp_path / "results" / "killpack"
    first = start_worker(path, out, tmp_path / "first.log")
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # wait until the pack of 4 has written its first checkpoint
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline
        if list((out / "checkpoints").glob("pack-*.pt")):
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    running = [t for t in study_trials(path, out) if t.state == TrialState.RUNNING]
    assert len(running) == 4
    assert not (out / "runs.parquet").exists()

    second = stabench("worker", str(path), "--out", str(out), "--threads", "1", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("is no longer running; retrying as trial") == 4
    trials = assert_exactly_once(path, out)
    failed = sorted(t.number for t in trials if t.state == TrialState.FAIL)
    assert failed == sorted(t.number for t in running)
    retries = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(t.system_attrs.get("retry_history") for t in retries) and len(retries) == 4
    assert {t.user_attrs["pack_size"] for t in retries} == {4}
    assert all(t.user_attrs["resumed_from_step"] > 0 for t in retries)  # the whole pack resumed, not restarted
    assert second.stdout.count("resuming from checkpoint step") == 4
    logs = (tmp_path / "first.log").read_text() + second.stdout
    assert training_starts(logs) == Counter({t.user_attrs["key"]: 2 for t in retries})
    assert not list((out / "checkpoints").glob("pack-*"))  # checkpoint and its member list removed when done

    # every member's curve and run equal an uninterrupted pack's
    whole = stabench("sweep", str(path), "--workers", "1", "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    a, b = (pd.read_parquet(d / "curves.parquet").sort_values(["run_id", "step"]).reset_index(drop=True)
            for d in (out, tmp_path / "whole"))
    pd.testing.assert_frame_equal(a, b)
    a, b = (pd.read_parquet(d / "runs.parquet").set_index("run_id").sort_index() for d in (out, tmp_path / "whole"))
    assert a["diverged"].sum() == 1
    pd.testing.assert_frame_equal(a[["final_loss", "best_val_loss", "diverged_step", "steps_done"]],
                                  b[["final_loss", "best_val_loss", "diverged_step", "steps_done"]])


def test_a_pack_whose_stabilizer_cannot_be_vectorized_is_trained_one_trial_at_a_time(tmp_path):
    plugin = tmp_path / "branchy.py"
    plugin.write_text(textwrap.dedent("""\
        from dataclasses import dataclass
        from bench.stabilizers import Stabilizer

        @dataclass(frozen=True)
        class Branchy(Stabilizer):
            name = "branchy"
            lam: float = 1.0

            def loss_term(self, inputs):
                return self.lam * inputs.lse.mean() if self.lam > 0.5 else None  # data-dependent: no vmap
        """))
    path = sweep_file(tmp_path, "branchy", lrs=(1e-3, 1e-2), stabilizers=f'"{plugin}:Branchy".lam = [1.0, 0.2]',
                      extra="pack = 4\n")
    r = stabench("sweep", str(path), "--workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    trials = assert_exactly_once(path, tmp_path / "results" / "branchy")
    assert all(t.user_attrs["pack_size"] == 1 and "cannot be vectorized" in t.user_attrs["unpacked_reason"]
               for t in trials)
    log = (tmp_path / "results" / "branchy").glob("**/*.log")
    assert "training its trials one at a time" in r.stdout + r.stderr + "".join(p.read_text() for p in log)


@pytest.mark.parametrize("value,message", [('"big"', "execution.pack"), ("0", "must be \"auto\" or an integer >= 1")])
def test_an_invalid_pack_size_is_a_clear_error(tmp_path, value, message):
    path = sweep_file(tmp_path, "badpack", extra=f"pack = {value}\n")
    r = stabench("sweep", str(path), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and str(path) in r.stderr, r.stderr
    assert not (tmp_path / "results").exists()
