"""stabench's one compiled CPU kernel: the soft-capped softmax cross-entropy of a chunk of logits.

PyTorch has no single CPU kernel for softmax(c·tanh(l/c)) and its slope, so soft-capping costs the loss
head separate passes over each chunk's (n × V) logits (the capped logits, the softmax, the slope), each
crossing memory. ``capped_softmax.c`` does the three in one call, row by row from the first-level caches
(what each pass computes is in the file). ``bench.head`` uses it where the head multiplies in oneDNN (fp32
CPU runs; ATen's products keep their own passes and the committed results' bits).

The kernel is built on first use with the system C compiler (``$CC``, else ``cc``): -O3 for the vector
width PyTorch itself dispatches to on this CPU (AVX-512, AVX2 or the compiler's baseline), OpenMP over
rows where the compiler has it. The library goes to ``$STABENCH_CACHE/kernels`` (default
``~/.cache/stabench``) under a name keyed by the source, the compiler and its flags, so a changed file, a
different compiler or another CPU's build never loads, and by user: a library is loaded only from a file and
folder that this user owns and no one else may write. It is written to a temporary name and renamed,
so processes that build at once never read half a file. Before first use it must match PyTorch in float64 on
a small chunk (tails, a NaN row, a saturated row). Where there is no compiler, the build fails or the check
does, ``capped_kernel()`` says why on one stderr line and returns None, and the head takes PyTorch's
passes. ``STABENCH_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("capped_softmax.c")
_VECTOR_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]


class NativeUnavailable(RuntimeError):
    """Why the kernel cannot be used here (no compiler, a failed build, a failed check)."""


class CappedRows(NamedTuple):
    """What the kernel returns for a chunk of n tokens (the gradient, when asked for, is in the logits' buffer)."""
    lse: torch.Tensor  # (n,) float64: log Z of the capped logits
    norm: torch.Tensor  # (n,) float64: Z·e^-m (m the row's largest capped logit), 1 in a row with a NaN
    lt_y: torch.Tensor  # (n,) float64: the target's capped logit
    s_y: torch.Tensor  # (n,) float32: σ(2l/c) at the target
    stats: torch.Tensor | None  # (n, 3) float32: Σ lt, Σ lt², max |lt| per row


def cache_dir() -> Path:
    """Where built kernels live: ``$STABENCH_CACHE/kernels`` (default ``~/.cache/stabench/kernels``)."""
    return Path(os.environ.get("STABENCH_CACHE", Path.home() / ".cache" / "stabench")) / "kernels"


def compiler() -> list[str]:
    """The C compiler's command: ``$CC`` (split as a shell would), else ``cc``; NativeUnavailable if absent."""
    cmd = shlex.split(os.environ.get("CC", "")) or ["cc"]
    if shutil.which(cmd[0]) is None:
        raise NativeUnavailable(f"no C compiler ({cmd[0]!r} not found; set CC or install one, e.g. apt-get install gcc)")
    return cmd


def _flags() -> list[str]:
    vector = _VECTOR_FLAGS.get(torch.backends.cpu.get_cpu_capability(), []) \
        if platform.machine().lower() in ("x86_64", "amd64") else []
    return _BASE_FLAGS + vector


def _compiler_version(cc: list[str]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def build() -> Path:
    """The kernel's shared library, built into ``cache_dir()`` unless already there; NativeUnavailable if it
    cannot be built. OpenMP when the compiler takes ``-fopenmp``, else one thread."""
    cc, flags, src = compiler(), _flags(), SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(cc + flags).encode(), _compiler_version(cc).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"capped_softmax-{key}{_user_suffix()}.so"
    if target.exists():
        return target
    out_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        errors = []
        for openmp in (["-fopenmp"], []):
            run = subprocess.run([*cc, *flags, *openmp, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                 timeout=300)
            if run.returncode == 0:
                os.chmod(tmp, 0o755)  # whatever the umask: check_private refuses a library that others may write
                os.replace(tmp, target)  # atomic: a process building beside this one reads one whole file
                return target
            errors.append((run.stderr or run.stdout).strip().splitlines()[-1:] or ["(no output)"])
        raise NativeUnavailable(f"{' '.join(cc)} failed to build {SOURCE.name}: {errors[-1][0]}")
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{' '.join(cc)} could not run: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _user_suffix() -> str:
    """Each user builds and loads their own library (``-u<uid>``), so a cache shared between users (a cluster's
    ``$STABENCH_CACHE``) never makes one user load another's file."""
    return f"-u{os.getuid()}" if hasattr(os, "getuid") else ""


def check_private(path: Path) -> None:
    """NativeUnavailable unless the library at ``path`` and its folder belong to this user and only
    their owner may write them (a folder writable by others is allowed with its sticky bit, as /tmp): code that
    someone else could have written or swapped is never loaded."""
    if not hasattr(os, "getuid"):
        return
    for p, what in ((path, "file"), (path.parent, "folder")):
        st = p.stat()
        if st.st_uid != os.getuid():
            raise NativeUnavailable(f"the kernel's {what} {p} belongs to another user (uid {st.st_uid}): not loaded")
        if st.st_mode & 0o022 and not (what == "folder" and st.st_mode & stat.S_ISVTX):
            raise NativeUnavailable(f"the kernel's {what} {p} is writable by others (mode "
                                    f"{stat.S_IMODE(st.st_mode):o}): not loaded; run chmod go-w {shlex.quote(str(p))}")


class CappedKernel:
    """The loaded kernel: ``kernel(l, y, cap, grad, stats)`` on a chunk's raw logits l (n, V), fp32, C-contiguous,
    CPU, overwritten with σ = σ(2l/c) or, with ``grad``, with exp(lt − m)·σ(1 − σ), lt = c·tanh(l/c): row i is
    ``norm[i]`` times softmax(lt)·σ(1 − σ), the logit gradient / 4, one-hot term aside; y (n,) int64 targets.
    Runs on ``torch.get_num_threads()`` threads."""

    def __init__(self, path: Path):
        fn = ctypes.CDLL(str(path)).stabench_capped_rows
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i64, i64, p, ctypes.c_float, p, p, p, p, p, ctypes.c_int, ctypes.c_int]
        fn.restype = None
        self._fn, self.path = fn, path

    def __call__(self, l: torch.Tensor, y: torch.Tensor, cap: float, grad: bool, stats: bool) -> CappedRows:
        if not (l.dtype == torch.float32 and l.device.type == "cpu" and l.dim() == 2 and l.is_contiguous()):
            raise ValueError(f"the kernel takes contiguous fp32 CPU logits (n, V), got {l.dtype} {tuple(l.shape)} "
                             f"on {l.device}")
        n, V = l.shape
        y = y.to(torch.int64).contiguous()
        if y.shape != (n,) or (n and not bool(((y >= 0) & (y < V)).all())):
            raise ValueError(f"targets must be (n,) = ({n},) ints in [0, {V}), got shape {tuple(y.shape)}")
        lse, norm, lt_y = (torch.empty(n, dtype=torch.float64) for _ in range(3))
        s_y = torch.empty(n, dtype=torch.float32)
        st = torch.empty(n, 3, dtype=torch.float32) if stats else None
        if n:
            self._fn(l.data_ptr(), n, V, y.data_ptr(), float(cap), lse.data_ptr(), norm.data_ptr(), lt_y.data_ptr(),
                     s_y.data_ptr(), st.data_ptr() if st is not None else None, int(grad), torch.get_num_threads())
        return CappedRows(lse, norm, lt_y, s_y, st)


def reference(l: torch.Tensor, y: torch.Tensor, cap: float) -> tuple[CappedRows, torch.Tensor]:
    """What the kernel computes, in float64 PyTorch ops: its outputs and the gradient buffer."""
    l = l.double()
    s = torch.sigmoid(2 * l / cap)
    lt = cap * torch.tanh(l / cap)
    lse = torch.logsumexp(lt, -1)
    m = lt.amax(-1)
    norm = torch.where(lse.isnan(), 1.0, torch.exp(lse - m))
    stats = torch.stack([lt.sum(-1), lt.square().sum(-1), lt.abs().amax(-1)], -1)
    rows = CappedRows(lse, norm, lt.gather(1, y[:, None]).squeeze(1), s.gather(1, y[:, None]).squeeze(1), stats)
    return rows, torch.exp(lt - m[:, None]) * s * (1 - s)


def self_check(kernel: CappedKernel) -> None:
    """NativeUnavailable unless the kernel matches ``reference`` on a chunk of 7 rows × 1000 (a vector tail):
    logits from ±0 to ±6c, a row all at +∞ (capped: finite), a row with a NaN (NaN log Z and gradient, as
    PyTorch's passes give)."""
    gen = torch.Generator().manual_seed(0)
    cap = 5.0
    l = torch.randn(7, 1000, generator=gen) * torch.tensor([0.1, 1, 3, 10, 30, 1, 1])[:, None]
    l[5] = float("inf")
    l[6, 17] = float("nan")
    y = torch.randint(0, 1000, (7,), generator=gen)
    want, want_q = reference(l, y, cap)
    q = l.clone()
    got = kernel(q, y, cap, grad=True, stats=True)
    ok = all(torch.allclose(a.double(), b.double(), rtol=2e-5, atol=1e-5, equal_nan=True)
             for a, b in zip((*got, q), (*want, want_q)))
    if not ok:
        raise NativeUnavailable(f"the build {kernel.path.name} does not match PyTorch in float64")


def enabled() -> bool:
    """Whether the kernel is to be used where it builds (``STABENCH_NATIVE`` is not "0"); nothing is built."""
    return os.environ.get("STABENCH_NATIVE", "1") != "0"


@functools.cache
def capped_kernel() -> CappedKernel | None:
    """The kernel, built, loaded and checked once per process, or None (``STABENCH_NATIVE=0``, or why not on
    one stderr line): callers then take PyTorch's passes."""
    if not enabled():
        return None
    try:
        path = build()
        check_private(path)
        kernel = CappedKernel(path)
        self_check(kernel)
        return kernel
    except (NativeUnavailable, OSError, AttributeError) as e:
        print(f"stabench: the compiled soft-capping kernel is not available ({e}); the loss head takes "
              "PyTorch's passes", file=sys.stderr)
        return None
