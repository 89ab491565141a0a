"""Small shared helpers for tests (not fixtures: plain functions)."""
from __future__ import annotations

from bench.config import RunConfig, from_dict

TINY = dict(model="nano", vocab_size=256, seq_len=32, batch_size=4, steps=30, warmup=5,
            eval_every=10, eval_batches=2, log_every=5, data="synthetic:tokens=50000", threads=1)


def tiny_config(**overrides) -> RunConfig:
    """A run that trains in about a second on one core."""
    return from_dict({**TINY, **overrides}).check()


def native_kernel():
    """stabench's compiled soft-capping kernel (``bench.native``). Where this machine has no C compiler, a skip
    that says how to get one (in CI, ``CI=true``, a failure); where it has one, a kernel that fails to build or
    to match PyTorch is a failure."""
    import pytest

    from bench import native
    from services import missing

    try:
        native.compiler()
    except native.NativeUnavailable:
        missing("a C compiler for stabench's compiled soft-capping kernel ($CC or cc)",
                "apt-get install -y gcc libc6-dev", "STABENCH_REQUIRE_CC")
    kernel = native.capped_kernel()
    if kernel is None:
        pytest.fail("this machine has a C compiler, but the kernel did not build or did not match PyTorch "
                    "(stderr says why)")
    return kernel
