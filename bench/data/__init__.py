"""Token data: one interface over three sources, selected by a spec string.

- ``synthetic`` (or ``synthetic:tokens=2000000,zipf=1.1,branching=8,seed=0``):
  a deterministic Zipf/Markov corpus generated in memory, the offline default;
- ``text:PATH``: plain-text file(s), BPE-tokenized with a tokenizer trained and cached locally;
- ``bin:PATH``: pre-tokenized uint16/uint32 shards, memory-mapped (nanoGPT / llm.c layout).

Split rule: for ``synthetic`` and ``text`` the last 10% of the token stream is
validation; ``bin`` uses files whose names contain ``val`` for validation and ``train``
for training. Validation batches are fixed windows spread evenly over the validation
split, the same for every run with the same data, seq_len and batch size.
Training batch i of a run depends only on (data seed, i): reproducible and resumable.
"""
from __future__ import annotations

from .tokens import TokenData, DataError
from .synthetic import synthetic_data
from .text import text_data
from .shards import bin_data

__all__ = ["TokenData", "DataError", "load_data", "check_data_spec"]


def _parse_options(spec: str) -> dict[str, str]:
    opts = {}
    for part in filter(None, spec.split(",")):
        if "=" not in part:
            raise DataError(f"data option {part!r} is not key=value")
        k, v = part.split("=", 1)
        opts[k.strip()] = v.strip()
    return opts


def check_data_spec(spec: str) -> None:
    """Raise DataError for a spec that cannot load (cheap: checks paths, not contents)."""
    from pathlib import Path

    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        _parse_options(rest)
    elif kind in ("text", "bin"):
        if not rest:
            raise DataError(f"data {spec!r} needs a path: {kind}:PATH")
        if not Path(rest).exists():
            raise DataError(f"data path not found: {rest}")
    else:
        raise DataError(f"unknown data source {spec!r}; allowed: synthetic, text:PATH, bin:PATH")


def load_data(spec: str, vocab_size: int) -> TokenData:
    """Load the token data named by ``spec`` for a model with ``vocab_size`` tokens."""
    check_data_spec(spec)
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        opts = _parse_options(rest)
        allowed = {"tokens", "zipf", "branching", "seed"}
        if set(opts) - allowed:
            raise DataError(f"unknown synthetic option(s) {sorted(set(opts) - allowed)}; allowed: {sorted(allowed)}")
        return synthetic_data(
            vocab_size,
            n_tokens=int(float(opts.get("tokens", 2_000_000))),
            zipf=float(opts.get("zipf", 1.1)),
            branching=int(opts.get("branching", 8)),
            seed=int(opts.get("seed", 0)),
        )
    if kind == "text":
        return text_data(rest, vocab_size)
    return bin_data(rest, vocab_size)
