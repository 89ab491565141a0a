"""The analysis metrics and statistics on small hand-computed examples.

Every expected value is worked out in the comment next to it from the definitions:
LRS = Σ_lr [min(L(lr), L0) − min_lr L(lr)] / (n − 1), diverged or non-finite losses count as L0.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest

from bench.analysis.external import nominal_params, published_frame
from bench.analysis.metrics import (divergence_rate, lambda_sensitivity, lr_sensitivity, lrs_table,
                                    step_time_overhead, treated_losses)
from bench.analysis.palette import BUILTIN_COLORS, stabilizer_colors
from bench.analysis.results import format_value, prepare_runs, setting_order
from bench.analysis.stats import (bootstrap_ci, compare_to_reference, mean_se, paired_signflip_test,
                                  seed_summary)
from bench.analysis.tables import latex_escape, sensitivity_table, to_latex, to_markdown

LN256 = 5.545177444479562  # ln 256, L0 of a 256-token vocabulary


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """A runs frame with the columns of runs.parquet that the metrics read."""
    base = {"model": "nano", "n_params": 30_000, "vocab_size": 256, "L0": LN256, "stabilizer": "baseline",
            "lam": None, "cap": None, "seed": 1, "weight_tying": False, "diverged": False}
    out = []
    for r in rows:
        row = {**base, **r}
        hp = {k: row[k] for k in ("lam", "cap") if row[k] is not None}
        row["hparams"] = json.dumps(hp)
        out.append(row)
    return pd.DataFrame(out)


# -- lr_sensitivity -------------------------------------------------------------------------

def test_lrs_of_a_plain_curve_is_the_mean_excess_over_the_best_rate():
    # losses 3.0, 2.5, 4.0; min 2.5; excess 0.5 + 0 + 1.5 = 2.0; n − 1 = 2  → 1.0
    assert lr_sensitivity([3.0, 2.5, 4.0], L0=5.0) == pytest.approx(1.0)


def test_a_diverged_point_counts_as_L0_whatever_its_loss():
    # the third run diverged (loss 0.1 recorded) → counts as L0 = 5: excess 0.5 + 0 + 2.5 = 3.0 → 1.5
    assert lr_sensitivity([3.0, 2.5, 0.1], L0=5.0, diverged=[False, False, True]) == pytest.approx(1.5)


def test_non_finite_losses_count_as_L0():
    # NaN and inf → L0 = ln 256 = 5.5452; min 2.0; excess 3.5452 + 0 + 3.5452 + 1.0 = 8.0904; / 3 = 2.6968
    assert lr_sensitivity([math.nan, 2.0, math.inf, 3.0], L0=LN256) == pytest.approx(2.6967849629863747)


def test_a_loss_above_L0_is_capped_at_L0():
    # min(6, 5) = 5; excess 3.0 over 2.0; n − 1 = 1 → 3.0
    assert lr_sensitivity([6.0, 2.0], L0=5.0) == pytest.approx(3.0)
    assert treated_losses([6.0, 2.0, -math.inf], 5.0).tolist() == [5.0, 2.0, 5.0]


def test_flat_all_diverged_and_single_point_curves():
    assert lr_sensitivity([3.0, 3.0, 3.0], L0=5.0) == 0.0
    assert lr_sensitivity([math.nan, math.nan], L0=5.0) == 0.0  # never below L0: 0, not negative
    assert math.isnan(lr_sensitivity([3.0], L0=5.0))


# -- the runs-frame helpers -----------------------------------------------------------------

@pytest.fixture
def two_seed_runs() -> pd.DataFrame:
    return runs_frame([
        # seed 1: 3.0, 2.5, diverged  → treated 3.0, 2.5, L0 ; seed 2: 3.2, 2.9, 2.7
        {"lr": 1e-3, "seed": 1, "final_loss": 3.0}, {"lr": 1e-2, "seed": 1, "final_loss": 2.5},
        {"lr": 1e-1, "seed": 1, "final_loss": 50.0, "diverged": True},
        {"lr": 1e-3, "seed": 2, "final_loss": 3.2}, {"lr": 1e-2, "seed": 2, "final_loss": 2.9},
        {"lr": 1e-1, "seed": 2, "final_loss": 2.7},
    ])


def test_lrs_table_per_seed(two_seed_runs):
    t = lrs_table(two_seed_runs, by_seed=True).set_index("seed")
    # seed 1: (0.5 + 0 + (L0 − 2.5)) / 2 = (0.5 + 3.045177) / 2 = 1.772589
    assert t.loc[1, "lrs"] == pytest.approx((0.5 + LN256 - 2.5) / 2)
    assert (t.loc[1, "best_loss"], t.loc[1, "best_lr"], t.loc[1, "n_diverged"]) == (2.5, 1e-2, 1)
    # seed 2: (0.5 + 0.2 + 0) / 2 = 0.35, best 2.7 at lr 0.1
    assert t.loc[2, "lrs"] == pytest.approx(0.35)
    assert (t.loc[2, "best_loss"], t.loc[2, "best_lr"], t.loc[2, "n_lrs"]) == (2.7, 1e-1, 3)


def test_lrs_table_over_seeds_averages_per_seed_values(two_seed_runs):
    (row,) = lrs_table(two_seed_runs).to_dict("records")
    assert row["lrs"] == pytest.approx(((0.5 + LN256 - 2.5) / 2 + 0.35) / 2)
    assert row["best_loss"] == pytest.approx((2.5 + 2.7) / 2)
    # seed-averaged curve: 3.1, 2.7, (L0 + 2.7)/2 = 4.12 → best lr 0.01
    assert row["best_lr"] == 1e-2
    assert (row["n_lrs"], row["n_runs"], row["n_diverged"], row["n_seeds"], row["seeds"]) == (3, 6, 1, 2, "1,2")


def test_best_lr_is_undefined_when_every_rate_diverged():
    runs = runs_frame([{"lr": 1e-2, "final_loss": math.nan}, {"lr": 1e-1, "final_loss": 9.0, "diverged": True}])
    (row,) = lrs_table(runs).to_dict("records")
    assert row["best_loss"] == pytest.approx(LN256) and math.isnan(row["best_lr"]) and row["lrs"] == 0.0


def test_groups_are_model_stabilizer_hyperparameters_and_weight_tying():
    rows = []
    for stab, lam, tied in (("baseline", None, False), ("baseline", None, True), ("zloss", 1e-4, False),
                            ("zloss", 1e-1, False)):
        rows += [{"stabilizer": stab, "lam": lam, "weight_tying": tied, "lr": lr, "final_loss": 3.0}
                 for lr in (1e-3, 1e-2)]
    t = lrs_table(runs_frame(rows))
    assert len(t) == 4
    assert set(t["setting"]) == {"baseline, untied", "baseline, tied", "zloss (λ=1e-4), untied",
                                 "zloss (λ=0.1), untied"}


def test_lambda_sensitivity_spread_per_stabilizer_and_model():
    rows = [{"stabilizer": "zloss", "lam": 1e-4, "lr": lr, "final_loss": x}  # LRS (0.5+0+1.5)/2 = 1.0, best 2.5
            for lr, x in ((1e-3, 3.0), (1e-2, 2.5), (1e-1, 4.0))]
    rows += [{"stabilizer": "zloss", "lam": 1e-1, "lr": lr, "final_loss": x}  # LRS (0.2+0+0.2)/2 = 0.2, best 2.8
             for lr, x in ((1e-3, 3.0), (1e-2, 2.8), (1e-1, 3.0))]
    rows += [{"stabilizer": "baseline", "lr": lr, "final_loss": 3.0} for lr in (1e-3, 1e-2)]  # no λ: no row
    (row,) = lambda_sensitivity(runs_frame(rows)).to_dict("records")
    assert (row["stabilizer"], row["hp_name"], row["n_values"], row["values"]) == ("zloss", "lam", 2, "1e-4, 0.1")
    assert row["lrs_spread"] == pytest.approx(0.8) and row["best_loss_spread"] == pytest.approx(0.3)
    assert (row["hp_at_min_lrs"], row["hp_at_best_loss"]) == (1e-1, 1e-4)


def test_divergence_rate_counts_diverged_and_non_finite_runs():
    runs = runs_frame([{"lr": 1e-3, "final_loss": 3.0}, {"lr": 1e-2, "final_loss": math.inf},
                       {"lr": 1e-1, "final_loss": 9.0, "diverged": True},
                       {"stabilizer": "zloss", "lam": 1e-4, "lr": 1e-1, "final_loss": 3.0}])
    rate = divergence_rate(runs).set_index("stabilizer")
    assert (rate.loc["baseline", "n_diverged"], rate.loc["baseline", "n_runs"]) == (2, 3)
    assert rate.loc["baseline", "rate"] == pytest.approx(2 / 3) and rate.loc["zloss", "rate"] == 0.0


def test_step_time_overhead_relative_to_baseline():
    runs = runs_frame([
        {"lr": 1e-3, "final_loss": 3.0, "step_time_s": 0.010}, {"lr": 1e-2, "final_loss": 3.0, "step_time_s": 0.012},
        # zloss: medians 0.0132; muloss has no step_time_s: wall 1.2 s / 100 steps = 0.012
        {"stabilizer": "zloss", "lam": 1e-4, "lr": 1e-3, "final_loss": 3.0, "step_time_s": 0.0132},
        {"stabilizer": "muloss", "lam": 1e-4, "lr": 1e-3, "final_loss": 3.0, "step_time_s": math.nan,
         "wall_time_s": 1.2, "steps_done": 100},
    ])
    t = step_time_overhead(runs).set_index("stabilizer")
    assert t.loc["baseline", "step_time_s"] == pytest.approx(0.011)  # median of 0.010, 0.012
    assert t.loc["zloss", "overhead"] == pytest.approx(0.0132 / 0.011 - 1)  # +20 %
    assert t.loc["muloss", "overhead"] == pytest.approx(0.012 / 0.011 - 1)
    assert t.loc["baseline", "overhead"] == 0.0


# -- statistics over seeds ------------------------------------------------------------------

def test_mean_and_standard_error():
    # sd of 1..4 = √(5/3) = 1.290994; SE = sd / √4 = 0.645497
    assert mean_se([1, 2, 3, 4]) == pytest.approx((2.5, 0.6454972243679028))
    assert math.isnan(mean_se([2.0])[1])


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    x = [0.3, 0.5, 0.4, 0.6, 0.2]
    lo, hi = bootstrap_ci(x)
    assert 0.2 <= lo < np.mean(x) < hi <= 0.6
    assert bootstrap_ci(x) == (lo, hi)
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in bootstrap_ci([0.7]))


def test_signflip_test_enumerates_sign_patterns_exactly():
    # d = 1, 2, 3: of the 8 sign patterns only +++ and −−− reach |mean| ≥ 2  → p = 2/8
    assert paired_signflip_test([2, 4, 6], [1, 2, 3]) == 0.25
    # d = 1, 2, −0.5: |sum| ≥ 2.5 for +++ (3.5), ++− (2.5), −−+ (2.5), −−− (3.5) → p = 4/8
    assert paired_signflip_test([1, 2, -0.5], [0, 0, 0]) == 0.5
    # six seeds all better: p = 2/64 = 0.03125 (the smallest p attainable with 6 seeds)
    assert paired_signflip_test([1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7]) == 0.03125
    assert paired_signflip_test([1, 1], [1, 1]) == 1.0
    assert math.isnan(paired_signflip_test([1.0], [2.0]))


def _seeded_runs(n_seeds: int) -> pd.DataFrame:
    """baseline LRS grows with the seed; zloss is always better by ≥ 0.2; muloss is ±0.05 around baseline."""
    rows = []
    for seed in range(1, n_seeds + 1):
        worst = 3.0 + 0.1 * seed
        for stab, lam, bad in (("baseline", None, worst), ("zloss", 1e-4, worst - 0.4 - 0.01 * seed),
                               ("muloss", 1e-4, worst + (0.1 if seed % 2 else -0.1))):
            rows += [{"stabilizer": stab, "lam": lam, "seed": seed, "lr": 1e-2, "final_loss": 2.5},
                     {"stabilizer": stab, "lam": lam, "seed": seed, "lr": 1e-1, "final_loss": bad}]
    return runs_frame(rows)


def test_paired_comparison_marks_significant_and_non_significant_differences():
    per_seed = lrs_table(_seeded_runs(6), by_seed=True)
    cmp = compare_to_reference(per_seed, "lrs").set_index("stabilizer")
    assert cmp.loc["zloss", "n_pairs"] == 6 and cmp.loc["zloss", "diff"] < 0
    assert cmp.loc["zloss", "p_value"] == 0.03125 and cmp.loc["zloss", "significant"]
    assert cmp.loc["muloss", "p_value"] > 0.05 and not cmp.loc["muloss", "significant"]
    summary = seed_summary(per_seed).set_index("stabilizer")
    assert summary.loc["baseline", "n_seeds"] == 6
    assert summary.loc["baseline", "lrs_ci_lo"] < summary.loc["baseline", "lrs_mean"] < summary.loc["baseline",
                                                                                                   "lrs_ci_hi"]

    table = sensitivity_table(_seeded_runs(6)).set_index("stabilizer")
    assert "p=0.0312" in table.loc["zloss (λ=1e-4)", "ΔLRS vs baseline"]
    assert "n.s." in table.loc["muloss (λ=1e-4)", "ΔLRS vs baseline"]
    assert "±" in table.loc["baseline", "LRS (nats)"]


def test_one_seed_differences_are_not_tested():
    table = sensitivity_table(_seeded_runs(1)).set_index("stabilizer")
    assert table.loc["zloss (λ=1e-4)", "ΔLRS vs baseline"].startswith("-0.4")
    assert "p=" not in "".join(table["ΔLRS vs baseline"]) and "±" not in "".join(table["LRS (nats)"])


# -- frame preparation, published rows, colours, rendering ----------------------------------

def test_prepare_runs_derives_hyperparameter_keys_and_labels():
    runs = prepare_runs(runs_frame([{"stabilizer": "softcap", "cap": 30.0, "lr": 1e-2, "final_loss": 3.0},
                                    {"stabilizer": "zloss", "lam": 1e-7, "lr": 1e-2, "final_loss": math.nan}]))
    assert runs["hp"].tolist() == ['{"cap": 30.0}', '{"lam": 1e-07}']
    assert runs["setting"].tolist() == ["softcap (c=30)", "zloss (λ=1e-7)"]
    assert runs["failed"].tolist() == [False, True]
    assert runs["loss"].tolist() == [3.0, LN256]
    assert setting_order(runs) == ["zloss (λ=1e-7)", "softcap (c=30)"]
    assert [format_value(x) for x in (1e-4, 0.1, 100.0, 2.5e-3)] == ["1e-4", "0.1", "100", "2.5e-3"]


def test_published_rows_map_to_the_runs_frame():
    df = pd.DataFrame({"model": ["16M", "16M", "221M"], "stabilizer": ["baseline", "zloss", "mucentering"],
                       "lam": [0.0, 1e-4, 0.0], "lr": [1e-3, 1e-3, 0.3], "weight_tying": ["False", "False", "False"],
                       "final_loss": [3.9, 10.9, math.nan]})
    pub = published_frame(df)
    assert pub["hp"].tolist() == ["{}", '{"lam": 0.0001}', "{}"]  # lam 0 of baseline / mucentering = none
    assert pub["L0"].iloc[0] == pytest.approx(math.log(50304))
    assert pub["n_params"].tolist() == [16e6, 16e6, 221e6]
    assert pub["diverged"].tolist() == [False, True, True]  # 10.9 ≥ L0 = 10.83, NaN
    assert nominal_params("1.3B") == 1.3e9 and math.isnan(nominal_params("nano"))
    with pytest.raises(ValueError, match="final_loss"):
        published_frame(df.drop(columns="final_loss"))


def test_stabilizer_colours_are_fixed_for_builtins_and_deterministic_for_others():
    a = stabilizer_colors(["zloss", "baseline", "my.mod:Stab", "other:Thing"])
    b = stabilizer_colors(["other:Thing", "my.mod:Stab", "baseline", "zloss"])
    assert a == b and a["zloss"] == BUILTIN_COLORS["zloss"]
    assert len(set(a.values())) == 4 and a["my.mod:Stab"] not in BUILTIN_COLORS.values()
    assert stabilizer_colors(["my.mod:Stab"])["my.mod:Stab"] == a["my.mod:Stab"]


def test_markdown_and_latex_rendering_escape_special_characters():
    df = pd.DataFrame({"stabilizer": ["zloss (λ=1e-4)"], "a|b": ["1 ± 2"], "x_y": ["50 %"]})
    md = to_markdown(df)
    assert md.splitlines()[0] == "| stabilizer | a\\|b | x_y |" and md.splitlines()[1] == "|---|---|---|"
    tex = to_latex(df, caption="LRS", label="tab:x")
    assert r"zloss ($\lambda$=1e-4)" in tex and r"1 $\pm$ 2" in tex and r"x\_y" in tex and r"50 \%" in tex
    assert tex.startswith(r"\begin{table}") and r"\bottomrule" in tex
    assert latex_escape("a&b#c") == r"a\&b\#c"


def test_runs_in_two_precisions_are_two_curves():
    # fp32: 3.0, 2.5 → LRS 0.5; bf16-emu: 3.0, 4.0 → LRS 1.0 (never pooled as if they were seeds)
    rows = [{"lr": lr, "final_loss": L, "precision": p}
            for p, losses in (("fp32", (3.0, 2.5)), ("bf16-emu", (3.0, 4.0))) for lr, L in zip((1e-3, 1e-2), losses)]
    t = lrs_table(runs_frame(rows)).set_index("precision")
    assert t.loc["fp32", "lrs"] == pytest.approx(0.5) and t.loc["bf16-emu", "lrs"] == pytest.approx(1.0)
    assert set(t["setting"]) == {"baseline, fp32", "baseline, bf16-emu"}


def test_sensitivity_table_keeps_two_precisions_apart():
    # the same setting trained in fp32 and in bf16-emu, 2 seeds each: two rows, each tested against its own baseline
    rows = [{"lr": lr, "final_loss": L, "precision": p, "seed": s, "stabilizer": st}
            for p in ("fp32", "bf16-emu") for s in (1, 2) for st in ("baseline", "muloss")
            for lr, L in zip((1e-3, 1e-2), (3.0, 2.5 if st == "baseline" else 2.4))]
    t = sensitivity_table(runs_frame([{**r, "lam": 1e-4 if r["stabilizer"] == "muloss" else None} for r in rows]))
    assert len(t) == 4 and t["stabilizer"].str.endswith(("fp32", "bf16-emu")).all()
    assert (t.loc[t["stabilizer"].str.startswith("muloss"), "ΔLRS vs baseline"] != "").all()
