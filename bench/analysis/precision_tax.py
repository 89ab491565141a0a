"""The precision tax of a logit offset: what rounding a common logit shift costs the cross-entropy.

Cross-entropy is invariant to adding a constant c to every logit of a token, in exact arithmetic.
In a low-precision format it is not: the logits l + c are rounded to that format's grid, whose
spacing grows with |c| (bf16: 4 between 512 and 1024, 8 between 1024 and 2048), so the differences
between logits, all the softmax sees, are quantized. ``offset_tax`` measures that cost for a given
logit distribution; ``predict_gaps`` applies it with the study's published mean logits, to predict
how much of its untied "logit divergence" (baseline worse than μ-centering) is this rounding.

Shapes: N tokens, V vocabulary; losses in nats (mean over tokens, computed in float64 after the
rounding). The study evaluates its final checkpoints with the LM head under bf16 autocast: the
logits are the bf16 rounding of E·h, which is what ``round_to`` models (values correctly rounded
from exact ones).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

FORMATS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                   **({"fp8-e4m3": torch.float8_e4m3fn} if hasattr(torch, "float8_e4m3fn") else {})}
"""Formats the logits can be rounded to (fp8-e4m3 where this torch has it; its largest value is 448,
and torch's conversion saturates there: beyond it every logit is 448 and the loss is ln V)."""

OFFSETS = (0.0, *(2.0 ** (k / 4) for k in range(45)))
"""Default offsets c (nats) of the tax curve: 0, then 1 to 2,048 in quarter octaves (the bf16 grid's
spacing doubles at every power of two)."""


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of logits (N, V) at targets (N,), in float64; inf if not finite."""
    lg = logits.double()
    loss = float((torch.logsumexp(lg, dim=-1) - lg.gather(-1, targets[:, None]).squeeze(-1)).mean())
    return loss if math.isfinite(loss) else math.inf


def round_to(logits: torch.Tensor, fmt: str) -> torch.Tensor:
    """``logits`` rounded to format ``fmt`` (a FORMATS key, or "exact"), returned as float64."""
    if fmt == "exact":
        return logits.double()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: exact, {', '.join(FORMATS)}")
    return logits.to(FORMATS[fmt]).double()


def offset_tax(logits: torch.Tensor, targets: torch.Tensor, offsets: Sequence[float] = OFFSETS,
               formats: Sequence[str] = tuple(FORMATS)) -> pd.DataFrame:
    """Cross-entropy of ``round_fmt(logits + c)`` for every format and offset c, against the exact loss.

    logits (N, V), any float dtype (the offset is added in float64, then rounded); targets (N,).
    Columns: format, offset (nats), loss, exact (the loss of the unrounded, unshifted logits), tax =
    loss − exact (nats; inf where the format overflows).
    """
    base = logits.double()
    exact = cross_entropy(base, targets)
    rows = [{"format": fmt, "offset": float(c), "loss": (loss := cross_entropy(round_to(base + c, fmt), targets)),
             "exact": exact, "tax": loss - exact} for fmt in formats for c in offsets]
    return pd.DataFrame(rows)


def predict_gaps(logits: torch.Tensor, targets: torch.Tensor, published: pd.DataFrame,
                 fmt: str = "bf16") -> pd.DataFrame:
    """The study's untied gap (baseline − μ-centering final loss) per (model, lr), beside the tax of
    rounding its baseline's published mean logit.

    The study's logits are not published, only their statistics (the diagnostics CSV), so the
    stand-in distribution is a stabench checkpoint's own (``logits`` on its validation ``targets``),
    shifted by each published untied baseline's ``logit_mean`` and rounded to ``fmt``: ``tax`` is
    what the grid spacing at the study's logit level costs that distribution. ``published_gap`` is
    the same (model, lr)'s baseline final loss minus μ-centering's (whose published mean logit is 0,
    so it pays no tax). Two simplifications, stated with every use: the stand-in's shape near its
    top logits stands for the study's, and the offset is the mean logit (the top logits, which set
    the loss, may sit on a coarser part of the grid).
    """
    need = {"model", "stabilizer", "lr", "weight_tying", "final_loss", "logit_mean"}
    if missing := need - set(published.columns):
        raise ValueError(f"published results lack column(s) {', '.join(sorted(missing))} (use the "
                         "diagnostics CSV, oec_paper_diagnostics.csv)")
    pub = published[~published["weight_tying"].astype(bool)]
    centre = pub[pub["stabilizer"] == "mucentering"].set_index(["model", "lr"])["final_loss"]
    exact = cross_entropy(logits, targets)
    rows = []
    for r in pub[pub["stabilizer"] == "baseline"].itertuples(index=False):
        if not math.isfinite(r.logit_mean):
            continue
        c = float(r.logit_mean)
        rows.append({"model": r.model, "lr": float(r.lr), "logit_mean": c,
                     "tax": cross_entropy(round_to(logits.double() + c, fmt), targets) - exact,
                     "published_gap": float(r.final_loss) - float(centre.get((r.model, r.lr), np.nan))})
    return pd.DataFrame(rows)


def run_logits(out_dir: str, run_id: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """fp32 logits (N, V) and targets (N,) of a saved run's final weights on its final validation
    batches, and its config dict. ``run_id`` None: the only run saved in ``out_dir/models``."""
    from pathlib import Path

    from bench import records
    from bench.config import from_dict
    from bench.data import load_data
    from bench.model import GPT

    if run_id is None:
        saved = sorted(p.stem for p in (Path(out_dir) / "models").glob("*.pt"))
        if len(saved) != 1:
            raise FileNotFoundError(f"{out_dir}/models holds {len(saved)} saved runs ({', '.join(saved[:5])}); "
                                    "name one with --run RUN_ID" if saved else
                                    f"{out_dir}/models: no saved weights (train a run with `stabench run "
                                    "--save-model`)")
        run_id = saved[0]
    config, weights = records.load_weights(out_dir, run_id)
    cfg = from_dict(config)
    model = GPT(cfg.model_config())
    model.load_state_dict(weights)
    data = load_data(cfg.data, cfg.vocab_size)
    logits, targets = [], []
    with torch.no_grad():
        for x, y in data.val_batches(cfg.resolved_final_eval_batches, cfg.batch_size, cfg.seq_len):
            lg, _ = model(x)
            logits.append(lg.reshape(-1, lg.shape[-1]))
            targets.append(y.reshape(-1))
    return torch.cat(logits), torch.cat(targets), {"run_id": run_id, **config}


def tax_figure(tax: pd.DataFrame, gaps: pd.DataFrame | None = None, title: str = ""):
    """Tax vs offset (symlog x), a line per format; the study's published gaps at their baselines'
    mean logits as points beside the bf16 prediction when ``gaps`` is given."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for fmt, g in tax.groupby("format", sort=False):
        finite = g[np.isfinite(g["tax"])]
        ax.plot(finite["offset"], finite["tax"], marker="o", markersize=3.5, label=f"{fmt} rounding (stand-in logits)")
    if gaps is not None and not gaps.empty:
        pos = gaps[gaps["logit_mean"] > 0]
        ax.scatter(pos["logit_mean"], pos["published_gap"], marker="s", color="black", zorder=3,
                   label="study: baseline − μ-centering loss (untied)")
        ax.scatter(pos["logit_mean"], pos["tax"], marker="x", color="crimson", zorder=3,
                   label="prediction: bf16 tax of the published mean logit")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("offset c added to every logit (nats)")
    ax.set_ylabel("cross-entropy increase (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
