"""Plain-text data, tokenized with a byte-level BPE tokenizer trained and cached locally.

The tokenizer (HuggingFace ``tokenizers``) is trained on the text itself with the
requested vocabulary size; tokenizer and token ids are cached under
``$STABENCH_CACHE`` (default ``~/.cache/stabench``), keyed by the text's SHA-256
and the vocabulary size, so later runs load them instantly.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .tokens import DataError, TokenData, split_stream


def cache_dir() -> Path:
    return Path(os.environ.get("STABENCH_CACHE", Path.home() / ".cache" / "stabench"))


def _text_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no .txt files under {path}")
    return files


_CHECKED: dict[tuple, None] = {}


def check_text(path: str) -> None:
    """Check that ``text:path`` is a regular file, or a directory of them, of non-empty UTF-8 text
    (no NUL bytes: a binary file is refused, not tokenized). Reads each file once, in chunks; the
    result is remembered per (files, sizes, mtimes)."""
    import codecs

    root = Path(path)
    if not (root.is_dir() or root.is_file()):
        raise DataError(f"text:{path}: not a regular file or directory (a FIFO or device would block)")
    files = _text_files(root)
    key = tuple((str(f), *((st := f.stat()).st_size, st.st_mtime_ns)) for f in files)
    if key in _CHECKED:
        return
    total = 0
    for f in files:
        if not f.is_file():
            raise DataError(f"text:{path}: {f} is not a regular file")
        decoder, offset = codecs.getincrementaldecoder("utf-8")("strict"), 0
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 20):
                nul = chunk.find(b"\0")
                if nul >= 0:
                    raise DataError(f"text:{path}: {f} is binary (a NUL byte at offset {offset + nul}); "
                                    "text: needs UTF-8 text, bin: takes token shards")
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise DataError(f"text:{path}: {f} is not UTF-8 text (byte {offset + e.start}: {e.reason})") \
                        from None
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(f"text:{path}: {f} is not UTF-8 text (it ends inside a character)") from None
        total += offset
    if total == 0:
        raise DataError(f"text:{path}: no text (0 bytes)")
    _CHECKED[key] = None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def text_data(path: str, vocab_size: int) -> TokenData:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_text(path)
    files = _text_files(Path(path))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    key = f"{digest.hexdigest()[:16]}-v{vocab_size}"
    root = cache_dir() / "text"
    root.mkdir(parents=True, exist_ok=True)
    tok_path, ids_path = root / f"{key}.tokenizer.json", root / f"{key}.tokens.npy"
    if not ids_path.exists():
        if tok_path.exists():
            tok = Tokenizer.from_file(str(tok_path))
        else:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train([str(f) for f in files], trainer)
            _atomic_write(tok_path, lambda p: tok.save(str(p)))
        ids = []
        for f in files:
            ids.extend(tok.encode(f.read_text(encoding="utf-8", errors="replace")).ids)
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        arr = np.asarray(ids, dtype=dtype)
        _atomic_write(ids_path, lambda p: np.save(open(p, "wb"), arr))
    tokens = np.load(ids_path, mmap_mode="r")
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"text:{path}: token id {int(tokens.max())} >= vocab_size {vocab_size}")
    return split_stream(f"text:{path}", vocab_size, tokens)
