"""Mechanism controls of the reference study's claims (issue 8).

With an untied head, adding one vector c to every row of E adds c·h to all logits of a
token, which the softmax ignores: loss, gradients and the whole AdamW trajectory are
unchanged. μ-centering can therefore change untied training only through rounding; in
float64 the loss curves of baseline and μ-centering must agree. With tying, E is also
the input embedding, so centring it changes what the network sees: the curves differ.
"""
import math

from helpers import tiny_config
from bench.trainer import train


def _curves(tied: bool):
    base = dict(steps=200, warmup=20, lr=3e-2, log_every=1, eval_every=50, precision="fp64",
                weight_tying=tied)
    a = train(tiny_config(stabilizer="baseline", **base)).curve
    b = train(tiny_config(stabilizer="mucentering", **base)).curve
    return [r["train_loss"] for r in a], [r["train_loss"] for r in b]


def _max_rel_diff(a, b):
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def test_untied_mucentering_leaves_float64_training_unchanged():
    a, b = _curves(tied=False)
    assert len(a) == len(b) == 200
    assert all(math.isfinite(x) for x in a)
    # the RoPE tables follow the run's dtype (float64 here), so nothing rounds to float32: measured
    # bit-identical curves; 1e-12 leaves room for a platform's summation order
    assert _max_rel_diff(a, b) < 1e-12


def test_tied_mucentering_changes_training():
    a, b = _curves(tied=True)
    assert _max_rel_diff(a, b) > 1e-3
