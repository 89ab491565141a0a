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


SYNTHETIC_DEFAULTS = {"tokens": 2_000_000, "zipf": 1.1, "branching": 8, "seed": 0}
VAL_FRACTION = 0.1  # of a synthetic or text stream (``split_stream``)


def synthetic_options(rest: str) -> dict[str, int | float]:
    """The options of ``synthetic:rest``, validated: tokens (an integer >= 1; ``1e6`` is allowed),
    zipf (a finite number > 0), branching (an integer >= 1), seed (an integer >= 0)."""
    import math

    opts = _parse_options(rest)
    unknown = sorted(set(opts) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise DataError(f"unknown synthetic option(s) {unknown}; allowed: {sorted(SYNTHETIC_DEFAULTS)}")
    out: dict[str, int | float] = dict(SYNTHETIC_DEFAULTS)
    rules = {"tokens": ("an integer >= 1", 1), "branching": ("an integer >= 1", 1), "seed": ("an integer >= 0", 0)}
    for k, v in opts.items():
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if k == "zipf":
            if not (math.isfinite(x) and x > 0):
                raise DataError(f"synthetic option zipf={v!r}: must be a finite number > 0")
            out[k] = x
            continue
        allowed, low = rules[k]
        if not (math.isfinite(x) and x == int(x) and x >= low and (k != "seed" or x < 2**63)):
            raise DataError(f"synthetic option {k}={v!r}: must be {allowed}")
        out[k] = int(x)
    return out


def check_data_spec(spec: str, vocab_size: int | None = None, seq_len: int | None = None) -> None:
    """Raise DataError for a spec that cannot load, before anything runs.

    synthetic: its options (``synthetic_options``) and, given ``seq_len``, enough tokens for a
    validation window. text: regular files of UTF-8 text (``text.check_text``). bin: every
    shard's header and size, and given ``vocab_size`` every token id (``shards.check_shards``).
    Checked files are remembered by size and mtime, so a sweep pays for a scan once."""
    from pathlib import Path

    from .shards import check_shards
    from .text import check_text

    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        n = synthetic_options(rest)["tokens"]
        n_val = max(int(n * VAL_FRACTION), 1)
        if seq_len is not None and min(n_val, n - n_val) < seq_len + 2:
            raise DataError(f"synthetic option tokens={n}: too few for seq_len {seq_len} (the {VAL_FRACTION:.0%} "
                            f"validation split needs >= seq_len + 2 = {seq_len + 2} tokens: tokens >= "
                            f"{int((seq_len + 2) / VAL_FRACTION) + 10})")
    elif kind in ("text", "bin"):
        if not rest:
            raise DataError(f"data {spec!r} needs a path: {kind}:PATH")
        if not Path(rest).exists():
            raise DataError(f"data path not found: {rest}")
        if kind == "text":
            check_text(rest)
        elif vocab_size is not None:
            check_shards(rest, vocab_size, seq_len)
    else:
        raise DataError(f"unknown data source {spec!r}; allowed: synthetic, text:PATH, bin:PATH")


def load_data(spec: str, vocab_size: int) -> TokenData:
    """Load the token data named by ``spec`` for a model with ``vocab_size`` tokens."""
    check_data_spec(spec, vocab_size=vocab_size)
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        opts = synthetic_options(rest)
        return synthetic_data(vocab_size, n_tokens=opts["tokens"], zipf=opts["zipf"],
                              branching=opts["branching"], seed=opts["seed"])
    if kind == "text":
        return text_data(rest, vocab_size)
    return bin_data(rest, vocab_size)
