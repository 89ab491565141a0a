"""Small shared helpers for tests (not fixtures: plain functions)."""
from __future__ import annotations

from bench.config import RunConfig, from_dict

TINY = dict(model="nano", vocab_size=256, seq_len=32, batch_size=4, steps=30, warmup=5,
            eval_every=10, eval_batches=2, log_every=5, data="synthetic:tokens=50000", threads=1)


def tiny_config(**overrides) -> RunConfig:
    """A run that trains in about a second on one core."""
    return from_dict({**TINY, **overrides}).check()
