"""Leaderboard ties on planted data: stabilizers whose LRS intervals over seeds overlap share a rank."""
import json
import math

import pandas as pd

from bench.analysis.leaderboard import display, rank_stabilizers

L0 = math.log(256)


def planted(lrs_by_stab: dict[str, list[float]]) -> pd.DataFrame:
    """Per stabilizer and seed a two-point curve whose LRS is exactly the planted value
    (2.0 at lr 1e-2, 2.0 + LRS at lr 1e-1: excess LRS over n − 1 = 1)."""
    rows = []
    for stab, values in lrs_by_stab.items():
        for seed, lrs in enumerate(values, start=1):
            for lr, loss in ((1e-2, 2.0), (1e-1, 2.0 + lrs)):
                rows.append({"model": "nano", "n_params": 30_000, "vocab_size": 256, "L0": L0, "stabilizer": stab,
                             "hparams": json.dumps({}), "lr": lr, "seed": seed, "final_loss": loss,
                             "diverged": False})
    return pd.DataFrame(rows)


def test_overlapping_confidence_intervals_are_ties_and_separated_ones_are_not():
    board = rank_stabilizers(planted({
        "alpha": [0.50, 0.52, 0.48, 0.51],     # 0.5025
        "beta": [0.51, 0.53, 0.49, 0.52],      # 0.5125: within alpha's interval
        "gamma": [1.00, 1.02, 0.98, 1.01],     # 1.0025: far from both
        "delta": [1.01, 1.03, 0.99, 1.02],     # 1.0125: within gamma's interval
        "eps": [2.00, 2.01, 1.99, 2.00],       # alone
    })).set_index("stabilizer")
    assert board.loc["alpha", "lrs"] < board.loc["beta", "lrs"] < board.loc["gamma", "lrs"]
    assert board["rank"].to_dict() == {"alpha": 1, "beta": 1, "gamma": 3, "delta": 3, "eps": 5}
    assert board.loc["alpha", "ties"] == "beta" and board.loc["beta", "ties"] == "alpha"
    assert board.loc["gamma", "ties"] == "delta" and board.loc["eps", "ties"] == ""
    lo, hi = board.loc["alpha", ["lrs_ci_lo", "lrs_ci_hi"]]
    assert lo <= board.loc["alpha", "lrs"] <= hi and hi - lo < 0.05
    shown = display(board.reset_index()).set_index("stabilizer")
    assert shown.loc["beta", "rank"] == "1" and shown.loc["beta", "tied with"] == "alpha"
    assert shown.loc["eps", "tied with"] == "–" and shown.loc["eps", "LRS 95% CI"].startswith("[1.99")


def test_ties_chain_through_neighbours():
    board = rank_stabilizers(planted({"a": [0.50, 0.60], "b": [0.58, 0.68], "c": [0.66, 0.76]}))
    # a ~ b and b ~ c overlap, a and c do not: one group, one rank
    assert board["rank"].tolist() == [1, 1, 1]
    assert board.set_index("stabilizer").loc["a", "ties"] == "b, c"


def test_one_seed_has_no_intervals_and_no_ties():
    board = rank_stabilizers(planted({"a": [0.50], "b": [0.501], "c": [0.9]}))
    assert board["rank"].tolist() == [1, 2, 3] and (board["ties"] == "").all()
    assert board["lrs_ci_lo"].isna().all()
    assert (display(board)["LRS 95% CI"] == "–").all()
