"""Data sources: deterministic synthetic corpus, cached BPE text, memory-mapped shards."""
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data import DataError, load_data
from bench.data.synthetic import synthetic_tokens

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def test_synthetic_corpus_is_deterministic_and_seed_dependent():
    a = synthetic_tokens(1000, 20000, seed=0)
    assert np.array_equal(a, synthetic_tokens(1000, 20000, seed=0))
    assert not np.array_equal(a, synthetic_tokens(1000, 20000, seed=1))


def test_synthetic_corpus_is_heavy_tailed_and_sequential():
    V = 4096
    t = synthetic_tokens(V, 400_000).astype(np.int64)
    counts = np.bincount(t, minlength=V)
    assert counts[0] > 50 * np.median(counts)  # Zipf head
    assert (counts < 10).mean() > 0.2  # many rare tokens, as in text
    # sequential structure: the next token is far more predictable than its unigram law
    pair = np.unique(t[:-1] * V + t[1:], return_counts=True)[1]
    p_next = pair / pair.sum()
    h_bigram_joint = -(p_next * np.log(p_next)).sum()
    p_uni = counts[counts > 0] / counts.sum()
    h_uni = -(p_uni * np.log(p_uni)).sum()
    assert h_bigram_joint - h_uni < 0.6 * h_uni  # H(next | current) well below H(next)


def test_train_batches_depend_only_on_seed_and_step():
    d = load_data("synthetic:tokens=30000", 512)
    x1, y1 = d.train_batch(5, seed=3, batch_size=4, seq_len=16)
    x2, y2 = d.train_batch(5, seed=3, batch_size=4, seq_len=16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    assert not torch.equal(x1, d.train_batch(6, seed=3, batch_size=4, seq_len=16)[0])


def test_validation_batches_are_fixed_and_come_from_the_held_out_tail():
    d = load_data("synthetic:tokens=30000", 512)
    v1 = d.val_batches(2, 4, 16)
    d2 = load_data("synthetic:tokens=30000", 512)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, d2.val_batches(2, 4, 16)))
    assert len(d.train[0]) + len(d.val[0]) == 30000 and len(d.val[0]) == 3000


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"shared text not found at {SHAKESPEARE} (../shared/data)")
def test_text_data_trains_and_caches_a_bpe_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("STABENCH_CACHE", str(tmp_path))
    d = load_data(f"text:{SHAKESPEARE}", 600)
    assert d.vocab_size == 600
    ids = np.concatenate(d.train + d.val)
    assert ids.max() < 600 and len(ids) < SHAKESPEARE.stat().st_size / 2  # BPE compresses
    assert len(list(tmp_path.rglob("*.tokenizer.json"))) == 1
    again = load_data(f"text:{SHAKESPEARE}", 600)
    assert np.array_equal(np.concatenate(again.train), np.concatenate(d.train))


def _llmc_shard(path: Path, tokens: np.ndarray, version: int = 1) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, version, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16 if version == 1 else np.uint32).tobytes())


def test_bin_shards_with_llmc_header_and_raw_nanogpt_files(tmp_path):
    rng = np.random.default_rng(0)
    a = tmp_path / "fineweb"
    a.mkdir()
    _llmc_shard(a / "fineweb_train_000001.bin", rng.integers(0, 50304, 5000))
    _llmc_shard(a / "fineweb_train_000002.bin", rng.integers(0, 50304, 3000))
    _llmc_shard(a / "fineweb_val_000000.bin", rng.integers(0, 50304, 2000))
    d = load_data(f"bin:{a}", 50304)
    assert d.n_train_tokens == 8000 and len(d.train) == 2
    x, y = d.train_batch(0, 1, 8, 64)
    assert x.shape == (8, 64) and int(x.max()) < 50304

    b = tmp_path / "nanogpt"
    b.mkdir()
    rng.integers(0, 1000, 4000).astype(np.uint16).tofile(b / "train.bin")
    rng.integers(0, 1000, 1000).astype(np.uint16).tofile(b / "val.bin")
    d = load_data(f"bin:{b}", 1024)
    assert d.n_train_tokens == 4000
    assert len(d.val_batches(2, 4, 32)) == 2


def test_bin_tokens_beyond_the_vocabulary_are_an_error(tmp_path):
    np.full(1000, 900, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.full(1000, 900, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match="token id 900 >= vocab_size 512"):
        load_data(f"bin:{tmp_path}", 512)
