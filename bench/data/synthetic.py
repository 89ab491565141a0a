"""A deterministic synthetic corpus with Zipf unigrams and Markov structure.

Each token v has ``branching`` successors drawn from a Zipf(``zipf``) law over the
vocabulary; the next token is successor j of the current one with probability
∝ 1/(j+1), or, with probability ``restart``, a fresh Zipf draw. The stream is thus
learnable (a bigram model reaches far below ln V) and heavy-tailed: many tokens
are rare or never occur, as in real text. Token id = frequency rank (0 = most common).
"""
from __future__ import annotations

import numpy as np

from .tokens import TokenData, split_stream


def zipf_sampler(vocab_size: int, exponent: float, rng: np.random.Generator):
    cdf = np.cumsum(np.arange(1, vocab_size + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    return lambda n: np.minimum(np.searchsorted(cdf, rng.random(n)), vocab_size - 1)


def synthetic_tokens(vocab_size: int, n_tokens: int, zipf: float = 1.1, branching: int = 8,
                     restart: float = 0.1, seed: int = 0, chains: int = 256) -> np.ndarray:
    """``n_tokens`` token ids (uint32 or uint16) from ``chains`` parallel Markov chains."""
    rng = np.random.default_rng([seed, vocab_size, branching])
    draw = zipf_sampler(vocab_size, zipf, rng)
    successors = draw(vocab_size * branching).reshape(vocab_size, branching)
    branch_cdf = np.cumsum(1.0 / np.arange(1, branching + 1))
    branch_cdf /= branch_cdf[-1]
    length = -(-n_tokens // chains)
    out = np.empty((chains, length), dtype=np.uint32)
    cur = draw(chains)
    for t in range(length):
        out[:, t] = cur
        branch = np.minimum(np.searchsorted(branch_cdf, rng.random(chains)), branching - 1)
        nxt = successors[cur, branch]
        reset = rng.random(chains) < restart
        nxt[reset] = draw(int(reset.sum()))
        cur = nxt
    tokens = out.reshape(-1)[:n_tokens]
    return tokens.astype(np.uint16) if vocab_size <= 1 << 16 else tokens


def synthetic_data(vocab_size: int, n_tokens: int = 2_000_000, zipf: float = 1.1,
                   branching: int = 8, seed: int = 0) -> TokenData:
    tokens = synthetic_tokens(vocab_size, n_tokens, zipf=zipf, branching=branching, seed=seed)
    name = f"synthetic:tokens={n_tokens},zipf={zipf},branching={branching},seed={seed}"
    return split_stream(name, vocab_size, tokens)
