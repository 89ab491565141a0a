"""The loss head in chunks of tokens: E·h, the logit transform, cross-entropy and log Z, and
their gradients, without ever holding the (N × V) logits of all N tokens.

``chunked_head(h, E, y, ...)`` returns one differentiable scalar, mean cross-entropy + mean
per-token penalty on log Z, plus detached by-products (the cross-entropy, the penalty, log Z per
token and the logit statistics). For each chunk of ``chunk`` tokens it computes the logits
(chunk × V), applies ``transform`` (elementwise, e.g. soft-capping), the cross-entropy and log Z,
the penalty, and — when gradients are wanted — the gradient of the chunk's share of the loss
with respect to its logits, which it turns at once into the chunk's rows of ∂/∂h (= g·E) and
its addend of ∂/∂E (= gᵀ·h). So the head needs one chunk's logits and the (V × H) gradient of E,
not B·T × V logits, their log-softmax and their gradient (``bench.memory``), and does the same
three GEMMs as the unchunked head. The gradients are formed in the forward pass (the loss is the
last node of the graph; backward only scales them by the incoming scalar), as in Liger-Kernel's
fused linear cross-entropy. In fp32 and fp64 on CPU the gradient's per-token scaling and its one-hot term
go to the GEMMs' (n × H) sides (``FoldedGrad``): the softmax is the only pass over a chunk's logits
that the gradient adds (a transform's slope adds one multiplication). Soft-capping with its cap
(``Stabilizer.logit_cap``), where the products are oneDNN's, is fused further: stabench's compiled kernel
(``bench.native``) takes each chunk's logits through c·tanh(l/c), its softmax and its slope in one call
(``_native_capped_chunk``); without it, the logit GEMM's epilogue writes σ(2l/c), c·tanh(l/c) = 2c·σ − c is
one pass and the slope 4σ(1 − σ) one more (``_capped_chunk``). Either against the seven passes of the
transform's own ``transform_logits_with_slope`` (which ATen's products keep: the bits of the committed results).

Precision: the head runs outside the model's autocast / emulation context and applies the run's
precision to its own GEMMs, as autocast or ``bench.precision.BF16Rounding`` would to the
unchunked ``lm_head``: ``bf16`` multiplies bf16 copies of h and E (fp32 accumulation) and raises
the logits to fp32; ``bf16-emu`` rounds h, E, the logits, the logit gradient and the two GEMM
results to bf16 values; ``fp32`` and ``fp64`` compute as written.

What does not fit in it (a ``loss_term`` that reads the full logits or log Z) keeps the unchunked
head (``train_module.stabilized_loss``; a pack's, ``bench.pack.step``, likewise).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .config import DEFAULT_HEAD_CHUNK
from .gemm import mm, onednn_takes, sigmoid_epilogue_available, sigmoid_mm
from .native import CappedKernel, capped_kernel
from .native import enabled as native_enabled
from .precision import bf16_round

Transform = Callable[[torch.Tensor], torch.Tensor]
SlopeTransform = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""raw (n, V) -> (f(raw), f′(raw)): an elementwise transform and its derivative (``transform_logits_with_slope``)."""
TokenLoss = Callable[[torch.Tensor], torch.Tensor]
EmbeddingTerm = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""E (V, H) -> (a scalar loss of E, its gradient broadcastable to (V, H)): a ``loss_term_with_grad``."""

DEFAULT_CHUNK = DEFAULT_HEAD_CHUNK  # tokens; 256 × V fp32 logits are 8 MiB at V = 8192, 49 MiB at 50,304


def _gemm_operands(precision: str, h: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h, E as the head's GEMMs read them in ``precision``."""
    if precision == "bf16":
        return h.to(torch.bfloat16), E.to(torch.bfloat16)
    if precision == "bf16-emu":
        return bf16_round(h), bf16_round(E)
    return h, E


