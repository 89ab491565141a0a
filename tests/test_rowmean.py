"""μ by blocks of rows (``bench.stabilizers.rowmean``): ATen's bits, a faster read after AdamW's write."""
import pytest
import torch

from bench.stabilizers import rowmean
from bench.stabilizers.rowmean import row_mean


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.setattr(rowmean, "_MATCHES", {})
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("V, H", [(8192, 64), (50304, 224), (12293, 32), (65535, 96), (8192, 24), (50304, 8)])
def test_row_mean_is_atens_mean_bit_for_bit(V, H, dtype, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(V + H)
    for scale in (0.02, 7.0):  # centred-ish and offset rows, as E before and after μ-centering
        E = (scale * torch.randn(V, H, generator=g, dtype=dtype)).add_(torch.randn(1, H, generator=g, dtype=dtype))
        assert torch.equal(row_mean(E), E.mean(0, keepdim=True))
    assert list(rowmean._MATCHES) == [(V, H, dtype, threads)]  # checked once


@pytest.mark.parametrize("V, H", [(8192, 64), (8192, 128), (8192, 192), (50304, 224), (50304, 832)])
def test_the_presets_embeddings_are_summed_by_blocks(V, H):
    """Every preset's width is a multiple of 32, where (on the CPUs measured) ATen's column sum is the
    block cascade that ``_blocked_sum`` reproduces; some narrower widths (8, 16, 24, 48) take another
    ATen path there, and keep ``E.mean`` by the first call's check (above)."""
    torch.set_num_threads(2)
    E = torch.randn(V, H).add_(3.0)
    assert torch.equal(row_mean(E), E.mean(0, keepdim=True))
    assert rowmean._MATCHES == {(V, H, torch.float32, 2): True}


def test_the_check_uses_a_probe_not_the_tensor_at_hand(monkeypatch):
    """A constant E sums alike in any order: it must not vouch for the blocked sum; a random probe of its
    shape does, once per shape, dtype and thread count, without touching the run's RNG."""
    calls = []
    probe = rowmean._reproduces_mean
    monkeypatch.setattr(rowmean, "_reproduces_mean",
                        lambda shape, dtype: calls.append((tuple(shape), dtype)) or probe(shape, dtype))
    E = torch.full((8192, 64), 0.5)
    state = torch.random.get_rng_state()
    assert torch.equal(row_mean(E), E.mean(0, keepdim=True))
    row_mean(E)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert calls == [((8192, 64), torch.float32)]


def test_where_the_blocked_sum_would_differ_by_a_bit_row_mean_keeps_atens_mean(monkeypatch):
    blocked = rowmean._blocked_sum
    monkeypatch.setattr(rowmean, "_blocked_sum", lambda E: torch.nextafter(blocked(E), torch.tensor(1.0)))
    E = torch.randn(8192, 16)
    for _ in range(2):
        assert torch.equal(row_mean(E), E.mean(0, keepdim=True))
    assert rowmean._MATCHES == {(8192, 16, torch.float32, torch.get_num_threads()): False}


@pytest.mark.parametrize("case", ["few rows", "requires grad", "not contiguous", "bf16", "in vmap"])
def test_what_the_blocks_do_not_fit_takes_atens_mean(case):
    E = torch.randn(3000 if case == "few rows" else 8192, 16)
    if case == "requires grad":
        E.requires_grad_()
    if case == "not contiguous":
        E = torch.randn(16, 8192).T
    if case == "bf16":
        E = E.bfloat16()
    if case == "in vmap":
        got = torch.vmap(row_mean)(torch.stack([E, 2 * E]))
        assert torch.equal(got, torch.stack([E, 2 * E]).mean(1, keepdim=True))
    else:
        assert torch.equal(row_mean(E), E.mean(0, keepdim=True))
    assert rowmean._MATCHES == {}
