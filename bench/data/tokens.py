"""TokenData: train/validation token streams and deterministic batch sampling."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError


@dataclass
class TokenData:
    """Token streams (1-D integer arrays, possibly memory-mapped shards)."""

    name: str
    vocab_size: int
    train: list[np.ndarray]
    val: list[np.ndarray]
    _val_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_train_tokens(self) -> int:
        return sum(len(a) for a in self.train)

    def _windows(self, arrays: list[np.ndarray], positions: np.ndarray, seq_len: int) -> torch.Tensor:
        """Windows of seq_len+1 tokens at global ``positions`` (clamped inside their shard)."""
        lengths = np.array([len(a) for a in arrays])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        shard = np.searchsorted(starts, positions, side="right") - 1
        out = np.empty((len(positions), seq_len + 1), dtype=np.int64)
        ar = np.arange(seq_len + 1)
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = np.minimum(positions[rows] - starts[s], lengths[s] - seq_len - 1)
            out[rows] = arrays[s][local[:, None] + ar]
        return torch.from_numpy(out)

    def train_batch(self, step: int, seed: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` of the run with data seed ``seed``: inputs and targets, both (B, T) int64."""
        rng = np.random.default_rng([seed, step])
        pos = rng.integers(0, self.n_train_tokens - seq_len - 1, size=batch_size)
        w = self._windows(self.train, pos, seq_len)
        return w[:, :-1], w[:, 1:]

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n_batches`` fixed validation batches (the same for every run)."""
        key = (n_batches, batch_size, seq_len)
        if key not in self._val_cache:
            total = sum(len(a) for a in self.val)
            if total < seq_len + 2:
                raise DataError(f"{self.name}: validation split has {total} tokens, fewer than seq_len={seq_len}")
            pos = np.linspace(0, total - seq_len - 2, n_batches * batch_size).astype(np.int64)
            w = self._windows(self.val, pos, seq_len).view(n_batches, batch_size, seq_len + 1)
            self._val_cache[key] = [(b[:, :-1], b[:, 1:]) for b in w]
        return self._val_cache[key]


def split_stream(name: str, vocab_size: int, tokens: np.ndarray, val_fraction: float = 0.1) -> TokenData:
    """Last ``val_fraction`` of a single stream is validation."""
    n_val = max(int(len(tokens) * val_fraction), 1)
    return TokenData(name, vocab_size, [tokens[:-n_val]], [tokens[-n_val:]])
