"""The GPT of the reference study: shapes, causality, tying, parameter counts, RoPE and init,
each against the study's definition (its nanoGPT fork, flxst/output-embedding-centering)."""
import math

import pytest
import torch

from bench.model import GPT, PRESETS, apply_rope, count_params, preset, rope_tables

V_STUDY = 50304


def study_ffn(H: int) -> int:
    """The study's SwiGLU width: int(2·4H/3) rounded up to a multiple of 256."""
    f = int(2 * (4 * H) / 3)
    return f if f % 256 == 0 else (f // 256 + 1) * 256


def study_params(L: int, H: int, V: int, tied: bool) -> int:
    """Closed form: per block qkv 3H² + proj H² + 3·H·F (W, V, W_2) + 2 LayerNorm gains H
    + 2 qk-LayerNorm gains H/4; a final LayerNorm H; one or two V×H embeddings."""
    F = study_ffn(H)
    block = 3 * H * H + H * H + 3 * H * F + 2 * H + 2 * (H // 4)
    return L * block + H + V * H * (1 if tied else 2)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_formula_matches_the_model(name, tied):
    cfg = preset(name, vocab_size=V_STUDY if name[0].isdigit() else 8192, weight_tying=tied)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.n_params == count_params(cfg)


@pytest.mark.parametrize("name,millions", [("16M", 15.57), ("29M", 28.64), ("57M", 57.34),
                                           ("109M", 108.4), ("221M", 220.8)])
def test_study_presets_have_the_tied_parameter_counts_their_names_say(name, millions):
    L, H, _ = PRESETS[name]
    for tied in (True, False):
        cfg = preset(name, vocab_size=V_STUDY, weight_tying=tied)
        assert count_params(cfg) == study_params(L, H, V_STUDY, tied)
    assert count_params(preset(name, vocab_size=V_STUDY, weight_tying=True)) == pytest.approx(millions * 1e6, rel=1e-3)


def test_swiglu_width_is_the_studys():
    assert [preset(n).ffn_dim for n in ("16M", "29M", "57M", "109M", "221M", "micro")] == \
        [768, 1024, 1280, 1792, 2304, 256]


def test_study_presets_have_the_studys_depth_width_and_heads():
    assert {k: PRESETS[k] for k in ("16M", "29M", "57M", "109M", "221M")} == {
        "16M": (6, 224, 4), "29M": (9, 320, 4), "57M": (12, 480, 4), "109M": (15, 640, 4), "221M": (21, 832, 4)}


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


# --- RoPE -------------------------------------------------------------------------------------

def rope_by_complex_numbers(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Reference: pairs (x[2j], x[2j+1]) of the first half of the head as complex numbers,
    multiplied by exp(i·t·θ^(−2j/R)), R = head_dim/2; the second half unchanged. x (T, head_dim)."""
    T, D = x.shape
    R = D // 2
    freqs = base ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
    z = torch.view_as_complex(x[:, :R].reshape(T, R // 2, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([torch.view_as_real(z).reshape(T, R), x[:, R:]], dim=-1)


def test_rope_rotates_interleaved_pairs_of_the_first_half_only():
    torch.manual_seed(0)
    T, D = 32, 56  # the 16M preset's head_dim: 14 rotated pairs
    x = torch.randn(T, D, dtype=torch.float64)
    cos, sin = rope_tables(T, D)
    assert cos.shape == (T, D) and cos.dtype == torch.float64
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out, rope_by_complex_numbers(x), rtol=0, atol=1e-13)
    assert torch.equal(out[:, D // 2:], x[:, D // 2:])  # the second half passes unrotated
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-14, atol=0)  # norms preserved
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=0)  # position 0 is the identity


def rope_pairwise(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Reference: the pairwise formula as written, (x[2j]·cos − x[2j+1]·sin, x[2j+1]·cos + x[2j]·sin)
    on the first half of x (..., T, head_dim), the second half concatenated unchanged."""
    T, D = x.shape[-2:]
    R = D // 2
    angle = torch.outer(torch.arange(T, dtype=torch.float64), base ** (-torch.arange(0, R, 2, dtype=torch.float64) / R))
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    even, odd = x[..., 0:R:2], x[..., 1:R:2]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., R:]], dim=-1)


def test_rope_gives_the_pairwise_formulas_bits_forward_and_backward():
    """x·cos + swap(x)·sin forms the same products and sums as the pairwise formula: fp32 bits agree,
    values and gradients."""
    torch.manual_seed(2)
    x = torch.randn(3, 4, 64, 16, requires_grad=True)  # (B, heads, T, head_dim) as the model calls it
    g = torch.randn(3, 4, 64, 16)
    cos, sin = rope_tables(64, 16)
    ours = apply_rope(x, cos.float(), sin.float())
    ref = rope_pairwise(x)
    assert torch.equal(ours, ref)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_rope_scores_depend_only_on_the_offset():
    torch.manual_seed(1)
    T, D = 40, 16
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    cos, sin = rope_tables(T, D)
    rq = apply_rope(q.expand(T, D), cos, sin)  # q at every position
    rk = apply_rope(k.expand(T, D), cos, sin)
    scores = rq @ rk.T  # scores[m, n] = q at m · k at n
    for offset in (0, 1, 7, 20):
        diag = torch.diagonal(scores, offset=-offset)  # pairs (m, m − offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=0, atol=1e-12)
    assert not torch.allclose(scores.diagonal(0)[:1], scores.diagonal(-7)[:1])  # and does depend on it


def test_rope_tables_follow_the_run_dtype():
    m = GPT(preset("nano", vocab_size=64, seq_len=8)).to(torch.float64)
    assert m.rope_cos.dtype == torch.float64
    m = GPT(preset("nano", vocab_size=64, seq_len=8)).to(torch.float32)
    assert m.rope_cos.dtype == torch.float32


# --- initialization ---------------------------------------------------------------------------

def xavier_std(fan_out: int, fan_in: int) -> float:
    return math.sqrt(2 / (fan_in + fan_out))


@pytest.mark.parametrize("tied", [False, True])
def test_init_statistics_per_tensor_kind_are_the_studys(tied):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=8192, weight_tying=tied)  # L = 4, H = 128, F = 512
    model = GPT(cfg)
    L, H, F, V = cfg.n_layer, cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
    E = model.output_embedding
    if tied:  # the shared matrix ends with the LM head's Xavier init, as in the study (after tying)
        assert E.std().item() == pytest.approx(xavier_std(V, H), rel=0.01)
    else:
        assert model.wte.weight.std().item() == pytest.approx(1 / math.sqrt(H), rel=0.01)
        assert E.std().item() == pytest.approx(xavier_std(V, H), rel=0.01)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.03)
        W, Vw = block.mlp.gate_up.weight.chunk(2)  # two (F×H) matrices, Xavier each
        assert W.std().item() == pytest.approx(xavier_std(F, H), rel=0.03)
        assert Vw.std().item() == pytest.approx(xavier_std(F, H), rel=0.03)
        assert block.mlp.down.weight.std().item() == pytest.approx(xavier_std(H, F), rel=0.03)
        assert block.attn.qkv.weight.std().item() == pytest.approx(xavier_std(3 * H, H), rel=0.03)
        for ln in (block.ln1, block.ln2, block.attn.q_norm, block.attn.k_norm):
            assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and ln.eps == 1e-5
