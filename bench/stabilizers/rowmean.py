"""μ, the mean of the V rows of E (V, H): ``row_mean(E)``, (1, H), with the bits of
``E.mean(0, keepdim=True)``, read in blocks of rows.

Why: on CPU, ATen's column sum splits the H columns between its threads, so each thread reads
every row of E. Right after AdamW wrote E (each thread its own run of rows), half of what each
thread reads sits in the other core's cache. At ``micro`` (E 8192 × 64 fp32, two threads) the mean
took ~190 µs right after such a write against ~28 µs without one; summed by blocks of rows, ~40 µs.

How the bits stay ATen's: its CPU column sum (``multi_row_sum`` in ATen's SumKernel.cpp) adds the
rows in a cascade of four levels of 16 rows, so its top level adds the sums of consecutive
4096-row blocks in order, and at the end adds that to the sum of the remaining rows. Summing each
4096-row block on its own (a (k, 4096, H) view), adding the k block sums in order and adding the
result to the tail's sum performs the same float additions. That order is ATen's implementation,
not its contract: the first call for each shape, dtype and thread count compares the two on a
random probe of that shape (not on E, whose values could hide a different order: a constant or
zero E sums alike in any order), and where any bit differs uses ``E.mean`` from then on.
"""
from __future__ import annotations

import torch

BLOCK_ROWS = 4096
"""Rows per block: 16³, the span of the cascade's top level (4 levels of 16 rows)."""

MAX_BLOCKS = 15
"""Block sums are added in order by ATen's tail loop only while fewer than 16 (V < 65,536 rows)."""

_MATCHES: dict[tuple, bool] = {}
"""(V, H, dtype, threads) -> whether the blocked sum reproduced ATen's bits on the probe."""


def _is_batched(t: torch.Tensor) -> bool:
    """True inside ``torch.vmap`` (a pack's members): no data-dependent check can run there."""
    try:
        return bool(torch._C._functorch.is_batchedtensor(t))
    except AttributeError:  # pragma: no cover - torch without functorch's C API
        return False


def _blocked_mean(E: torch.Tensor) -> torch.Tensor:
    """``_blocked_sum(E)`` / V, as ``mean`` divides its sum."""
    return _blocked_sum(E).div_(E.shape[0])


def _blocked_sum(E: torch.Tensor) -> torch.Tensor:
    """Σ rows of E (V, H) as (1, H): the sum of each 4096-row block, the block sums added in order,
    added to the sum of the rows after the last whole block."""
    V, H = E.shape
    k = V // BLOCK_ROWS
    total = E[: k * BLOCK_ROWS].view(k, BLOCK_ROWS, H).sum(1).sum(0, keepdim=True)  # (k, H) -> (1, H)
    if V > k * BLOCK_ROWS:
        total = E[k * BLOCK_ROWS:].sum(0, keepdim=True).add_(total)
    return total


def _blockable(E: torch.Tensor) -> bool:
    return (E.device.type == "cpu" and E.dtype in (torch.float32, torch.float64) and E.dim() == 2
            and E.is_contiguous() and not E.requires_grad and 2 <= E.shape[0] // BLOCK_ROWS <= MAX_BLOCKS
            and not _is_batched(E))


def row_mean(E: torch.Tensor) -> torch.Tensor:
    """μ = mean of the rows of E (V, H): (1, H), bit for bit ``E.mean(0, keepdim=True)``. A detached
    CPU float32/float64 E of 8,192–65,535 rows is summed by blocks of rows (see the module's
    docstring); anything else (a GPU, a pack's vmapped E, a tensor that requires grad) takes
    ``E.mean``."""
    if not _blockable(E):
        return E.mean(0, keepdim=True)
    key = (*E.shape, E.dtype, torch.get_num_threads())
    if key not in _MATCHES:
        _MATCHES[key] = _reproduces_mean(E.shape, E.dtype)
    return _blocked_mean(E) if _MATCHES[key] else E.mean(0, keepdim=True)


def _reproduces_mean(shape: torch.Size, dtype: torch.dtype) -> bool:
    """Whether the blocked sum, divided by V, has ``mean``'s bits on a random probe of ``shape``: rows
    N(0, 1) plus a common offset per column, from a generator of its own (the run's RNG is untouched)."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(shape, generator=g, dtype=dtype).add_(torch.randn(shape[-1], generator=g, dtype=dtype))
    return torch.equal(_blocked_mean(probe), probe.mean(0, keepdim=True))
