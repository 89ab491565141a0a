"""What one training step needs in memory, and whether this machine has it (checked before training).

``estimate_step_bytes`` is a closed form from the config alone (nothing is allocated);
``check_memory`` refuses a config whose estimate exceeds the memory of the device it would
run on (``RunConfig.check``), so a vocabulary of 10⁹ or a sequence of 10⁸ is one line naming
the numbers instead of an out-of-memory traceback.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .model import count_params

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig

ACTIVATIONS_PER_LAYER_H = 16
"""H-wide values per token and block kept for the backward pass (LayerNorm in/out ×2, q k v,
normalized and rotated q k, attention output, projection, residuals)."""
ACTIVATIONS_PER_LAYER_F = 4
"""F-wide values per token and block (SwiGLU gate and up, the SiLU of the gate, their product)."""
LOGIT_COPIES = 3
"""Float32 (B, T, V) tensors alive at once in the unchunked head: the logits, their log-softmax
and its gradient."""
CHUNK_COPIES = 2
"""Float32 (chunk, V) tensors alive at once in the chunked head (``bench.head``): the logits and their
softmax, which becomes the gradient (measured: 25 MiB for a `micro` step in 256-token chunks, 16 of
them these two)."""
CHUNK_TRANSFORM_COPIES = 2
"""More of them under a logit transform (soft-capping) that runs through its own hooks: the transformed logits
and their slope. None where the head takes the transform's cap into its own passes (``head.fuses_cap``: the
compiled kernel works in the GEMM's buffer; the GEMM's epilogue path holds σ and the capped logits, which the
softmax overwrites: two, as without a transform)."""


def head_is_chunked(cfg: "RunConfig") -> bool:
    """Whether ``cfg``'s loss head runs in chunks: ``head_chunk`` > 0 and a stabilizer whose
    ``loss_term`` reads neither logits nor log Z (an unloadable spec counts as unchunked)."""
    if cfg.head_chunk <= 0:
        return False
    cls = _stabilizer_class(cfg)
    return cls is not None and cls.chunkable()


def _stabilizer_class(cfg: "RunConfig") -> type | None:
    """The class of ``cfg``'s stabilizer; None where the spec cannot be loaded (it is checked, with its own
    message, elsewhere)."""
    try:
        from .stabilizers import load_stabilizer_class
        return load_stabilizer_class(cfg.stabilizer)
    except Exception:  # noqa: BLE001 - any failure of the user's spec
        return None


def _caps_in_head(cfg: "RunConfig", cls: type) -> bool:
    """Whether ``cfg``'s chunked head takes its stabilizer's cap (``logit_cap``) into its own passes
    (``bench.head.fuses_cap``, asked without building the compiled kernel) rather than running the transform's
    hooks."""
    import torch

    from .config import machine_device
    from .gemm import for_run
    from .head import fuses_cap

    return (cls.has_hook("transform_logits") and cls.has_hook("logit_cap")
            and fuses_cap(cfg.resolved_precision, torch.device(machine_device(cfg.device)), for_run(cfg), build=False))


def head_bytes(cfg: "RunConfig", train: bool = True) -> int:
    """Bytes the loss head of one micro-batch holds at its peak (float32 logits-sized buffers,
    and for the chunked head's training pass its (V × H) and (N × H) gradients, and with oneDNN's
    products, ``bench.gemm``, a chunk's (H × V) addend)."""
    m = cfg.model_config()
    N = (cfg.micro_batch_size or cfg.batch_size) * cfg.seq_len
    V, H = m.vocab_size, m.n_embd
    if not head_is_chunked(cfg):
        return (LOGIT_COPIES if train else 2) * N * V * 4
    n = min(cfg.head_chunk, N)
    cls = _stabilizer_class(cfg)  # loadable: the head is chunked
    transforms = cls.has_hook("transform_logits") and not _caps_in_head(cfg, cls)
    copies = (CHUNK_COPIES + (CHUNK_TRANSFORM_COPIES if transforms else 0)
              + (cfg.resolved_precision in ("bf16", "bf16-emu")))  # bf16: the GEMM's output before fp32; emu: a rounding copy
    from .gemm import for_run
    onednn = train and for_run(cfg) == "onednn"  # its (H × V) product of a chunk, before it is added
    return copies * n * V * 4 + ((V + N) * H * 4 if train else 0) + (V * H * 4 if onednn else 0)


def _value_bytes(cfg: "RunConfig") -> tuple[int, int]:
    """Bytes per value of (parameters, gradients and AdamW moments; activations) in the run's precision,
    "auto" resolved as the run resolves it."""
    prec = cfg.resolved_precision
    return 8 if prec == "fp64" else 4, {"fp64": 8, "bf16": 2}.get(prec, 4)


def step_terms(cfg: "RunConfig") -> dict[str, int]:
    """The three terms of ``estimate_step_bytes`` (bytes): parameters and AdamW state,
    activations, logits."""
    m = cfg.model_config()
    P = count_params(m)
    s_p, s_a = _value_bytes(cfg)
    N = (cfg.micro_batch_size or cfg.batch_size) * cfg.seq_len  # tokens of one micro-batch
    H, F, L = m.n_embd, m.ffn_dim, m.n_layer
    return {"parameters and AdamW state": 4 * P * s_p,
            "activations": N * (L * (ACTIVATIONS_PER_LAYER_H * H + ACTIVATIONS_PER_LAYER_F * F) + 2 * H) * s_a,
            "logits": head_bytes(cfg)}


def estimate_step_bytes(cfg: "RunConfig") -> int:
    """Estimated peak memory of one training step of ``cfg``, in bytes.

    With P = ``count_params`` of the model (V vocabulary, H width, F = SwiGLU width, L layers),
    N = micro-batch × seq_len tokens, s_p = 8 bytes per parameter value for fp64 else 4, and
    s_a = bytes per activation value (8 fp64, 2 bf16, else 4)::

        bytes = 4·P·s_p                         weights, gradients, AdamW exp_avg and exp_avg_sq
              + N·(L·(16·H + 4·F) + 2·H)·s_a    activations saved for the backward pass
              + 3·N·V·4                         float32 logits, their log-softmax and its gradient
                  (chunked head, n = min(head_chunk, N): c·n·V·4 + (V + N)·H·4, c = 2, 4 under a
                   logit transform, one more in bf16 and bf16-emu; ``head_bytes``)

    Attention is counted as a fused kernel (no T×T scores), so this is a lower estimate of
    what the step needs: a config above the machine's memory cannot run. Measured on an H200 (bf16,
    16 × 2048 tokens, V = 50,304, 16M-221M): a step allocates 1.00-1.03× the estimate above the resident
    weights and moments eager, 0.77-0.90× compiled (results/perf/gpu-nvidia-h200*); on CPU see tests/test_memory.py.
    """
    return sum(step_terms(cfg).values())


def estimate_eval_bytes(cfg: "RunConfig") -> int:
    """Estimated peak memory of one evaluation forward pass of ``cfg`` (a micro-batch; no gradients),
    in bytes: the weights, one layer's activations and the head without its gradient buffers::

        bytes = P·s_p + N·(16·H + 4·F)·s_a + head_bytes(train=False)
    """
    m = cfg.model_config()
    P = count_params(m)
    s_p, s_a = _value_bytes(cfg)
    N = (cfg.micro_batch_size or cfg.batch_size) * cfg.seq_len
    H, F = m.n_embd, m.ffn_dim
    return P * s_p + N * (ACTIVATIONS_PER_LAYER_H * H + ACTIVATIONS_PER_LAYER_F * F) * s_a + head_bytes(cfg, train=False)


def measure_peak_bytes(fn, device: Any = "cpu") -> int | None:
    """Peak memory ``fn()`` allocates above what was in use when it started, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the allocation before. CPU: the
    peak of the bytes PyTorch's CPU allocator holds for tensors, followed through the profiler's
    allocation events (``profile_memory``): exact and the same on every call, whatever the C heap
    kept from earlier steps or other threads (the process's resident set, which this used to read,
    counted those too, and a long-lived process measured up to 2× the same step now and then).
    Where the profiler has no allocation events, the process's peak resident set (``VmHWM``,
    reset through ``/proc/self/clear_refs``, after ``malloc_trim``) minus its resident set before;
    None where neither is available.
    """
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    peak = _allocator_peak_bytes(fn)
    return peak if peak is not None else _rss_peak_bytes(fn)


def _allocator_peak_bytes(fn) -> int | None:
    """Runs ``fn()`` under the profiler and returns the peak of its CPU tensor bytes live at once
    (the running sum of its allocation events in time order); None, with ``fn`` not run, where the
    profiler cannot record them."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        with _stderr_to_devnull():  # libkineto prints two lines at start and stop
            prof.start()
    except Exception:  # noqa: BLE001 - a build without the profiler: fall back to the resident set
        return None
    try:
        fn()
    finally:
        with _stderr_to_devnull():
            prof.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 points at /dev/null inside the block (output written by C++ code)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _rss_peak_bytes(fn) -> int | None:
    """Peak resident set during ``fn()`` above the resident set before, in bytes; None off Linux."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
    except (OSError, AttributeError):
        return None
    fn()
    return _status_bytes("VmHWM") - before


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def fit_micro_batch(cfg: "RunConfig", budget_bytes: int) -> int | None:
    """The largest micro_batch_size (a divisor of batch_size) whose step estimate fits ``budget_bytes``;
    None when not even one sequence per pass does."""
    n = cfg.batch_size
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    for mb in sorted({*small, *(n // d for d in small)}, reverse=True):
        if estimate_step_bytes(cfg.replace(micro_batch_size=mb)) <= budget_bytes:
            return mb
    return None


def device_available(device: str) -> bool:
    """Whether ``device`` ('auto', 'cpu', 'cuda') can be used in this process."""
    if device != "cuda":
        return True
    import torch
    return torch.cuda.is_available()


def machine_bytes(device: str) -> tuple[int, str] | None:
    """(memory in bytes, its description) of the device ``device`` resolves to; None if unknown."""
    import torch

    from .config import machine_device
    if machine_device(device) == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"GPU memory ({props.name})"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "CPU memory"
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def format_gib(n: float) -> str:
    """Bytes as GiB for a message: ``1.5 GiB``."""
    return f"{n / 2**30:,.1f} GiB"


def check_memory(cfg: "RunConfig", source: str | None = None) -> None:
    """Raise ConfigError when one step of ``cfg`` needs more than its device's memory."""
    have = machine_bytes(cfg.device)
    if have is None:
        return
    total, what = have
    terms = step_terms(cfg)
    need = sum(terms.values())
    if need <= total:
        return
    largest = max(terms, key=terms.get)
    key = {"logits": "vocab_size", "activations": "seq_len"}.get(largest, "model")
    parts = ", ".join(f"{k} {format_gib(v)}" for k, v in terms.items())
    mb = cfg.micro_batch_size or cfg.batch_size
    fits = fit_micro_batch(cfg, total)
    if fits is not None:
        raise ConfigError("micro_batch_size", f"one training step needs about {format_gib(need)} ({parts}; "
                          f"micro-batch {mb} × seq_len {cfg.seq_len}), more than this machine's "
                          f"{format_gib(total)} of {what}; "
                          f"micro_batch_size = {fits} fits (the largest divisor of batch_size {cfg.batch_size} "
                          "that does, by bench.memory)", source)
    raise ConfigError(key, f"one training step needs about {format_gib(need)} ({parts}; model {cfg.model!r}, "
                      f"micro-batch {mb} × seq_len {cfg.seq_len} × vocab_size {cfg.vocab_size}), more than "
                      f"this machine's {format_gib(total)} of {what}; lower vocab_size, seq_len, batch_size "
                      "(or set micro_batch_size) or use a smaller model", source)
