"""Claims (a)-(e) of the reference study, judged from runs: the verdict rules on planted data."""
import numpy as np
import pandas as pd

from bench.analysis.claims import claims_table, lambda_verdict, markdown
from test_analysis_metrics import runs_frame

LRS_GRID = (1e-3, 1e-2, 1e-1)


def curve(stab: str, model: str, seed: int, excess: float, tied: bool = False, lam=None) -> list[dict]:
    """Three lrs: best loss 3.0 at 1e-2, the others 3.0 + excess → LRS = 2·excess / 2 = excess."""
    return [{"model": model, "stabilizer": stab, "seed": seed, "lr": lr, "weight_tying": tied, "lam": lam,
             "final_loss": 3.0 + (0 if lr == 1e-2 else excess)} for lr in LRS_GRID]


def study(mu_excess: float, noise: float = 0.01) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for model in ("nano", "micro"):
        for seed in (1, 2, 3):
            for tied in (False, True):
                rows += curve("baseline", model, seed, 1.0 + noise * rng.standard_normal(), tied)
                rows += curve("zloss", model, seed, 0.8 + noise * rng.standard_normal(), tied, lam=1e-4)
                rows += curve("softcap", model, seed, mu_excess + noise * rng.standard_normal(), tied)
                rows += curve("muloss", model, seed, mu_excess + noise * rng.standard_normal(), tied, lam=1e-4)
                rows += curve("mucentering", model, seed, mu_excess + noise * rng.standard_normal(), tied)
    return runs_frame(rows)


def test_clearly_lower_mu_methods_support_a_b_c_d():
    t = claims_table(study(mu_excess=0.2)).set_index("claim")["verdict"]
    assert t["(a) lower LRS than the baseline"] == "supported"
    assert t["(b) lower LRS than z-loss"] == "supported"
    assert t["(c) LRS on par with soft-capping"] == "supported"
    assert t["(d) tied: lower LRS than the baseline"] == "supported"
    assert t["(e) μ-loss less sensitive to λ than z-loss"] == "no data"


def test_higher_mu_methods_contradict_a_and_b():
    t = claims_table(study(mu_excess=2.0)).set_index("claim")["verdict"]
    assert t["(a) lower LRS than the baseline"] == "contradicted"
    assert t["(b) lower LRS than z-loss"] == "contradicted"


def test_on_par_is_an_equivalence_within_the_margin():
    from bench.analysis.claims import Comparison, par_verdict
    small_but_significant = Comparison("muloss", "softcap", False, 6, -0.02, (-0.03, -0.01), 0.03)
    assert par_verdict(small_but_significant) == "supported"
    assert par_verdict(Comparison("muloss", "softcap", False, 6, 0.5, (0.3, 0.7), 0.03)) == "contradicted"
    assert par_verdict(Comparison("muloss", "softcap", False, 6, 0.1, (-0.2, 0.4), 0.5)) == "inconclusive"


def test_noise_larger_than_the_effect_shows_nothing():
    t = claims_table(study(mu_excess=0.95, noise=1.0)).set_index("claim")["verdict"]
    assert t["(a) lower LRS than the baseline"] in ("not shown", "mixed")


def test_lambda_claim_needs_every_seed_to_agree():
    rows = []
    for seed in (1, 2, 3):
        for lam in (1e-7, 1e-4, 1e-1, 1e2):
            rows += curve("zloss", "nano", seed, 2.0 if lam == 1e2 else 0.3, lam=lam)
            rows += curve("muloss", "nano", seed, 0.35 if lam == 1e2 else 0.3, lam=lam)
    verdict, evidence = lambda_verdict(runs_frame(rows))
    assert verdict == "supported" and "3/3" in evidence
    flipped = runs_frame([{**r, "stabilizer": {"zloss": "muloss", "muloss": "zloss"}[r["stabilizer"]]} for r in rows])
    assert lambda_verdict(flipped)[0] == "contradicted"


def test_markdown_restricts_the_grid_on_request():
    text = markdown(study(0.2), lr_max=1e-2)
    assert "Learning-rate grid: 0.001, 0.01 (2 points)" in text and "Verdicts" in text
