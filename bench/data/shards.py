"""Pre-tokenized token shards, memory-mapped: the layout clusters already have.

``bin:DIR`` uses ``DIR/*train*.bin`` for training and ``DIR/*val*.bin`` for validation
(nanoGPT's ``train.bin``/``val.bin`` and llm.c/modded-nanogpt's
``fineweb_train_000001.bin`` … both match). A file that starts with a 256 × int32
llm.c header (magic 20240520 or 20240801; version 1 ⇒ uint16, 2 ⇒ uint32; word 2 =
token count) is read after the header; a headerless file is raw uint16 when the
vocabulary fits in 16 bits, else uint32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .tokens import DataError, TokenData

HEADER_WORDS = 256
MAGICS = (20240520, 20240801)


CHUNK = 1 << 24  # tokens per read when scanning a shard's token ids


def open_shard(path: Path, vocab_size: int) -> np.ndarray:
    """The tokens of one shard, memory-mapped; DataError for a file that is not a usable shard
    (not a regular file, an unknown header version, a header count beyond the file's end, a byte
    count that is not a whole number of tokens, no tokens)."""
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    size = path.stat().st_size
    head = np.fromfile(path, dtype=np.int32, count=3)
    if len(head) == 3 and head[0] in MAGICS:
        dtype = {1: np.uint16, 2: np.uint32}.get(int(head[1]))
        if dtype is None:
            raise DataError(f"{path}: unknown shard version {int(head[1])}; allowed: 1 (uint16), 2 (uint32)")
        count, room = int(head[2]), (size - HEADER_WORDS * 4) // np.dtype(dtype).itemsize
        if count <= 0 or count > room:
            raise DataError(f"{path}: header says {count} tokens but the file holds {max(room, 0)} after its "
                            f"{HEADER_WORDS * 4}-byte header; the shard is truncated or its header is wrong")
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_WORDS * 4, shape=(count,))
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    itemsize = np.dtype(dtype).itemsize
    if size == 0:
        raise DataError(f"{path}: empty shard (0 bytes)")
    if size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {np.dtype(dtype).name} tokens "
                        f"({itemsize} bytes each, for vocab_size {vocab_size}); the shard is truncated")
    return np.memmap(path, dtype=dtype, mode="r")


def max_token(tokens: np.ndarray) -> int:
    """Largest token id of a (memory-mapped) array, read in chunks of ``CHUNK`` tokens."""
    return max(int(tokens[i:i + CHUNK].max()) for i in range(0, len(tokens), CHUNK))


def _shards(root: Path) -> tuple[list[Path], list[Path]]:
    if not root.is_dir():
        raise DataError(f"bin:{root} must be a directory with *train*.bin and *val*.bin shards")
    train = sorted(root.glob("*train*.bin"))
    val = sorted(root.glob("*val*.bin"))
    if not train or not val:
        raise DataError(f"bin:{root}: need both *train*.bin and *val*.bin files (found {len(train)} train, "
                        f"{len(val)} val)")
    return train, val


def _signature(files: list[Path]) -> tuple:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(f), -1, -1))
    return tuple(out)


_CHECKED: dict[tuple, None] = {}


def check_shards(path: str, vocab_size: int, seq_len: int | None = None) -> None:
    """Check every shard of ``bin:path``: its header and size (``open_shard``), that it holds more
    than ``seq_len + 1`` tokens, and that every token id, in every shard, is < ``vocab_size``.
    The full scan reads each shard once; its result is remembered per (files, sizes, mtimes)."""
    train, val = _shards(Path(path))
    key = (path, vocab_size, seq_len, _signature(train + val))
    if key in _CHECKED:
        return
    for f in train + val:
        tokens = open_shard(f, vocab_size)
        if seq_len is not None and len(tokens) < seq_len + 2:
            raise DataError(f"{f}: {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        if np.iinfo(tokens.dtype).max >= vocab_size:  # else no id can reach vocab_size
            top = max_token(tokens)
            if top >= vocab_size:
                raise DataError(f"{f}: token id {top} >= vocab_size {vocab_size}; set vocab_size above "
                                "the data's largest id")
    _CHECKED[key] = None


def bin_data(path: str, vocab_size: int) -> TokenData:
    train, val = _shards(Path(path))
    check_shards(path, vocab_size)
    return TokenData(f"bin:{path}", vocab_size, [open_shard(f, vocab_size) for f in train],
                     [open_shard(f, vocab_size) for f in val])
