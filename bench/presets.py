"""Model presets and the architecture config, without torch: what the command line, the run
config and the sweep files need to name and size a model (``bench.model`` builds it)."""
from __future__ import annotations

import math
from dataclasses import dataclass


ARCH_VERSION = 2
"""Version of the architecture ``bench.model`` builds; part of every run's key and record.

1: stabench before issue 14 (SwiGLU width 16·⌈8H/3/16⌉, RoPE on all head dims in
(first half, second half) pairs, Xavier attention output projection, tied E ~ N(0, 1/H)).
2: the study's model in function and init (``bench.model``), and its warmup formula
lr·(it+1)/(warmup+1) with its cosine ratio (``bench.trainer.lr_at``). Only the current version can
be trained; rows of older versions stay readable, and analysis pools versions only when told to."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one GPT. ``vocab_size`` and ``seq_len`` come from the data."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = 8192
    seq_len: int = 64
    weight_tying: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width F, the study's: ⌊2·4H/3⌋ rounded up to a multiple of 256
        (768 / 1024 / 1280 / 1792 / 2304 at H = 224 / 320 / 480 / 640 / 832; 256 at H = 64)."""
        return 256 * math.ceil((8 * self.n_embd // 3) / 256)


# name -> (n_layer, n_embd, n_head). The study's sizes (README.md, "Models") and CPU presets.
PRESETS: dict[str, tuple[int, int, int]] = {
    "nano": (1, 32, 4),
    "micro": (2, 64, 4),
    "tiny": (4, 128, 4),
    "small": (6, 192, 4),
    "16M": (6, 224, 4),
    "29M": (9, 320, 4),
    "57M": (12, 480, 4),
    "109M": (15, 640, 4),
    "221M": (21, 832, 4),
}
CPU_PRESETS = ("nano", "micro", "tiny", "small")
STUDY_PRESETS = ("16M", "29M", "57M", "109M", "221M")


def preset(name: str, **kw) -> ModelConfig:
    """ModelConfig of a named preset; ``kw`` sets vocab_size, seq_len, weight_tying."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    n_layer, n_embd, n_head = PRESETS[name]
    return ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, **kw)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count of a config without allocating the model (closed form)."""
    H, V, L, F_ = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.ffn_dim
    block = 3 * H * H + H * H + 2 * cfg.head_dim + 2 * H * F_ + F_ * H + 2 * H
    return V * H * (1 if cfg.weight_tying else 2) + L * block + H


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6·N (non-embedding-lookup params) + attention 12·L·H·T."""
    n_matmul = count_params(cfg) - cfg.vocab_size * cfg.n_embd * (0 if cfg.weight_tying else 1)
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.seq_len
