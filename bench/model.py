"""Decoder-only GPT of the reference study, in one file (architecture version ``ARCH_VERSION``).

Token embedding → n_layer pre-LayerNorm blocks (partial RoPE attention with head-wise
qk-LayerNorm, SwiGLU MLP) → final LayerNorm → LM head E ∈ R^{V×H}. No biases; every
LayerNorm has a gain and ε = 1e-5. This is, in function and initialization, the model of
the study authors' nanoGPT fork (flxst/output-embedding-centering, ``nanoGPT/model.py``):

- SwiGLU hidden width F = 256·⌈⌊8H/3⌋/256⌉ (``ModelConfig.ffn_dim``).
- RoPE on the first half of each head's dimensions, interleaved pairs (``apply_rope``).
- Init: every linear Xavier-normal (SwiGLU's two input projections each as its own
  (F×H) matrix), except the attention output projection, N(0, (0.02/√(2L))²); the token
  embedding N(0, 1/H). With weight tying E *is* the token embedding and gets the LM
  head's Xavier-normal init (std √(2/(V+H))), as in the study, where it runs after tying.

Shapes: B batch, T sequence length, H width (n_embd), V vocabulary size.
The forward pass has no Python-level per-example logic, so a model can be
stacked along a leading member dimension (see bench/pack/batched_model.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gemm
from .presets import (ARCH_VERSION, CPU_PRESETS, PRESETS, STUDY_PRESETS, ModelConfig, count_params,  # noqa: F401
                      flops_per_token, preset)


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim), float64, for the study's partial rotary embedding.

    The study (its nanoGPT fork, via lucidrains' rotary-embedding-torch) rotates only the
    first half of each head's dimensions: rotary dim R = head_dim/2, frequencies
    θ^(−2j/R) for j = 0 … R/2 − 1 with θ = 10,000, positions 0 … T − 1. The tables are
    spread over a head's dimensions as ``apply_rope`` reads them: at position t, pair j
    (dimensions 2j, 2j+1 < R) has cos = (cos, cos) and sin = (−sin, +sin) of t·θ^(−2j/R);
    the unrotated dimensions ≥ R have cos = 1, sin = 0. Computed in float64;
    ``GPT.to(dtype)`` casts them to the run's dtype with the weights.
    """
    rot = head_dim // 2
    inv_freq = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, R/2)
    cos = torch.ones(seq_len, head_dim, dtype=torch.float64)
    sin = torch.zeros(seq_len, head_dim, dtype=torch.float64)
    cos[:, :rot] = angles.cos().repeat_interleave(2, dim=-1)
    sin[:, 0:rot:2], sin[:, 1:rot:2] = -angles.sin(), angles.sin()
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial, interleaved RoPE on the last dim of x (..., T, head_dim); cos, sin (T, head_dim)
    from ``rope_tables``.

    The first R = head_dim/2 dimensions form R/2 interleaved pairs (x[2j], x[2j+1]), each
    rotated by angle t·θ^(−2j/R) at position t:
        (x[2j], x[2j+1]) ← (x[2j]·cos − x[2j+1]·sin, x[2j+1]·cos + x[2j]·sin);
    the other head_dim/2 dimensions pass unrotated. So q·k after RoPE depends on the
    positions of q and k only through their offset, and norms are preserved.

    Computed as x·cos + swap(x)·sin, swap exchanging the two entries of every pair: the
    same products and sums, so the same bits, as the pairwise formula, in four ops forward
    and backward instead of slices, stacks and a concatenation. The swap rolls each pair by
    one: the copy a flip of it makes, at about half a flip's cost forward and backward on
    CPU (52 vs 97 µs for a (8, 4, 64, 16) ``micro`` q, two threads). The unrotated dimensions
    get x·1 + (partner)·0: a non-finite partner would make them NaN, which cannot change
    a result here (x is a LayerNorm output: a head's entries are all finite or all NaN).
    """
    swapped = x.unflatten(-1, (-1, 2)).roll(1, -1).flatten(-2)  # (x[2j+1], x[2j]) at (2j, 2j+1)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose products run in ``library`` ("aten" or "onednn",
    see ``bench.gemm``; set for a whole model by ``GPT.use_gemm``). Same parameters and state dict."""

    library: str = "aten"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.library)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.q_norm = nn.LayerNorm(cfg.head_dim, bias=False)  # head-wise qk-LayerNorm
        self.k_norm = nn.LayerNorm(cfg.head_dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, H))


class SwiGLU(nn.Module):
    """down(silu(W·x) ⊙ (V·x)); W and V are stored as one (2F×H) matrix [W; V] (one matmul)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = Linear(cfg.n_embd, 2 * cfg.ffn_dim, bias=False)
        self.down = Linear(cfg.ffn_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cos, sin)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head or cfg.head_dim % 4:
            raise ValueError(f"n_embd={cfg.n_embd} must split into {cfg.n_head} heads of a size divisible by 4 "
                             "(RoPE rotates pairs in the first half of each head)")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.weight_tying:
            self.lm_head.weight = self.wte.weight
        self.gemm_library = "aten"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The study's initialization (module docstring); with tying the shared matrix ends Xavier-normal."""
        nn.init.normal_(self.wte.weight, std=1.0 / math.sqrt(self.cfg.n_embd))
        for m in self.modules():  # lm_head last: with tying it overwrites the embedding's init
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
        for block in self.blocks:
            for w in block.mlp.gate_up.weight.chunk(2):  # W and V: two (F×H) matrices, Xavier each
                nn.init.xavier_normal_(w)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    def use_gemm(self, library: str) -> "GPT":
        """Run every linear layer's products in ``library`` ("aten" or "onednn", ``bench.gemm``)."""
        self.gemm_library = library  # the loss head's too (``train_module.stabilized_loss``)
        for m in self.modules():
            if isinstance(m, Linear):
                m.library = library
        return self

    @property
    def output_embedding(self) -> nn.Parameter:
        """E ∈ R^{V×H}; the shared matrix when weights are tied."""
        return self.lm_head.weight

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states h, (B, T, H), for token ids idx of shape (B, T)."""
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits l = E·h, (B, T, V), and the hidden states h, (B, T, H)."""
        h = self.features(idx)
        return self.lm_head(h), h

    @property
    def n_params(self) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())
