"""Figures that cannot be misread, checked on the matplotlib Axes of planted runs."""
import json
import math

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")

from bench.analysis.figures import diverging_curves, lambda_sensitivity, loss_vs_lr  # noqa: E402

L0 = math.log(2048)  # 7.62: far above best + 2, so the axis is broken


def planted(stabs=(("baseline", {}), ("zloss", {"lam": 1e-4}), ("zloss", {"lam": 0.1}), ("muloss", {"lam": 1e-4}),
                   ("muloss", {"lam": 0.1})), seeds=(1, 2)) -> pd.DataFrame:
    rows = []
    for stab, hp in stabs:
        for lr, loss in ((1e-3, 3.4), (1e-2, 2.8), (1e-1, 3.0), (1.0, 6.9), (3.0, 2.9)):
            for seed in seeds:
                rows.append({"run_id": f"{stab}{hp}{lr}{seed}", "model": "nano", "n_params": 30_000,
                             "vocab_size": 2048, "L0": L0, "stabilizer": stab, "lam": hp.get("lam"), "cap": None,
                             "hparams": json.dumps(hp), "lr": lr, "seed": seed, "final_loss": loss,
                             "diverged": lr == 3.0, "diverged_step": 30 if lr == 3.0 else None})
    return pd.DataFrame(rows)


def _diverged_lines(fig):
    return [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "diverged"]


def test_loss_vs_lr_draws_diverged_points_at_L0_on_a_visible_axis():
    fig = loss_vs_lr(planted())
    lines = _diverged_lines(fig)
    assert lines and all(ln.get_marker() == "x" for ln in lines)
    for ln in lines:
        assert np.allclose(ln.get_ydata(), L0) and np.allclose(ln.get_xdata(), 3.0)
    for ax in fig.axes:
        if ax.get_visible() and ax.get_lines():
            lo, hi = ax.get_ylim()
            assert hi >= L0 > lo  # L0 is inside the axis, not clipped to best + 2
            assert ax.get_yscale() == "function"  # [best + 2, L0] compressed into a band
            assert any(abs(t - L0) < 1e-9 for t in ax.get_yticks())
            # the loss of 6.9 (above best + 2, below L0) is drawn at its true value, not clipped
            assert any(np.isclose(ln.get_ydata(), 6.9).any() for ln in ax.get_lines())
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("L0 = ln V: diverged" in t for t in labels) and any("compressed" in t for t in labels)


def test_lambda_sensitivity_markers_are_unique_and_diverged_points_sit_at_L0():
    runs = planted(stabs=[("zloss", {"lam": v}) for v in (1e-7, 1e-4, 0.1, 100.0)]
                   + [("muloss", {"lam": v}) for v in (1e-7, 1e-4, 0.1, 100.0)])
    fig = lambda_sensitivity(runs)
    for ln in _diverged_lines(fig):
        assert np.allclose(ln.get_ydata(), L0)
    (legend,) = fig.legends
    entries = [(h.get_marker(), t.get_text()) for h, t in zip(legend.legend_handles, legend.get_texts())
               if t.get_text().startswith("λ")]
    assert [t for _, t in entries] == ["λ = 1e-7", "λ = 1e-4", "λ = 0.1", "λ = 100"]
    markers = [m for m, _ in entries]
    assert len(set(markers)) == 4 and not {"x", "X", "None", "none", ""} & set(markers)
    colors = [matplotlib.colors.to_rgb(h.get_color()) for h in legend.legend_handles[:4]]
    # every value's colour is dark enough to read on white (the old palette's λ = 1e-7 was near white)
    assert all(0.2126 * r + 0.7152 * g + 0.0722 * b < 0.8 for r, g, b in colors)


def test_diverging_curves_one_panel_per_stabilizer_worst_k_and_the_rest_grey():
    runs = planted(seeds=tuple(range(1, 9)))  # 8 diverged runs per setting
    steps = np.arange(5, 35, 5)
    curves = pd.DataFrame([{"run_id": r.run_id, "step": int(s), "train_loss": 3.0 + (r.seed + (r.lam or 0)) * s / 10}
                           for r in runs[runs["diverged"]].itertuples() for s in steps])
    fig = diverging_curves(runs, curves, worst=5)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_lines()]
    assert sorted(ax.get_title().split(":")[0] for ax in panels) == ["baseline", "muloss", "zloss"]
    for ax in panels:
        worst = [ln for ln in ax.get_lines() if ln.get_gid() == "worst"]
        rest = [ln for ln in ax.get_lines() if ln.get_gid() == "rest"]
        assert len(worst) == 5 and len({(str(ln.get_linestyle()), ln.get_marker()) for ln in worst}) == 5
        assert len(worst) + len(rest) == int(ax.get_title().split(": ")[1].split()[0])
        assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) == 6  # 5 runs + "others"
    (legend,) = fig.legends  # every line style explained
    texts = [t.get_text() for t in legend.get_texts()]
    assert "5th highest peak loss" in texts and "other diverged runs" in texts
