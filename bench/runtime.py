"""Process-level speed settings: allocator tuning and intra-op threads.

Small-model training allocates and frees the same large activation buffers every
step. glibc's malloc serves blocks above 128 KiB with mmap/munmap and trims the heap
eagerly, so each step pays page faults for memory it just returned (measured: a
`micro` step 57 → 39 ms on 2 cores). ``tune_allocator`` keeps freed memory in the heap
(mallopt: no mmap for large blocks, no trimming, 256 MiB top pad). It is a no-op where
glibc's mallopt is unavailable (macOS, musl) or when another allocator is preloaded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
_tuned = False


def tune_allocator() -> bool:
    """Apply the glibc malloc settings once per process; True if they were applied."""
    global _tuned
    if _tuned or os.environ.get("STABENCH_MALLOC", "tuned") == "default":
        return _tuned
    if "jemalloc" in os.environ.get("LD_PRELOAD", "") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20)))
    _tuned = ok
    return ok


def set_threads(n: int | None) -> int:
    """Intra-op threads for this process (None: leave torch's default); returns the number in use."""
    if n:
        torch.set_num_threads(n)
        # inter-op parallelism only oversubscribes the cores for models this small
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    return torch.get_num_threads()


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (the study allows it); nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
