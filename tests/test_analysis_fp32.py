"""Analysis on the fp32 re-evaluation: `--loss final_loss_fp32` scores every table, figure and LRS
by it, and `stabench claims` reports the verdicts on both losses."""
import math

import pandas as pd
import pytest

from bench.analysis.claims import markdown
from bench.analysis.metrics import lrs_table
from bench.analysis.results import use_loss

L0 = math.log(2048)


def runs_with_offset_rounding() -> pd.DataFrame:
    """Baseline loses to μ-centering at high lr in the run's precision only; in fp32 they are equal."""
    rows = []
    for seed in (1, 2, 3):
        for stab in ("baseline", "mucentering"):
            for lr in (0.01, 0.1, 1.0):
                fp32 = 3.0 + lr
                run_prec = fp32 + (0.5 if stab == "baseline" and lr == 1.0 else 0.0)
                rows.append(dict(model="nano", stabilizer=stab, hparams="{}", lr=lr, seed=seed, weight_tying=False,
                                 precision="bf16-emu", L0=L0, vocab_size=2048, final_loss=run_prec,
                                 final_loss_fp32=fp32, diverged=False))
    return pd.DataFrame(rows)


def test_use_loss_rescores_the_runs_by_the_fp32_loss():
    runs = runs_with_offset_rounding()
    fp32 = use_loss(runs, "final_loss_fp32")
    assert (fp32["final_loss"] == runs["final_loss_fp32"]).all()
    assert (fp32["loss"] == fp32["final_loss_fp32"]).all() and (fp32["final_loss_run_precision"] == runs["final_loss"]).all()
    lrs = lrs_table(runs).set_index("stabilizer")["lrs"]
    lrs32 = lrs_table(fp32).set_index("stabilizer")["lrs"]
    assert lrs["baseline"] > lrs["mucentering"]
    assert lrs32["baseline"] == pytest.approx(lrs32["mucentering"])
    assert use_loss(runs) is runs
    with pytest.raises(ValueError, match="final_loss_fp32"):
        use_loss(runs.drop(columns="final_loss_fp32"), "final_loss_fp32")


def test_claims_report_the_verdicts_on_both_losses():
    text = markdown(runs_with_offset_rounding())
    assert text.count("Verdicts") >= 2 and "fp32 evaluation" in text
    fp32_only = runs_with_offset_rounding().assign(final_loss=lambda d: d["final_loss_fp32"])
    assert "fp32 evaluation" not in markdown(fp32_only)  # one loss: one set of verdicts
