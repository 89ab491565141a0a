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


def open_shard(path: Path, vocab_size: int) -> np.ndarray:
    head = np.fromfile(path, dtype=np.int32, count=3)
    if len(head) == 3 and head[0] in MAGICS:
        dtype = {1: np.uint16, 2: np.uint32}.get(int(head[1]))
        if dtype is None:
            raise DataError(f"{path}: unknown shard version {int(head[1])}")
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_WORDS * 4, shape=(int(head[2]),))
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r")


def bin_data(path: str, vocab_size: int) -> TokenData:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"bin:{path} must be a directory with *train*.bin and *val*.bin shards")
    train = sorted(root.glob("*train*.bin"))
    val = sorted(root.glob("*val*.bin"))
    if not train or not val:
        raise DataError(f"bin:{path}: need both *train*.bin and *val*.bin files (found {len(train)} train, {len(val)} val)")
    train_arrays = [open_shard(f, vocab_size) for f in train]
    val_arrays = [open_shard(f, vocab_size) for f in val]
    probe = train_arrays[0][: 1 << 20]
    if probe.size and int(probe.max()) >= vocab_size:
        raise DataError(f"bin:{path}: token id {int(probe.max())} >= vocab_size {vocab_size}")
    return TokenData(f"bin:{path}", vocab_size, train_arrays, val_arrays)
