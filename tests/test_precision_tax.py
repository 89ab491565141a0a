"""The precision tax of a logit offset, on planted logits: nothing in exact arithmetic or at offset 0
in the logits' own format, a cost that grows with the offset in bf16 and equals a direct computation."""
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bench.analysis.precision_tax import FORMATS, cross_entropy, offset_tax, predict_gaps


def planted(n: int = 512, V: int = 1000, sigma: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (n, V) with per-token spread sigma, and targets drawn from their softmax (calibrated)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * sigma).float()
    targets = torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=g).squeeze(-1)
    return logits, targets


def test_cross_entropy_is_the_mean_negative_log_likelihood():
    logits, targets = planted()
    assert cross_entropy(logits, targets) == pytest.approx(float(F.cross_entropy(logits.double(), targets)), rel=1e-12)


def test_a_zero_offset_costs_nothing_in_fp32():
    logits, targets = planted()
    tax = offset_tax(logits, targets, offsets=[0.0], formats=["fp32"])
    assert tax["tax"].iloc[0] == 0.0


def test_in_bf16_the_cost_grows_with_the_offset_and_matches_a_direct_computation():
    logits, targets = planted()
    offsets = [0.0, 16.0, 128.0, 512.0, 1024.0, 2048.0]
    tax = offset_tax(logits, targets, offsets=offsets, formats=["bf16"]).set_index("offset")["tax"]
    exact = float(F.cross_entropy(logits.double(), targets))
    for c in offsets:
        direct = float(F.cross_entropy((logits.double() + c).to(torch.bfloat16).double(), targets)) - exact
        assert tax[c] == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert abs(tax[0.0]) < 0.01  # bf16's own rounding of O(σ) logits: small
    assert tax[128.0] > 0.01 and tax[1024.0] > tax[128.0] and tax[2048.0] > tax[512.0]
    assert tax[2048.0] > 1.0  # spacing 16 at 2048 quantizes a σ = 3 distribution away


def test_fp16_costs_less_than_bf16_and_fp8_saturates_past_448():
    logits, targets = planted()
    tax = offset_tax(logits, targets, offsets=[512.0], formats=[f for f in FORMATS if f != "fp32"])
    by = tax.set_index("format")["tax"]
    assert by["fp16"] < by["bf16"]
    if "fp8-e4m3" in by:  # every logit becomes 448: a uniform prediction, loss ln V
        assert by["fp8-e4m3"] == pytest.approx(math.log(1000) - cross_entropy(logits, targets), rel=1e-6)


def test_predicted_gaps_pair_each_published_baseline_with_its_mucentering_run():
    logits, targets = planted()
    pub = pd.DataFrame([
        dict(model="16M", stabilizer="baseline", lr=0.1, weight_tying=False, final_loss=3.9, logit_mean=588.0, logit_std=3.0),
        dict(model="16M", stabilizer="mucentering", lr=0.1, weight_tying=False, final_loss=3.5, logit_mean=0.0, logit_std=3.0),
        dict(model="16M", stabilizer="baseline", lr=0.1, weight_tying=True, final_loss=9.0, logit_mean=5.0, logit_std=3.0),
    ])
    gaps = predict_gaps(logits, targets, pub)
    assert len(gaps) == 1  # untied baselines only
    row = gaps.iloc[0]
    assert row["published_gap"] == pytest.approx(0.4)
    direct = offset_tax(logits, targets, offsets=[588.0], formats=["bf16"])["tax"].iloc[0]
    assert row["tax"] == pytest.approx(direct, rel=1e-9)
    with pytest.raises(ValueError, match="logit_mean"):
        predict_gaps(logits, targets, pub.drop(columns="logit_mean"))
