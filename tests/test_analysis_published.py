"""The analysis tables on the reference study's published runs (../shared/data/oec_paper_runs.csv).

Expected values are computed here independently, by plain loops over the CSV rows with the
csv module and the formula LRS = Σ [min(L, L0) − min L] / (n − 1), L0 = ln 50304.
"""
import csv
import math
from collections import defaultdict
from pathlib import Path

import pytest

from bench.analysis.external import read_published
from bench.analysis.metrics import lambda_sensitivity, lrs_table
from bench.analysis.tables import by_model_table, lambda_table

CSV = Path(__file__).parents[1].parent / "shared/data/oec_paper_runs.csv"
L0 = math.log(50304)

pytestmark = pytest.mark.skipif(not CSV.is_file(), reason=f"published results not found at {CSV}")


@pytest.fixture(scope="module")
def curves() -> dict[tuple[str, str, float], list[tuple[float, float]]]:
    """(model, stabilizer, λ) → [(lr, final loss)], straight from the CSV rows."""
    out = defaultdict(list)
    with open(CSV, newline="") as f:
        for row in csv.DictReader(f):
            out[(row["model"], row["stabilizer"], float(row["lam"]))].append((float(row["lr"]),
                                                                               float(row["final_loss"])))
    return dict(out)


def by_hand_lrs(points: list[tuple[float, float]]) -> float:
    treated = []
    for _, loss in points:
        treated.append(min(loss, L0) if math.isfinite(loss) else L0)
    best = min(treated)
    total = 0.0
    for t in treated:
        total += t - best
    return total / (len(treated) - 1)


def by_hand_best(points: list[tuple[float, float]]) -> tuple[float, float]:
    best_lr, best = None, math.inf
    for lr, loss in sorted(points):
        if math.isfinite(loss) and loss < best:
            best_lr, best = lr, loss
    return best, best_lr


@pytest.fixture(scope="module")
def published():
    return read_published(CSV)


def _key(row) -> tuple[str, str, float]:
    return (row["model"], row["stabilizer"], 0.0 if math.isnan(row["hp_value"]) else row["hp_value"])


def test_every_published_curve_becomes_one_row(curves, published):
    table = lrs_table(published)
    assert len(table) == len(curves) == 50  # 5 models × (baseline, mucentering, 4 z-loss λ, 4 μ-loss λ)
    assert set(table["n_lrs"]) == {7} and table["n_diverged"].sum() == 0  # 10.812 < L0 = 10.826 is not diverged


def test_lrs_table_per_model_size_and_stabilizer(curves, published):
    table = lrs_table(published)
    got = {_key(r): r["lrs"] for r in table.to_dict("records")}
    for key, points in curves.items():
        assert got[key] == pytest.approx(by_hand_lrs(points), abs=1e-12), key
    # the Markdown table by model size shows the same numbers, rounded
    wide = by_model_table(published, "lrs").set_index("stabilizer")
    assert list(wide.columns) == ["16M", "29M", "57M", "109M", "221M"]  # ordered by size, not by name
    for model in wide.columns:
        assert wide.loc["baseline", model] == f"{by_hand_lrs(curves[(model, 'baseline', 0.0)]):.3f}"
        assert wide.loc["zloss (λ=1e-4)", model] == f"{by_hand_lrs(curves[(model, 'zloss', 1e-4)]):.3f}"
        assert wide.loc["mucentering", model] == f"{by_hand_lrs(curves[(model, 'mucentering', 0.0)]):.3f}"


def test_best_loss_table(curves, published):
    table = lrs_table(published)
    for r in table.to_dict("records"):
        best, best_lr = by_hand_best(curves[_key(r)])
        assert (r["best_loss"], r["best_lr"]) == (pytest.approx(best), best_lr), _key(r)
    wide = by_model_table(published, "best_loss").set_index("stabilizer")
    assert wide.loc["muloss (λ=100)", "221M"] == f"{by_hand_best(curves[('221M', 'muloss', 100.0)])[0]:.3f}"


def test_lambda_sensitivity_table(curves, published):
    lam = lambda_sensitivity(published)
    assert sorted(lam["stabilizer"].unique()) == ["muloss", "zloss"] and len(lam) == 10
    for r in lam.to_dict("records"):
        lrs = [by_hand_lrs(pts) for (m, s, la), pts in curves.items() if m == r["model"] and s == r["stabilizer"]]
        best = [by_hand_best(pts)[0] for (m, s, la), pts in curves.items()
                if m == r["model"] and s == r["stabilizer"]]
        assert len(lrs) == r["n_values"] == 4
        assert r["lrs_spread"] == pytest.approx(max(lrs) - min(lrs))
        assert r["best_loss_spread"] == pytest.approx(max(best) - min(best))
    shown = lambda_table(published).set_index(["model", "stabilizer"])
    zl = [by_hand_lrs(pts) for (m, s, _), pts in curves.items() if (m, s) == ("57M", "zloss")]
    assert shown.loc[("57M", "zloss"), "LRS spread"] == f"{max(zl) - min(zl):.3f}"
    assert shown.loc[("57M", "zloss"), "λ grid"] == "1e-7, 1e-4, 0.1, 100"


def test_the_study_comparisons_reproduce(published):
    """The published claims the metrics must recover: μ-centering and μ-loss are less LR-sensitive than
    baseline at every size, and μ-loss is far less sensitive to λ than z-loss."""
    t = lrs_table(published).set_index(["model", "setting"])["lrs"]
    lam = lambda_sensitivity(published).set_index(["model", "stabilizer"])["lrs_spread"]
    for model in ("16M", "29M", "57M", "109M", "221M"):
        assert t[(model, "mucentering")] < t[(model, "baseline")]
        assert t[(model, "muloss (λ=1e-4)")] < t[(model, "baseline")]
        assert lam[(model, "muloss")] < lam[(model, "zloss")] / 5
