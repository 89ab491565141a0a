"""stabench's compiled kernel (``bench.native``): it computes what PyTorch computes in float64, for any width
and cap, with NaN and infinite logits; it is built once per source, compiler and CPU and never half-read by a
process building beside it; a missing compiler, a failed build or a wrong build leaves the head on PyTorch's
passes with one line that says why; ``STABENCH_NATIVE=0`` turns it off."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import native

from helpers import native_kernel


@pytest.fixture
def compiler() -> None:
    """A C compiler that builds the kernel here: else a skip, or in CI a failure."""
    native_kernel()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty kernel cache of this test's own, and no kernel remembered by this process."""
    monkeypatch.setenv("STABENCH_CACHE", str(tmp_path))
    native.capped_kernel.cache_clear()
    yield tmp_path / "kernels"
    native.capped_kernel.cache_clear()


def _compare(kernel, l: torch.Tensor, y: torch.Tensor, cap: float, grad: bool = True, stats: bool = True):
    want, want_q = native.reference(l, y, cap)
    buf = l.clone()
    got = kernel(buf, y, cap, grad=grad, stats=stats)
    want_buf = want_q if grad else torch.sigmoid(2 * l.double() / cap)
    for name, a, b in zip(("lse", "norm", "lt_y", "s_y", "stats", "buffer"), (*got, buf), (*want, want_buf)):
        if a is None:
            assert name == "stats" and not stats
            continue
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5 * max(1.0, float(b.abs().nan_to_num().max())),
                                   equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("V", [1, 15, 16, 17, 1000, 8192])
@pytest.mark.parametrize("cap", [1.0, 30.0, 100.0])
def test_the_kernel_equals_pytorch_in_float64_for_any_width_and_cap(V, cap):
    """Widths below, at and past a vector of 16 floats, caps from 1 to 100, logits from ±0.1c to ±6c."""
    kernel = native_kernel()
    gen = torch.Generator().manual_seed(V)
    l = torch.randn(6, V, generator=gen) * cap * torch.tensor([0.1, 0.5, 1, 2, 4, 6])[:, None]
    y = torch.randint(0, V, (6,), generator=gen)
    _compare(kernel, l, y, cap)


def test_without_a_gradient_the_buffer_keeps_sigma_and_statistics_are_optional():
    kernel = native_kernel()
    l = torch.randn(5, 300, generator=torch.Generator().manual_seed(1)) * 20
    y = torch.arange(5)
    _compare(kernel, l, y, 30.0, grad=False, stats=False)
    _compare(kernel, l, y, 30.0, grad=False, stats=True)


def test_infinite_logits_are_capped_and_a_nan_spreads_to_its_row_alone():
    """+∞ and −∞ logits are ±c (finite log Z); a NaN makes its own row's log Z, statistics and gradient NaN, as
    PyTorch's passes do (a diverging run is recorded as such), and no other row's."""
    kernel = native_kernel()
    l = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    l[0] = float("inf")
    l[1, ::2] = float("-inf")
    l[2, 7] = float("nan")
    y = torch.tensor([3, 4, 5, 6])
    _compare(kernel, l, y, 30.0)
    buf = l.clone()
    rows = kernel(buf, y, 30.0, grad=True, stats=True)
    assert torch.isfinite(rows.lse[[0, 1, 3]]).all() and rows.lse[2].isnan()
    assert buf[2].isnan().all() and torch.isfinite(buf[[0, 1, 3]]).all()


def test_an_empty_chunk_and_bad_arguments():
    kernel = native_kernel()
    rows = kernel(torch.empty(0, 10), torch.empty(0, dtype=torch.int64), 30.0, grad=True, stats=True)
    assert rows.lse.shape == (0,) and rows.stats.shape == (0, 3)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel(torch.zeros(4, 10, dtype=torch.float64), torch.zeros(4, dtype=torch.int64), 30.0, True, False)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel(torch.zeros(10, 4).T, torch.zeros(4, dtype=torch.int64), 30.0, True, False)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        kernel(torch.zeros(4, 10), torch.tensor([0, 1, 2, 10]), 30.0, True, False)


