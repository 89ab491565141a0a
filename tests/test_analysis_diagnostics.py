"""The study's published final-checkpoint diagnostics (../shared/data/oec_paper_diagnostics.csv)
drawn and tabulated beside local runs: ‖μ‖, mean logit, mean (log Z)²."""
import csv
import math
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from bench.analysis.claims import markdown, published_beside_local
from bench.analysis.external import read_published
from bench.analysis.figures import log2z_vs_lr, logits_vs_lr, mu_norm_vs_lr

matplotlib.use("Agg")
CSV = Path(__file__).parents[1].parent / "shared/data/oec_paper_diagnostics.csv"
pytestmark = pytest.mark.skipif(not CSV.is_file(), reason=f"published diagnostics not found at {CSV}")


def local_runs() -> pd.DataFrame:
    rows = []
    for stab in ("baseline", "mucentering"):
        for i, lr in enumerate((1e-3, 1e-2, 1e-1)):
            rows.append(dict(run_id=f"{stab}{i}", sweep="cpu", model="micro", n_params=1e6, stabilizer=stab,
                             hparams="{}", lr=lr, seed=1, weight_tying=False, precision="bf16-emu", L0=7.6,
                             final_loss=3.0, diverged=False, logit_mean=-5.0 + i, logit_absmax=12.0,
                             mu_norm=0.0 if stab == "mucentering" else 1.0 + i, mean_log2z=50.0 + i))
    return pd.DataFrame(rows)


def by_hand(model: str, stab: str, lr: float, column: str) -> float:
    with open(CSV, newline="") as f:
        for row in csv.DictReader(f):
            if (row["model"], row["stabilizer"], float(row["lr"]), row["weight_tying"]) == (model, stab, lr, "False"):
                return float(row[column])
    raise KeyError((model, stab, lr))


def test_the_diagnostics_csv_reads_with_its_columns():
    pub = read_published(CSV)
    assert len(pub) == 350
    for col in ("mu_norm", "logit_mean", "logit_std", "mean_log2z", "row_norm_mean", "row_norm_max"):
        assert pd.to_numeric(pub[col]).notna().all(), col


@pytest.mark.parametrize("draw,column", [(mu_norm_vs_lr, "mu_norm"), (logits_vs_lr, "logit_mean"),
                                         (log2z_vs_lr, "mean_log2z")])
def test_figures_draw_the_published_values_beside_the_local_ones(draw, column):
    runs, pub = local_runs(), read_published(CSV)
    alone, beside = draw(runs), draw(runs, pub)
    assert len(alone.axes[0].get_lines()) > 0
    titles = [ax.get_title() for ax in beside.axes]
    assert any(t == "16M (published)" for t in titles) and any(t == "221M (published)" for t in titles)
    ax = next(a for a in beside.axes if a.get_title() == "16M (published)" and a.get_lines())
    drawn = {tuple(line.get_xydata()[2]) for line in ax.get_lines() if len(line.get_xydata()) == 7}
    # the published baseline's third lr (3e-3) is drawn at its CSV value
    assert (0.003, by_hand("16M", "baseline", 0.003, column)) in drawn
    assert len(beside.axes) > len(alone.axes)


def test_claims_print_the_studys_mean_logit_and_mu_norm_beside_ours():
    runs, pub = local_runs(), read_published(CSV)
    table = published_beside_local(runs, pub, "logit_mean")
    row = table[(table["source"] == "16M (published)") & (table["setting"] == "baseline")].iloc[0]
    assert float(row["0.1"]) == pytest.approx(by_hand("16M", "baseline", 0.1, "logit_mean"), abs=5e-4)  # +588
    ours = table[(table["source"] == "micro (ours)") & (table["setting"] == "baseline")].iloc[0]
    assert float(ours["0.1"]) == pytest.approx(-3.0)
    text = markdown(runs, published=pub)
    assert "mean logit at the end of training" in text and "‖μ‖ at the end of training" in text
    assert math.isclose(by_hand("16M", "baseline", 0.3, "mu_norm"), 331.471, rel_tol=1e-6)
    assert "331.471" in text