def _out(precision: str, t: torch.Tensor) -> torch.Tensor:
    """A GEMM result as the unchunked head would see it in ``precision`` (bf16-valued for bf16-emu)."""
    return bf16_round(t) if precision == "bf16-emu" else t


def logit_stats(lt: torch.Tensor) -> torch.Tensor:
    """float64 (3,) [Σ l, Σ l², max |l|] of logits ``lt`` (n, V), without a logits-sized temporary:
    per-row sums in the logits' dtype (V terms each), accumulated over rows in float64."""
    lt = lt.detach()
    lo, hi = torch.aminmax(lt)
    return torch.stack([lt.sum(dim=-1).double().sum(), torch.linalg.vector_norm(lt, dim=-1).double().square().sum(),
                        torch.maximum(-lo, hi).double()])


def logits(h: torch.Tensor, E: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """The logits E·h of hidden states h (n, H) in ``precision``, raised to (at least) fp32: (n, V)."""
    hc, Ec = _gemm_operands(precision, h, E)
    acc = torch.float64 if E.dtype == torch.float64 else torch.float32
    return _out(precision, hc @ Ec.T).to(acc)


def _identity_with_slope(raw: torch.Tensor):
    return raw, 1.0


def _reduce(f, raw: torch.Tensor, y: torch.Tensor):
    """log Z and the target's logit, (n,) each, and the row statistics [Σ l, Σ l², max |l|], (n, 3), of
    l = f(raw): raw (n, V) in the GEMM's dtype, raised to float32 as it is read. Without a transform l is raw."""
    lt, _ = f(raw.float())
    m = lt.amax(-1, keepdim=True)
    lse = (m + torch.exp(lt - m).sum(-1, keepdim=True).log()).squeeze(-1)
    lt_y = lt.gather(1, y.unsqueeze(1)).squeeze(1)
    return lse, lt_y, torch.stack([lt.sum(-1), (lt * lt).sum(-1), lt.abs().amax(-1)], -1)


def _grad(f, raw: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, inv_n: float,
          dtype: torch.dtype):
    """∂loss/∂raw = (softmax(l)·a − onehot(y)/N)·f′(raw) in ``dtype``; a = (1 + ∂pen/∂lse)/N per token.
    l = f(raw) and f′(raw) are computed again from raw (n, V) rather than read from a buffer of their own:
    in a fused kernel that costs arithmetic, where a buffer would cost two more passes over memory."""
    lt, slope = f(raw.float())
    onehot = torch.arange(lt.shape[1], device=lt.device).unsqueeze(0) == y.unsqueeze(1)
    return ((torch.exp(lt - lse.unsqueeze(1)) * a.unsqueeze(1) - onehot * inv_n) * slope).to(dtype)


class FusedKernels:
    """The chunk's elementwise work in two ``torch.compile``'d passes over its logits — a reduction pass
    (log Z, the target logit, statistics) and a gradient pass —, the transform and its slope fused into
    both: ``transform_with_slope(raw) -> (f(raw), f′(raw))`` (elementwise), or None for no transform.
    The logits are read in the GEMM's dtype (bf16 in bf16 runs: raised to float32 as they are read, not by
    a pass of their own) and the gradient is written in the dtype of the GEMMs that consume it, so a chunk's
    logits cross memory four times (written by the GEMM, read by each pass, the gradient written once)
    plus the two GEMMs' reads of the gradient. Where compiling fails (no C++ compiler), it says so once on
    stderr and the head runs unfused."""

    def __init__(self, transform_with_slope=None):
        import functools
        f = transform_with_slope or _identity_with_slope
        self.reduce = torch.compile(functools.partial(_reduce, f), dynamic=None)
        self.grad = torch.compile(functools.partial(_grad, f), dynamic=None)
        self.failed = False

    def run(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - torch.compile's failures have many types
            import sys
            print(f"stabench: the fused loss head could not be compiled ({type(e).__name__}: {str(e)[:200]}); "
                  "running it unfused", file=sys.stderr)
            self.failed = True
            return None


def fuses_cap(precision: str, device: torch.device, lib: str, build: bool = True) -> bool:
    """Whether a head of ``precision`` on ``device`` whose products are ``lib``'s takes a transform's cap
    (``Stabilizer.logit_cap``) into its own passes: fp32 on CPU in oneDNN, through the compiled kernel
    (``_native_capped_chunk``) or, without it, the logit GEMM's sigmoid epilogue (``_capped_chunk``); elsewhere
    the transform's own hooks run. ``build=False`` answers without building the kernel (a memory estimate),
    counting it as there unless turned off (``bench.native.enabled``)."""
    if not (precision == "fp32" and device.type == "cpu" and lib == "onednn"):
        return False
    kernel = capped_kernel() is not None if build else native_enabled()
    return kernel or sigmoid_epilogue_available()


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, E, y, chunk: int, transform, token_loss, precision: str, want_grad: bool, want_stats: bool,
                fused: "FusedKernels | None" = None, with_slope: "SlopeTransform | None" = None,
                e_term: "EmbeddingTerm | None" = None, lib: str = "aten", cap: float | None = None):
        N = h.shape[0]
        hc, Ec = _gemm_operands(precision, h.detach(), E.detach())
        acc = torch.float64 if E.dtype == torch.float64 else torch.float32
        ce_sum = torch.zeros((), dtype=acc, device=h.device)
        pen_sum = torch.zeros((), dtype=acc, device=h.device)
        stats = torch.zeros(3, dtype=torch.float64, device=h.device)  # Σ l, Σ l², max |l|
        lse_all = torch.empty(N, dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if want_grad else None
        # ∂/∂E accumulated transposed, (H, V), and transposed back once, in backward: MKL forms hᵀ·g
        # faster than gᵀ·h (3.0 vs 6.5 ms at 512 tokens, H = 64, V = 8192, one thread; bit-equal there).
        # The first chunk's GEMM writes it, later ones accumulate into it (no zero fill, no temporary).
        grad_Et = torch.empty(E.shape[::-1], dtype=acc, device=E.device) if want_grad else None
        # the folded gradient (FoldedGrad): fp32/fp64 on CPU. bf16 modes round the explicit logit gradient, as
        # autocast would; on CUDA its index_add would be atomic (duplicate targets: run-to-run rounding noise)
        fold = precision in ("fp32", "fp64") and h.device.type == "cpu"
        # soft-capping by its cap (``Stabilizer.logit_cap``) where oneDNN multiplies: the compiled kernel, else
        # σ(2l/c) from the GEMM's epilogue
        capped = cap is not None and fuses_cap(precision, h.device, lib) and onednn_takes(hc, Ec)
        kernel = capped_kernel() if capped else None
        h_capped = hc * (2 / cap) if capped and kernel is None else None  # (N, H): the epilogue's sigmoid takes 2l/c
        for start in range(0, N, chunk):
            sl = slice(start, min(start + chunk, N))
            if kernel is not None:
                done = _native_capped_chunk(kernel, mm(hc[sl], Ec.T, lib), y[sl], cap, token_loss, N, want_grad,
                                            want_stats)
                raw = None
            elif capped:
                done = _capped_chunk(sigmoid_mm(h_capped[sl], Ec.T), y[sl], cap, token_loss, N, want_grad, want_stats)
                raw = None
            else:
                raw = _out(precision, mm(hc[sl], Ec.T, lib))  # (n, V) logits of this chunk, in the GEMM's dtype
                done = None
            if fused is not None and not capped and not fused.failed and acc == torch.float32:
                # the gradient in the dtype its GEMMs read (bf16 in bf16 runs), written so by the kernel
                g_dtype = hc.dtype if precision == "bf16" else acc
                done = fused.run(_fused_chunk, fused, raw, y[sl], token_loss, N, want_grad, g_dtype)
            if done is None:
                done = _eager_chunk(raw.to(acc), y[sl], transform, with_slope, token_loss, N, want_grad, want_stats,
                                    fold, raw_rows=lambda rows, sl=sl: mm(hc[sl][rows], Ec.T, lib).to(acc))
            lse, ce_c, pen_c, st, g = done
            del raw, done
            ce_sum += ce_c
            pen_sum += pen_c
            lse_all[sl] = lse
            if want_stats:
                stats[:2] += st[:2]
                stats[2] = torch.maximum(stats[2], st[2])
            if isinstance(g, FoldedGrad):
                _apply_folded(g, hc[sl], Ec, y[sl], grad_h[sl], grad_Et, first=start == 0, lib=lib)
            elif g is not None:
                g = _out(precision, g).to(hc.dtype)
                grad_h[sl] = _out(precision, mm(g, Ec, lib)).to(h.dtype)  # (n, H)
                if g.dtype != acc or lib != "aten":  # a product (bf16 in bf16 runs), accumulated in fp32
                    part = mm(hc[sl].T, g, lib)
                    if start == 0:
                        grad_Et.copy_(part)
                    else:
                        grad_Et.add_(part)
                    del part
                elif start == 0:
                    torch.mm(hc[sl].T, g, out=grad_Et)  # (H, V)
                else:
                    grad_Et.addmm_(hc[sl].T, g)
            del g  # freed before the next chunk's logits: one chunk alive at a time
        total, pen = (ce_sum + pen_sum) / N, pen_sum / N
        term_grad = None
        if e_term is not None:  # a loss of E alone: its value here, its gradient added to E's in backward
            term, term_grad = e_term(E.detach())
            total, pen = total + term, pen + term
        if want_grad:
            ctx.save_for_backward(grad_h, _out(precision, grad_Et))
            ctx.E_dtype, ctx.term_grad = E.dtype, term_grad
        ctx.mark_non_differentiable(lse_all, stats)
        return total, ce_sum / N, pen, lse_all, stats

    @staticmethod
    def backward(ctx, g_total, *_):
        grad_h, grad_Et = ctx.saved_tensors
        # (H, V) → (V, H), scaled by the incoming scalar and cast to E's dtype in one pass
        grad_E = torch.empty(grad_Et.shape[::-1], dtype=ctx.E_dtype, device=grad_Et.device)
        torch.mul(grad_Et.T, g_total, out=grad_E)
        if ctx.term_grad is not None:  # the E term's gradient, (1, H) or (V, H), scaled as the head's
            grad_E.add_(ctx.term_grad * g_total)
        return g_total * grad_h, grad_E, None, None, None, None, None, None, None, None, None, None, None, None


class FoldedGrad(NamedTuple):
    """A chunk's ∂loss/∂raw in factored form, g = diag(row)·q − diag(target)·onehot(y), so that its
    (n × V) scaling and its one-hot term are applied to the (n × H) sides of the two GEMMs instead of
    costing passes over the logits. q (n, V): softmax(l), times f′(raw) under a transform; row (n,):
    (1 + ∂pen/∂lse)/N; target (n,): f′(raw) at the target, /N. Without a token loss row is the number
    1/N and target None: the one-hot term is already in q (q[i, y_i] −= f′ at the target, n entries
    written), so g = q/N; with a token loss likewise, q[i, y_i] −= f′/(1 + ∂pen/∂lse) (target None), where
    every 1 + ∂pen/∂lse of the chunk is finite and nonzero."""
    q: torch.Tensor
    row: torch.Tensor | float
    target: torch.Tensor | None


def _apply_folded(g: FoldedGrad, hc: torch.Tensor, Ec: torch.Tensor, y: torch.Tensor, grad_h: torch.Tensor,
                  grad_Et: torch.Tensor, first: bool, lib: str = "aten") -> None:
    """Writes the chunk's ∂/∂h = diag(row)·q·E − diag(target)·E[y] into ``grad_h`` (n, H) and adds its
    ∂/∂Eᵀ = (diag(row)·h)ᵀ·q − (the rows target·h, added into the columns y) to ``grad_Et`` (H, V)
    (written instead of added for the first chunk); the products in ``lib`` (``bench.gemm``)."""
    row = g.row if isinstance(g.row, float) else g.row.unsqueeze(1)
    h_row = hc * row
    if lib == "aten":
        torch.mm(g.q, Ec, out=grad_h)
        grad_h.mul_(row)
        if first:
            torch.mm(h_row.T, g.q, out=grad_Et)
        else:
            grad_Et.addmm_(h_row.T, g.q)
    else:  # a library without out= / accumulation: its products, then one pass each over (n, H) and (H, V)
        torch.mul(mm(g.q, Ec, lib), row, out=grad_h)
        part = mm(h_row.T, g.q, lib)
        grad_Et.copy_(part) if first else grad_Et.add_(part)
        del part
    if g.target is not None:
        grad_h.sub_(Ec.index_select(0, y) * g.target.unsqueeze(1))
        grad_Et.index_add_(1, y, (hc * g.target.unsqueeze(1)).T, alpha=-1)


def _penalty(token_loss: TokenLoss | None, lse: torch.Tensor, want_grad: bool):
    """Σ token_loss(lse) over a chunk's tokens (a detached scalar) and ∂penalty/∂lse per token (None
    without a token loss or a gradient)."""
    if token_loss is None:
        return torch.zeros((), dtype=lse.dtype, device=lse.device), None
    with torch.enable_grad():
        lse_r = lse.detach().requires_grad_(want_grad)
        pen = token_loss(lse_r).sum()
    slope = torch.autograd.grad(pen, lse_r)[0] if want_grad else None
    return pen.detach(), slope


P_TARGET_FLOOR = 1e-30
"""Below this softmax probability of the target (a cross-entropy above 69 nats) −log p loses digits
to fp32's subnormals and 0; such tokens take log Z from ``logsumexp`` instead."""


def _ce_and_lse(p: torch.Tensor, yc: torch.Tensor, lt_y: torch.Tensor,
                logits_of_rows: Callable[[torch.Tensor | slice], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy −log p[y] and log Z = l[y] + ce per token, (n,) each, from the softmax p (n, V) of the
    logits, the targets yc (n, 1) and their logits lt_y (n,). A token whose p[y] is below ``P_TARGET_FLOOR``
    (a diverging run's) gets log Z by ``logsumexp`` over its row of logits, ``logits_of_rows(rows)`` (k, V),
    so neither is ever inf from an underflow.

    On CPU only those rows are formed (a CPU has no queue to stall); elsewhere every row's
    ``logsumexp`` is formed and selected, which keeps the device free of host syncs and costs the
    two passes that a log-softmax formulation would have spent anyway."""
    p_y = p.gather(1, yc).squeeze(1)
    tiny = p_y < P_TARGET_FLOOR
    ce = p_y.log().neg_()
    if p.device.type != "cpu":
        ce = torch.where(tiny, torch.logsumexp(logits_of_rows(slice(None)), dim=-1) - lt_y, ce)
    elif bool(tiny.any()):  # rare
        rows = tiny.nonzero().squeeze(1)
        ce[rows] = torch.logsumexp(logits_of_rows(rows), dim=-1) - lt_y[rows]
    return ce, lt_y + ce


def _eager_chunk(raw, y, transform, with_slope, token_loss, N: int, want_grad: bool, want_stats: bool,
                 fold: bool = False, raw_rows: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """One chunk of raw logits (n, V) in plain tensor ops: (lse (n,), Σ ce, Σ penalty, stats (3,) or
    None, ∂loss/∂raw (n, V) or None). The transform goes through its slope when ``with_slope`` is
    given, else through autograd. With ``fold`` (and no transform, or one with a slope) the gradient
    comes as a ``FoldedGrad``: its scaling and one-hot term are left to the GEMMs' small sides. Without a
    transform, given ``raw_rows`` (rows -> those rows of raw formed again, (k, V)) and ``fold``, the softmax
    overwrites raw (the caller's own buffer) in place: the same bits, ~0.2 ms faster per 256 × 8192 logits
    than into a fresh buffer on a 2-core EPYC; a rare row whose logits are needed again is formed again."""
    yc = y.unsqueeze(1)
    dlt = None  # f′(raw), when the transform gives its slope
    if with_slope is not None:  # f(raw) and f′(raw) in plain tensor ops: no autograd graph
        lt, dlt = with_slope(raw)
    elif transform is not None:
        with torch.enable_grad():
            raw.requires_grad_(want_grad)
            lt = transform(raw)
    else:
        lt = raw
    lt_ = lt.detach()
    st = logit_stats(lt_) if want_stats else None
    lt_y = lt_.gather(1, yc).squeeze(1)
    if fold and transform is None and raw_rows is not None:  # (n, V): one exp pass, into raw's buffer
        p, logits_of_rows = torch._softmax(lt_, -1, False, out=lt_), raw_rows
    else:  # (n, V): one exp pass, and the gradient's buffer
        p, logits_of_rows = torch.softmax(lt_, dim=-1), (lambda rows: lt_[rows])
    ce, lse = _ce_and_lse(p, yc, lt_y, logits_of_rows)
    pen_sum, slope = _penalty(token_loss, lse, want_grad)  # slope: ∂penalty/∂lse per token
    if not want_grad:
        return lse, ce.sum(), pen_sum, st, None
    if fold and (dlt is not None or transform is None):
        at_target = dlt.gather(1, yc) if dlt is not None else torch.ones_like(yc, dtype=p.dtype)  # f′ at y, (n, 1)
        q = p.mul_(dlt) if dlt is not None else p
        return lse, ce.sum(), pen_sum, st, _folded(q, at_target, slope, yc, N)
    # ∂(ce + penalty)/∂l = softmax(l)·(1 + ∂pen/∂lse) − onehot(y); the mean over N tokens: / N
    g = p
    g.mul_(((1 + slope) / N).unsqueeze(1) if slope is not None else 1.0 / N)
    g.scatter_add_(1, yc, torch.full_like(ce, -1.0 / N).unsqueeze(1))
    if dlt is not None:
        g.mul_(dlt)  # chain rule through the elementwise transform: ∂/∂raw = ∂/∂l · f′(raw)
    elif transform is not None:
        (g,) = torch.autograd.grad(lt, raw, g)  # through the elementwise transform
    return lse, ce.sum(), pen_sum, st, g


def _folded(q: torch.Tensor, at_target: torch.Tensor, slope: torch.Tensor | None, yc: torch.Tensor, N: int,
            scale: float = 1.0, norm: torch.Tensor | None = None) -> FoldedGrad:
    """A chunk's gradient as a ``FoldedGrad`` from q = softmax(l)·f′(raw)/scale (n, V; written in place),
    f′ at the targets /scale, at_target (n, 1; written in place), the targets yc (n, 1) and ∂pen/∂lse per token
    (n,) or None: the gradient is scale·(q − at_target·onehot(y))/N per row, times 1 + ∂pen/∂lse. With ``norm``
    (n,), q's row i is norm_i times that, and the row factor divides it out."""
    if slope is None:  # every row scaled by scale/N
        row, joins = scale / N, True
    else:  # row i of the gradient is scale·a_i/N · (q_i − f′_i/(scale·a_i) · onehot(y_i)), a = 1 + ∂pen/∂lse
        a = 1 + slope
        row, joins = a * scale / N, bool((a.isfinite() & (a != 0)).all())
        if joins:
            at_target.div_(a.unsqueeze(1))
    if norm is not None:
        row = row / norm
    if joins:  # the one-hot term joins q (n entries), scaled as q's row
        if norm is not None:
            at_target.mul_(norm.unsqueeze(1))
        return FoldedGrad(q.scatter_add_(1, yc, at_target.neg_()), row, None)
    return FoldedGrad(q, row, at_target.squeeze(1) * scale / N)


def _capped_chunk(s: torch.Tensor, y: torch.Tensor, cap: float, token_loss, N: int, want_grad: bool,
                  want_stats: bool):
    """One chunk soft-capped at ``cap`` from s = σ(2·raw/c) (n, V), fp32, as ``sigmoid_mm`` writes it: the
    ``_eager_chunk`` of the transform c·tanh(raw/c) = 2c·s − c, whose slope 1 − tanh² = 4s(1 − s) reaches the
    softmax's buffer by one ``sigmoid_backward`` pass (p·s(1 − s)) and the factor 4 the GEMMs' small sides
    (``FoldedGrad.row``). Two passes over the logits beyond an uncapped chunk's (the transform, the slope),
    where the transform's own hooks take seven; the same values up to rounding (tests/test_gemm.py). The
    softmax overwrites the capped logits in place: a row they are needed again for (a target probability
    below ``P_TARGET_FLOOR``) is formed again from s."""
    yc = y.unsqueeze(1)
    neg_cap = s.new_full((), -cap)
    lt = torch.add(neg_cap, s, alpha=2 * cap)  # c·tanh(raw/c), one pass
    st = logit_stats(lt) if want_stats else None
    lt_y = lt.gather(1, yc).squeeze(1)
    p = torch._softmax(lt, -1, False, out=lt)  # in lt's own buffer (the same bits; a fresh one is slower)
    ce, lse = _ce_and_lse(p, yc, lt_y, lambda rows: torch.add(neg_cap, s[rows], alpha=2 * cap))
    pen_sum, slope = _penalty(token_loss, lse, want_grad)
    if not want_grad:
        return lse, ce.sum(), pen_sum, st, None
    s_y = s.gather(1, yc)
    q = torch.ops.aten.sigmoid_backward.grad_input(p, s, grad_input=p)  # p·s(1 − s) = p·f′/4, in place
    return lse, ce.sum(), pen_sum, st, _folded(q, s_y * (1 - s_y), slope, yc, N, scale=4.0)


def _native_capped_chunk(kernel: CappedKernel, raw: torch.Tensor, y: torch.Tensor, cap: float, token_loss, N: int,
                         want_grad: bool, want_stats: bool):
    """One chunk soft-capped at ``cap`` by the compiled kernel (``bench.native``) from its raw logits (n, V),
    fp32, the GEMM's own buffer: log Z, the target's capped logit and (with ``want_grad``) the gradient with
    respect to raw up to a factor per row, in that buffer, in one call; that factor, the slope's 4 and the
    one-hot term go to the GEMMs' small sides (``_folded``). The cross-entropy is log Z − l[y] in float64:
    finite for any target, however far below its row's top (no probability to underflow)."""
    yc = y.unsqueeze(1)
    rows = kernel(raw, y, cap, grad=want_grad, stats=want_stats)
    lse = rows.lse.to(torch.float32)
    ce_sum = (rows.lse - rows.lt_y).sum().to(torch.float32)
    st = None
    if want_stats:  # per-row sums in float32, as logit_stats sums a row, accumulated over rows in float64
        st = torch.stack([rows.stats[:, 0].double().sum(), rows.stats[:, 1].double().sum(),
                          rows.stats[:, 2].max().double()])
    pen_sum, slope = _penalty(token_loss, lse, want_grad)
    if not want_grad:
        return lse, ce_sum, pen_sum, st, None
    s_y = rows.s_y.unsqueeze(1)
    return lse, ce_sum, pen_sum, st, _folded(raw, s_y * (1 - s_y), slope, yc, N, scale=4.0,
                                             norm=rows.norm.to(torch.float32))


def _fused_chunk(fused: FusedKernels, raw, y, token_loss, N: int, want_grad: bool, g_dtype: torch.dtype):
    """One chunk through the compiled kernels, raw (n, V) in the GEMM's dtype: (lse, Σ ce, Σ penalty,
    stats (3,), gradient in ``g_dtype`` or None)."""
    lse, lt_y, rows = fused.reduce(raw, y)
    pen_sum, slope = _penalty(token_loss, lse, want_grad)
    st = torch.stack([rows[:, 0].double().sum(), rows[:, 1].double().sum(), rows[:, 2].max().double()])
    g = None
    if want_grad:
        a = (1 + slope) / N if slope is not None else torch.full_like(lse, 1.0 / N)
        g = fused.grad(raw, y, lse, a, 1.0 / N, g_dtype)
    return lse, (lse - lt_y).sum(), pen_sum, st, g


def chunked_head(h: torch.Tensor, E: torch.Tensor, y: torch.Tensor, *, chunk: int = DEFAULT_CHUNK,
                 transform: Transform | None = None, token_loss: TokenLoss | None = None,
                 precision: str = "fp32", stats: bool = True, fused: FusedKernels | None = None,
                 transform_with_slope: SlopeTransform | None = None, loss_term_with_grad: EmbeddingTerm | None = None,
                 gemm: str = "aten", cap: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked loss head of N = B·T tokens.

    h: (..., H) final hidden states; E: (V, H) output embedding; y: (...,) int64 targets;
    chunk: tokens per chunk (≥ 1; any N, the last chunk may be shorter); transform: elementwise
    map of fp32 logits (n, V) → (n, V); token_loss: per-token penalty of log Z, (n,) → (n,), whose
    mean over tokens is added to the loss; precision: the run's resolved precision.

    Returns ``(total, ce, penalty, lse, stats)``: total = ce + penalty, a differentiable scalar
    (gradients reach h and E); ce, penalty: detached scalars (means over tokens, the penalty plus the
    value of ``loss_term_with_grad``); lse: (...,)
    detached log Z per token; stats: float64 (3,) [Σ logits, Σ logits², max |logit|] over all
    N × V transformed logits (zeros when ``stats`` is False: three passes over the logits saved).
    fused: compiled kernels (``FusedKernels``, built with the transform's ``transform_with_slope``) that
    do each chunk's elementwise work in two fused passes, reading its logits in the GEMM's dtype (fp32,
    bf16); float64 runs are unfused.
    transform_with_slope: the same transform as ``transform`` giving (f(raw), f′(raw)) in plain tensor
    ops; the unfused head then applies it without autograd (one multiplication by f′ in the gradient).
    loss_term_with_grad: a loss of E alone, E (V, H) -> (value, ∂value/∂E broadcastable to (V, H)), in plain
    tensor ops: its value joins ``total`` and ``penalty``, and its gradient, times the incoming one, is added
    to E's in backward (a stabilizer's ``loss_term_with_grad``, called once per call of the head).
    gemm: the library of the head's fp32 products on CPU, "aten" or "onednn" (``bench.gemm``; same sums up
    to their order).
    cap: c when ``transform`` is soft-capping, c·tanh(l/c) (``Stabilizer.logit_cap``): where the head
    multiplies in oneDNN (fp32 on CPU) it runs the compiled kernel (``bench.native``: the capped softmax and
    its slope in one call) or, without it, takes σ(2l/c) from the logit GEMM's epilogue and the slope by one
    pass (``_capped_chunk``), instead of calling ``transform_with_slope``; elsewhere it is not read.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 tokens, got {chunk}")
    shape = y.shape
    want = torch.is_grad_enabled() and (h.requires_grad or E.requires_grad)
    total, ce, pen, lse, st = _ChunkedHead.apply(h.reshape(-1, h.shape[-1]), E, y.reshape(-1), chunk,
                                                    transform, token_loss, precision, want, stats, fused,
                                                    transform_with_slope, loss_term_with_grad, gemm, cap)
    return total, ce.detach(), pen.detach(), lse.reshape(shape), st