def test_the_kernel_is_built_once_and_reused(cache, compiler, monkeypatch):
    first = native.build()
    assert first.parent == cache and first.suffix == ".so"
    version = native._compiler_version(native.compiler())
    monkeypatch.setattr(native, "_compiler_version", lambda cc: version)
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("built again"))
    assert native.build() == first


def test_a_changed_source_or_compiler_gets_a_build_of_its_own(cache, compiler, tmp_path, monkeypatch):
    first = native.build()
    changed = tmp_path / "capped_softmax.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    second = native.build()
    assert second != first and second.exists()
    monkeypatch.setattr(native, "_compiler_version", lambda cc: "another compiler 1.0")
    assert native.build() not in (first, second)


def test_processes_that_build_at_once_each_load_one_whole_library(cache, compiler):
    """Four processes build into one empty cache at once: each loads the same checked kernel; no temporary
    file is left."""
    env = {**os.environ, "STABENCH_CACHE": str(cache.parent)}
    code = "from bench import native; k = native.capped_kernel(); print(k.path if k else 'NONE')"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert len(paths) == 1 and "NONE" not in paths, paths
    assert sorted(q.name for q in cache.iterdir()) == [Path(paths.pop()).name]


def test_without_a_compiler_the_head_takes_pytorchs_passes_and_says_why_once(cache, monkeypatch, capfd):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.capped_kernel() is None and native.capped_kernel() is None
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "no C compiler" in err and "PyTorch's passes" in err
    assert not cache.exists() or not any(cache.iterdir())


def test_a_failed_build_leaves_nothing_behind(cache, monkeypatch, capfd):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert native.capped_kernel() is None
    assert "failed to build" in capfd.readouterr().err
    assert not any(cache.iterdir())


def test_a_build_that_computes_wrong_is_never_used(compiler, cache, tmp_path, monkeypatch, capfd):
    """The check before first use catches a kernel whose slope is σ(1 + σ) instead of σ(1 − σ)."""
    wrong = tmp_path / "capped_softmax.c"
    source = native.SOURCE.read_text()
    assert "* s * (1.0f - s)" in source
    wrong.write_text(source.replace("* s * (1.0f - s)", "* s * (1.0f + s)"))
    monkeypatch.setattr(native, "SOURCE", wrong)
    capfd.readouterr()
    assert native.capped_kernel() is None
    assert "does not match PyTorch" in capfd.readouterr().err


def test_stabench_native_0_turns_it_off_without_building(cache, monkeypatch):
    monkeypatch.setenv("STABENCH_NATIVE", "0")
    monkeypatch.setattr(native, "build", lambda: pytest.fail("built"))
    assert native.capped_kernel() is None


def test_each_user_loads_only_their_own_build(cache, compiler, monkeypatch, capfd):
    """A cache shared between users (a cluster's ``$STABENCH_CACHE``): each user's build has a name of its own,
    and a library or folder that another user owns, or that others may write, is never loaded — the head takes
    PyTorch's passes and one line says why and how to fix it."""
    path = native.build()
    assert path.name.endswith(f"-u{os.getuid()}.so")
    native.check_private(path)  # this user's own build, mode 755 whatever the umask, in a folder of 755: loads
    assert oct(path.stat().st_mode & 0o777) == "0o755" and not cache.stat().st_mode & 0o022

    path.chmod(0o666)
    native.capped_kernel.cache_clear()  # the compiler fixture loaded it before the change
    assert native.capped_kernel() is None
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "writable by others" in err and "chmod go-w" in err
    path.chmod(0o755)

    cache.chmod(0o777)  # a folder anyone may write: someone could swap the file
    native.capped_kernel.cache_clear()
    assert native.capped_kernel() is None and "folder" in capfd.readouterr().err
    cache.chmod(0o1777)  # ... unless sticky, as /tmp: only the file's owner may rename it
    native.check_private(path)
    cache.chmod(0o755)

    uid = os.getuid()
    monkeypatch.setattr(native.os, "getuid", lambda: uid + 4242)  # the same files, seen by another user
    with pytest.raises(native.NativeUnavailable, match="belongs to another user"):
        native.check_private(path)
    assert native.build() != path  # that user's build has a name of its own
