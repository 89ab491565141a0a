"""The GPT of ``bench.model`` as a pure function of parameters stacked along a member dim K.

``packed_forward(mcfg, params, idx, cos, sin)`` computes, for every member k at once,
what ``GPT.forward`` computes for a model whose parameters are ``params[name][k]``:
logits (K, B, T, V) and final hidden states (K, B, T, H). All members see the same
token ids ``idx`` (B, T). Linear layers are batched matmuls over K, so a pack
runs the same number of kernels as one model, each K times larger.

Why not ``vmap(functional_call(GPT))``: measured on a 2-core AVX2 CPU (fwd+bwd,
K = 8, fp32), this hand-batched version is 5-20 % faster per member than vmap,
and vmap has no batching rule for CPU flash attention (it loops over members).
The price is a second copy of the model's math; tests/test_pack.py checks it
against ``vmap(functional_call(GPT))`` member by member, so the two cannot drift
apart silently.

Every op acts on one member's slice only (no reduction across K), so a member
whose parameters hold NaN/Inf cannot contaminate another member's outputs or
gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import ModelConfig, apply_rope


def output_embedding_name(mcfg: ModelConfig) -> str:
    """Parameter that holds E ∈ R^{V×H} (the token embedding when weights are tied)."""
    return "wte.weight" if mcfg.weight_tying else "lm_head.weight"


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (K, N, in) · w(K, out, in)ᵀ → (K, N, out): nn.Linear without bias, per member."""
    return torch.matmul(x, w.transpose(1, 2))  # measured ~2× faster than bmm with a transposed w on CPU


def _layer_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim (no bias) with a per-member weight w (K, n); x (K, ..., n)."""
    shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (w.shape[1],)
    return F.layer_norm(x, x.shape[-1:]) * w.view(shape)


def packed_features(mcfg: ModelConfig, p: dict[str, torch.Tensor], idx: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Final hidden states h (K, B·T, H) of every member for token ids idx (B, T)."""
    wte = p["wte.weight"]
    K, B, T = wte.shape[0], idx.shape[0], idx.shape[1]
    H, nh, hd = mcfg.n_embd, mcfg.n_head, mcfg.head_dim
    cos, sin = cos[:T], sin[:T]
    x = wte.index_select(1, idx.reshape(-1))  # (K, B·T, H)
    for i in range(mcfg.n_layer):
        pre = f"blocks.{i}."
        a = _layer_norm(x, p[pre + "ln1.weight"])
        # (K, B·T, 3H) → q, k, v of shape (K, B, n_head, T, head_dim), as GPT's permute(2, 0, 3, 1, 4)
        q, k, v = _linear(a, p[pre + "attn.qkv.weight"]).view(K, B, T, 3, nh, hd).permute(3, 0, 1, 4, 2, 5)
        q = apply_rope(_layer_norm(q, p[pre + "attn.q_norm.weight"]), cos, sin)
        k = apply_rope(_layer_norm(k, p[pre + "attn.k_norm.weight"]), cos, sin)
        y = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), is_causal=True)
        y = y.view(K, B, nh, T, hd).transpose(2, 3).reshape(K, B * T, H)
        x = x + _linear(y, p[pre + "attn.proj.weight"])
        gate, up = _linear(_layer_norm(x, p[pre + "ln2.weight"]), p[pre + "mlp.gate_up.weight"]).chunk(2, dim=-1)
        x = x + _linear(F.silu(gate) * up, p[pre + "mlp.down.weight"])
    return _layer_norm(x, p["ln_f.weight"])


def packed_forward(mcfg: ModelConfig, p: dict[str, torch.Tensor], idx: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (K, B, T, V) and hidden states (K, B, T, H) of every member (GPT.forward, stacked)."""
    B, T = idx.shape
    h = packed_features(mcfg, p, idx, cos, sin)
    K = h.shape[0]
    logits = _linear(h, p[output_embedding_name(mcfg)])
    return logits.view(K, B, T, -1), h.view(K, B, T, -1)
