"""Which library multiplies a CPU step's fp32 matrices: ATen's ``mm`` or oneDNN's matmul.

PyTorch's CPU builds for x86-64 do fp32 ``mm`` / ``linear`` in MKL. On AMD processors MKL takes its
AVX2 code path even where the CPU has AVX-512: measured on a 2-core AMD EPYC with AVX-512, fp32
products ran at ~200 GFLOP/s in MKL and at ~455 in oneDNN (which PyTorch also bundles and which
dispatches on the CPU's instruction sets, not its vendor), 2.0-2.4× faster for the loss head's
(256 × 64)·(64 × 8192) products. ``RunConfig.cpu_gemm`` chooses:

- ``aten``: ``torch.mm`` and ``F.linear`` (MKL on x86-64): the kernels of every run recorded before
  the setting existed (``config.upgrade_stored``), so re-running a committed result keeps its bits.
- ``onednn``: oneDNN's fp32 matmul (``torch.ops.mkldnn._linear_pointwise``) for the model's linear
  layers, forward and backward, and the loss head's products (``bench.head``), on CPU. Products in other
  dtypes (fp64, and bf16 under autocast, which PyTorch already runs in oneDNN), on CUDA, inside a
  precision emulation mode (``bf16-emu``'s ``BF16Rounding`` sees ``F.linear``) and in compiled
  graphs stay ATen's. Same arithmetic up to the order of the sums, so up to rounding; deterministic
  on a given machine (bit for bit from call to call, tests/test_gemm.py).
- ``auto`` (default): ``onednn`` where this PyTorch has it on an x86-64 CPU, else ``aten``.
"""
from __future__ import annotations

import functools
import platform

import torch

@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch can multiply fp32 matrices in oneDNN here: x86-64, oneDNN built in, its
    matmul op present, and a small product through it equal to ATen's within fp32 rounding."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        a, w = torch.randn(8, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
        got = op(a.float(), w.float(), None, "none", [], "").double()
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(got, a @ w.T, rtol=1e-5, atol=1e-5))


def resolve(setting: str, device: torch.device) -> str:
    """The library ``setting`` ("auto", "aten", "onednn") means for a run on ``device``: "aten" or
    "onednn" ("onednn" only on CPU: a CUDA run's products are cuBLAS's whatever the setting)."""
    if device.type != "cpu":
        return "aten"
    if setting == "auto":
        return "onednn" if onednn_available() else "aten"
    return setting


def for_run(cfg) -> str:
    """The library a single run of ``cfg`` (a RunConfig) multiplies in: "aten" when it compiles (inductor
    chooses a compiled graph's kernels), else ``resolve(cfg.cpu_gemm, its device)``."""
    from .config import machine_device

    return "aten" if cfg.compile else resolve(cfg.cpu_gemm, torch.device(machine_device(cfg.device)))


def onednn_takes(*ts: torch.Tensor) -> bool:
    """Whether oneDNN takes these operands: fp32 CPU tensors, outside any torch-function mode (a precision
    emulation rounds what ``F.linear`` / ``torch.mm`` receive and return) and outside autocast."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
            and not torch._C._is_torch_function_mode_enabled()
            and not torch.is_autocast_enabled("cpu"))


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, post: str = "none") -> torch.Tensor:
    """x·wᵀ in oneDNN: x (..., in), w (out, in), either may be a strided view; ``post`` an elementwise
    function its epilogue applies to the result ("none", "sigmoid")."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, post, [], "")


@functools.cache
def sigmoid_epilogue_available() -> bool:
    """Whether oneDNN here applies a sigmoid to its product's result as it writes it (``sigmoid_mm``): the
    op takes the "sigmoid" post-op and a small product through it equals σ of ATen's within fp32 rounding."""
    if not onednn_available():
        return False
    a, w = torch.randn(8, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    try:
        got = torch.ops.mkldnn._linear_pointwise(a.float(), w.float(), None, "sigmoid", [], "").double()
    except RuntimeError:
        return False
    return bool(torch.allclose(got, torch.sigmoid(a @ w.T), rtol=1e-5, atol=1e-6))


def sigmoid_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """σ(a·b), a (m, k), b (k, n), fp32 CPU tensors that oneDNN takes (``onednn_takes``), in one oneDNN matmul
    whose epilogue applies the sigmoid as it writes the (m, n) result: no pass of its own over it (the
    loss head's soft-capping, ``bench.head``). Callers check ``sigmoid_epilogue_available`` first."""
    return _onednn_linear(a, b.T, "sigmoid")


def mm(a: torch.Tensor, b: torch.Tensor, library: str) -> torch.Tensor:
    """a·b, a (m, k), b (k, n), in a fresh (m, n) tensor: oneDNN's where ``library`` is "onednn" and the
    operands fit (``onednn_takes``), else ATen's. Not differentiable through oneDNN (the head forms its own
    gradients)."""
    if library == "onednn" and onednn_takes(a, b):
        return _onednn_linear(a, b.T)
    return a @ b


class _Linear(torch.autograd.Function):
    """x·Wᵀ with its gradients x̄ = ḡ·W and W̄ = ḡᵀ·x, every product in oneDNN."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _onednn_linear(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gx = _onednn_linear(g, w.T) if ctx.needs_input_grad[0] else None  # (..., in)
        gw = _onednn_linear(g2.T, x.reshape(-1, x.shape[-1]).T) if ctx.needs_input_grad[1] else None  # (out, in)
        return gx, gw


def linear(x: torch.Tensor, w: torch.Tensor, library: str) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias), through oneDNN forward and backward where ``library`` is "onednn"
    and the operands fit (``onednn_takes``), else ``F.linear`` itself."""
    if library == "onednn" and onednn_takes(x, w):
        return _Linear.apply(x, w)
    return torch.nn.functional.linear(x, w)
