"""The committed study results are reproducible by the code on main.

One point of ``results/cpu-repro`` (micro, μ-centering, tied: the hook and the tying path) is
re-trained from the ``config`` recorded in its run row (read by ``from_stored``, which gives a
record from before ``adamw`` existed the kernels it was trained with: AdamW's foreach path and the
unchunked head) for its first 30 steps, and its curve must match the committed one.

On the CPU model and vector ISA that produced the results (the run row's ``device``, one thread) the rerun is
bit-identical, and the tolerance is 1e-3 relative on four columns. The run uses bf16-emu, where
a last-bit difference of an fp32 kernel can flip a bf16 rounding and grow: switching AdamW's
for-loop for its fused kernel moved the loss at step 10 by 0.15 %, and β2 = 0.99 instead of 0.95
by more, both caught here.

On another CPU model MKL takes other code paths and the rerun cannot be bit-identical, and at lr 0.1
the point is chaotic in bf16-emu: on an AVX-512 Xeon (Sapphire Rapids) main differs from the AMD EPYC
curve by 3.5 % in train loss at step 20, as much as β2 = 0.99 or lr × 1.01 do there (measured). So on
another CPU the test re-trains the calm point at lr 0.01 instead and compares train loss at 1e-3
relative: there main differed from the EPYC curve by ≤ 2e-4 at steps 10–30, while β2 = 0.99 (3.8 %),
ε = 1e-6 (0.24 %), lr × 1.01 (0.89 %) and a warmup one step longer (4.5 %) all exceed 1e-3 by step 30
(measured on the same Xeon). The centring check holds on any CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from bench.config import from_stored
from bench.provenance import device_name
from bench.trainer import train

RESULTS = Path(__file__).resolve().parents[1] / "results" / "cpu-repro"
POINT = {"model": "micro", "stabilizer": "mucentering", "weight_tying": True, "lr": 0.1, "seed": 1}
CALM_LR = 0.01
"""The learning rate of the point compared on a CPU other than the one that produced the results."""
STEPS = 30


def test_a_committed_cpu_repro_point_is_reproduced_by_main(tmp_path):
    runs = pd.read_parquet(RESULTS / "runs.parquet")
    # exact only where the recorded device names the CPU's vector ISA too: "cpu (AMD EPYC)" covers
    # AVX2-only and AVX-512 parts, whose kernels round differently (0.75 % apart at step 10, seen here)
    capability = torch.backends.cpu.get_cpu_capability().lower()
    recorded = runs["device"].iloc[0]
    same_cpu = recorded == device_name(torch.device("cpu")) and capability in recorded.lower()
    point = POINT if same_cpu else {**POINT, "lr": CALM_LR}
    row = runs.loc[(runs[list(point)] == pd.Series(point)).all(axis=1)]
    assert len(row) == 1, f"results/cpu-repro must hold the point {point} exactly once"
    row = row.iloc[0]
    cfg = from_stored(json.loads(row["config"]))
    assert (cfg.adamw, cfg.head_chunk) == ("foreach", 0)  # the kernels of that time, not today's defaults
    assert cfg.key() == row["run_id"]  # the recorded config still describes the same run

    ckpt = tmp_path / "point.pt"
    assert train(cfg, checkpoint=ckpt, stop_at=STEPS) is None  # stops after step 30, curve in the checkpoint
    new = pd.DataFrame(torch.load(ckpt, weights_only=True)["members"][0]["curve"]).set_index("step")
    curves = pd.read_parquet(RESULTS / "curves.parquet")
    old = curves[curves["run_id"] == row["run_id"]].set_index("step").loc[new.index]
    assert list(new.index) == [10, 20, 30]
    columns = ("train_loss", "grad_norm", "mu_norm", "logit_absmax") if same_cpu else ("train_loss",)
    rtol = 1e-3
    for col in columns:
        pd.testing.assert_series_equal(new[col], old[col], rtol=rtol, check_names=False, obj=col)
    assert new["mu_norm"].max() < 1e-3 * old["logit_absmax"].max()  # centered: μ ≈ 0 after every step
