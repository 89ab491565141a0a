"""The GPT of the reference study: shapes, causality, tying, init, parameter counts."""
import math

import pytest
import torch

from bench.model import GPT, PRESETS, count_params, preset


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_formula_matches_the_model(name, tied):
    cfg = preset(name, vocab_size=50304 if name[0].isdigit() else 8192, weight_tying=tied)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.n_params == count_params(cfg)


def test_study_presets_have_the_studys_depth_and_width():
    assert {k: PRESETS[k][:2] for k in ("16M", "29M", "57M", "109M", "221M")} == {
        "16M": (6, 224), "29M": (9, 320), "57M": (12, 480), "109M": (15, 640), "221M": (21, 832)}


def test_forward_shapes_and_no_biases():
    torch.manual_seed(0)
    model = GPT(preset("nano", vocab_size=101, seq_len=16))
    logits, h = model(torch.randint(0, 101, (3, 16)))
    assert logits.shape == (3, 16, 101) and h.shape == (3, 16, 32)
    assert not any("bias" in n for n, _ in model.named_parameters())


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(preset("micro", vocab_size=50, seq_len=12))
    x = torch.randint(0, 50, (1, 12))
    x2 = x.clone()
    x2[0, 7] = (x[0, 7] + 1) % 50
    a, _ = model(x)
    b, _ = model(x2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_weight_tying_shares_one_matrix():
    model = GPT(preset("nano", vocab_size=64, weight_tying=True))
    assert model.lm_head.weight is model.wte.weight is model.output_embedding


def test_init_embeddings_normal_with_std_one_over_sqrt_width_and_xavier_linears():
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=4096))
    H = 128
    assert model.wte.weight.std().item() == pytest.approx(1 / math.sqrt(H), rel=0.02)
    w = model.blocks[0].mlp.gate_up.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / sum(w.shape)), rel=0.03)
