"""The chunked loss head (bench.head) is the unchunked head, computed a chunk of tokens at a time.

In float64 the two agree to rounding: loss, cross-entropy, regularization, log Z, logit statistics
and the gradient of every parameter, for every built-in stabilizer, tied and untied, for chunk sizes
that divide B·T and that do not. A stabilizer whose loss_term reads the full logits takes the
unchunked head. The head's peak memory is one chunk's logits, not B·T × V.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch

from bench.config import RunConfig
from bench.head import chunked_head
from bench.memory import measure_peak_bytes
from bench.model import GPT, preset
from bench.stabilizers import LossInputs, Stabilizer, make_stabilizer
from bench.train_module import stabilized_loss, uses_chunked_head

BUILTINS = [("baseline", {}), ("zloss", {"lam": 0.3}), ("softcap", {"cap": 2.0}), ("muloss", {"lam": 2.0}),
            ("mucentering", {})]
B, T, V = 3, 7, 97  # B·T = 21 tokens


def _model(tied: bool) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("nano", vocab_size=V, seq_len=T, weight_tying=tied)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def _loss_and_grads(model: GPT, stab, chunk: int):
    x, y = _batch()
    model.zero_grad(set_to_none=True)
    out = stabilized_loss(model, stab, x, y, nullcontext(), precision="fp64", chunk=chunk, stats=True)
    out.total.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name,hp", BUILTINS, ids=[b[0] for b in BUILTINS])
@pytest.mark.parametrize("chunk", [1, 4, 7, 21, 64], ids=lambda c: f"chunk{c}")
def test_chunked_head_equals_unchunked_head_fp64(name, hp, tied, chunk):
    """chunk 7 divides B·T = 21, 4 does not; 64 > B·T is one chunk; 1 is one token at a time."""
    stab = make_stabilizer(name, **hp)
    assert uses_chunked_head(stab, chunk)  # every built-in fits the chunked head
    model = _model(tied)
    full, g_full = _loss_and_grads(model, stab, chunk=0)
    part, g_part = _loss_and_grads(model, stab, chunk=chunk)
    for field in ("total", "ce", "reg"):
        assert float(getattr(part, field).detach()) == pytest.approx(float(getattr(full, field).detach()), rel=1e-12, abs=1e-15), field
    torch.testing.assert_close(part.lse, full.lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part.stats, full.stats, rtol=1e-12, atol=1e-12)  # Σl, Σl², max|l|
    assert g_full.keys() == g_part.keys()
    for n in g_full:
        torch.testing.assert_close(g_part[n], g_full[n], rtol=1e-10, atol=1e-13, msg=n)
    if name in ("zloss", "muloss"):
        assert float(full.reg) > 0  # the regularization is really there in both


def test_chunked_head_function_against_a_direct_computation():
    """Without the model: mean cross-entropy + mean penalty of log Z and its gradients, by autograd."""
    torch.manual_seed(0)
    h = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    E = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (10,))
    logits = h @ E.T
    lse = torch.logsumexp(logits, dim=-1)
    want = torch.nn.functional.cross_entropy(logits, y) + (0.1 * lse.square()).mean()
    gh, gE = torch.autograd.grad(want, (h, E))
    total, ce, pen, lse_c, _ = chunked_head(h, E, y, chunk=3, token_loss=lambda z: 0.1 * z.square())
    gh_c, gE_c = torch.autograd.grad(total, (h, E))
    assert float(total.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    assert float(ce + pen) == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(lse_c, lse.detach())
    torch.testing.assert_close(gh_c, gh)
    torch.testing.assert_close(gE_c, gE)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_head(h, E, y, chunk=0)


@pytest.mark.parametrize("capped", [False, True], ids=["plain", "soft-capped"])
@pytest.mark.parametrize("penalty", ["z-loss", "slope -1", "mixed"])
def test_a_token_losss_one_hot_term_joins_the_softmax_buffer_unless_1_plus_its_slope_is_0(penalty, capped):
    """With a token loss the folded gradient's row i is a_i/N · (q_i − f′_i/a_i · onehot(y_i)), a_i = 1 +
    ∂pen/∂lse_i: the one-hot term goes into q where every a_i of a chunk is finite and nonzero, and to the
    GEMMs' sides (an index_add) where one is 0 (pen = −lse: a = 0). Both equal autograd's gradient (fp64)."""
    cut = 3.5 if capped else 6.6  # log Z above it: slope −1 (a = 0); below: z-loss
    pens = {"z-loss": lambda z: 0.1 * z.square(), "slope -1": lambda z: -z,
            "mixed": lambda z: torch.where(z > cut, -z, 0.1 * z.square())}
    pen = pens[penalty]
    torch.manual_seed(0)
    h = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    E = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (10,))
    cap = make_stabilizer("softcap", cap=2.0)
    logits = h @ E.T
    if capped:
        logits = cap.transform_logits(logits)
    lse = torch.logsumexp(logits, dim=-1)
    if penalty == "mixed":  # chunks of 3 tokens with and without a token whose a is 0: both paths
        with_zero = [bool((lse[i:i + 3] > cut).any()) for i in range(0, 10, 3)]
        assert any(with_zero) and not all(with_zero)
    want = torch.nn.functional.cross_entropy(logits, y) + pen(lse).mean()
    gh, gE = torch.autograd.grad(want, (h, E))
    kw = dict(transform=cap.transform_logits, transform_with_slope=cap.transform_logits_with_slope) if capped else {}
    total, *_ = chunked_head(h, E, y, chunk=3, token_loss=pen, **kw)
    gh_c, gE_c = torch.autograd.grad(total, (h, E))
    assert float(total.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(gh_c, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gE_c, gE, rtol=1e-10, atol=1e-12)


SEEN: list[tuple[bool, bool]] = []


@dataclass(frozen=True)
class ReadsHiddenOnly(Stabilizer):
    """Declares that its loss_term reads only the hidden states: the chunked head serves it."""

    name = "hidden_l2"
    loss_term_uses = frozenset({"hidden"})
    lam: float = 0.5

    def loss_term(self, inputs: LossInputs) -> torch.Tensor:
        SEEN.append((inputs.logits is None, inputs.lse is None))
        return self.lam * inputs.hidden.square().mean()


@dataclass(frozen=True)
class ReadsLogits(Stabilizer):
    """A loss_term on the full logits (no declaration): it must get the unchunked head."""

    name = "logit_l2"
    lam: float = 0.01

    def loss_term(self, inputs: LossInputs) -> torch.Tensor:
        return self.lam * inputs.logits.square().mean()


def test_a_loss_term_that_reads_the_full_logits_takes_the_unchunked_head():
    stab = ReadsLogits()
    assert not type(stab).chunkable() and not uses_chunked_head(stab, 8)
    model = _model(False)
    full, g_full = _loss_and_grads(model, stab, chunk=0)
    fallback, g_fb = _loss_and_grads(model, stab, chunk=8)  # asks for chunks, gets the full logits
    assert float(fallback.reg) == float(full.reg) > 0
    for n in g_full:
        assert torch.equal(g_fb[n], g_full[n]), n


def test_a_loss_term_declaring_what_it_reads_runs_inside_the_chunked_head():
    stab = ReadsHiddenOnly()
    assert uses_chunked_head(stab, 8)
    model = _model(False)
    full, g_full = _loss_and_grads(model, stab, chunk=0)
    SEEN.clear()
    part, g_part = _loss_and_grads(model, stab, chunk=8)
    assert SEEN == [(True, True)]  # the full logits and log Z were never formed for it
    assert float(part.total.detach()) == pytest.approx(float(full.total.detach()), rel=1e-12)
    for n in g_full:
        torch.testing.assert_close(g_part[n], g_full[n], rtol=1e-10, atol=1e-13, msg=n)


@pytest.mark.parametrize("precision", ["bf16-emu", "fp32"])
def test_chunked_training_follows_the_unchunked_run(precision):
    """Whole runs (20 steps) with either head end at the same loss, up to fp32 summation order."""
    from bench.trainer import train
    from tests.helpers import tiny_config

    runs = [train(tiny_config(precision=precision, stabilizer="zloss", hparams={"lam": 1e-2}, head_chunk=c)).run
            for c in (0, 5)]
    for k in ("final_loss", "final_loss_fp32", "logit_mean", "mean_log2z"):
        assert runs[1][k] == pytest.approx(runs[0][k], rel=2e-3, abs=1e-4), k


def test_peak_memory_of_the_chunked_head_is_a_chunk_not_the_batch():
    """Measured (PyTorch's CPU allocator): 2,048 tokens × V = 50,304 in chunks of 256 tokens."""
    if measure_peak_bytes(lambda: None) is None:
        pytest.skip("peak memory needs the profiler's allocation events or /proc/self (Linux)")
    torch.manual_seed(0)
    N, H, V_ = 2048, 64, 50304
    h = torch.randn(N, H, requires_grad=True)
    E = (0.02 * torch.randn(V_, H)).requires_grad_()
    y = torch.randint(0, V_, (N,))

    def step(chunk):
        def run():
            out = stabilized_loss_head(h, E, y, chunk)
            out.backward()
            h.grad = E.grad = None
        return run

    logits_bytes = N * V_ * 4  # 412 MB
    full = measure_peak_bytes(step(0))
    chunked = measure_peak_bytes(step(256))
    assert full > 2 * logits_bytes  # the unchunked head holds several (N × V) buffers
    assert chunked < logits_bytes  # the chunked one a few (256 × V) ones and the (V × H) gradient
    assert chunked < full / 4  # (measured: 116 MB vs 1,236 MB)


def stabilized_loss_head(h, E, y, chunk):
    """The head alone: unchunked as train_module does it (F.linear + the fused cross-entropy), or chunked."""
    from bench.losses import cross_entropy_lse

    if chunk == 0:
        ce, _ = cross_entropy_lse(torch.nn.functional.linear(h, E), y)
        return ce.mean()
    return chunked_head(h, E, y, chunk=chunk, stats=False)[0]


def test_run_config_head_chunk_is_checked():
    from bench.errors import ConfigError
    with pytest.raises(ConfigError, match="head_chunk"):
        RunConfig(head_chunk=-1).check(machine=False)


SLOPED = [name for name, _ in BUILTINS if type(make_stabilizer(name)).has_hook("transform_logits_with_slope")]


@pytest.mark.parametrize("name", SLOPED)
def test_a_transform_with_slope_is_the_transform_and_its_derivative(name):
    """transform_logits_with_slope(l) = (transform_logits(l), d transform/dl), elementwise (float64,
    logits far beyond a soft cap of 2 included)."""
    stab = make_stabilizer(name, **dict(BUILTINS)[name])
    logits = torch.linspace(-40, 40, 2001, dtype=torch.float64).reshape(3, 667).requires_grad_()
    value, slope = stab.transform_logits_with_slope(logits.detach())
    want = stab.transform_logits(logits)
    (want_slope,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(value, want.detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(slope, want_slope, rtol=1e-12, atol=1e-14)


@dataclass(frozen=True)
class Doubling(Stabilizer):
    """l ← 2·l, with its slope: the head must use the slope form (no autograd graph over the logits)."""

    name = "doubling"
    calls = []  # noqa: RUF012 - a spy shared by the test

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the chunked head took the autograd path although a slope was given")

    def transform_logits_with_slope(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Doubling.calls.append(logits.shape)
        return 2 * logits, torch.full_like(logits, 2.0)


def test_the_chunked_head_applies_a_transform_through_its_slope():
    """Loss and gradients equal those of the logits 2·E·h by autograd, computed from the slope alone."""
    torch.manual_seed(0)
    h = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    E = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (10,))
    want = torch.nn.functional.cross_entropy(2 * (h @ E.T), y)
    gh, gE = torch.autograd.grad(want, (h, E))
    stab = Doubling()
    total, *_ = chunked_head(h, E, y, chunk=4, transform=stab.transform_logits,
                             transform_with_slope=stab.transform_logits_with_slope)
    assert [tuple(s) for s in Doubling.calls] == [(4, 13), (4, 13), (2, 13)]  # once per chunk
    torch.testing.assert_close(total, want.detach())
    torch.testing.assert_close(torch.autograd.grad(total, (h, E)), (gh, gE))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name,hp", [("baseline", {}), ("zloss", {"lam": 0.3}), ("softcap", {"cap": 2.0})],
                         ids=["baseline", "zloss", "softcap"])
def test_compiled_fused_chunk_kernels_equal_the_eager_head(name, hp, precision):
    """The compiled two-pass kernels (CUDA runs' fused head; compiled here on the CPU) give the eager
    head's loss, log Z, statistics and gradients, chunks that do not divide the tokens. In bf16 they read
    the GEMM's bf16 logits as they are (no float32 copy of a chunk's logits) and write the gradient in
    bf16, the dtype of the GEMMs that read it; the eager head rounds its float32 gradient to the same
    bf16 before those GEMMs, so the two agree to bf16's rounding of values that differ in float32's last bits."""
    from bench.head import FusedKernels

    stab = make_stabilizer(name, **hp)
    cls = type(stab)
    fused = FusedKernels(stab.transform_logits_with_slope if cls.has_hook("transform_logits") else None)
    seen = []
    reduce, grad = fused.reduce, fused.grad
    fused.reduce = lambda raw, *a: (seen.append(("reduce", raw.dtype)), reduce(raw, *a))[1]
    fused.grad = lambda *a: (lambda g: (seen.append(("grad", g.dtype)), g)[1])(grad(*a))
    tok = stab.token_loss if cls.has_hook("token_loss") else None
    tr = stab.transform_logits if cls.has_hook("transform_logits") else None
    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(50, 16, generator=g)).requires_grad_()
    E = torch.randn(300, 16, generator=g).requires_grad_()
    y = torch.randint(0, 300, (50,), generator=g)
    outs = []
    for kernels in (None, fused):
        total, ce, pen, lse, st = chunked_head(h, E, y, chunk=16, transform=tr, token_loss=tok, fused=kernels,
                                               precision=precision)
        outs.append((total.detach(), ce, pen, lse, st, *torch.autograd.grad(total, (h, E))))
    assert not fused.failed  # compiled and used: a fallback to the eager head would compare it with itself
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    assert set(seen) == {("reduce", low), ("grad", low)} and len(seen) == 2 * 4  # 4 chunks: 16 + 16 + 16 + 2
    tol = 2e-5 if precision == "fp32" else 1e-2
    for eager, compiled in zip(*outs):
        torch.testing.assert_close(compiled, eager.to(compiled.dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("sigmoid_form", [False, True], ids=["tanh", "sigmoid-form"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-emu"])
def test_soft_capping_through_its_slope_is_bit_identical_to_autograd(precision, sigmoid_form, monkeypatch):
    """The slope path changes no bit of the loss, log Z or statistics against autograd through
    ``transform_logits`` (the unchunked head's path), nor, in bf16-emu, of the gradients: a bf16-emu
    run amplifies a last-bit difference into a different trajectory within 20 steps. In fp32 the
    slope path folds the gradient's scaling into the GEMMs (``FoldedGrad``), which rounds differently:
    the gradients agree to a few ulps there. Both forms of tanh: ATen's (CUDA), and the sigmoid form
    (CPU)."""
    from bench.stabilizers import softcap as module

    monkeypatch.setattr(module, "SIGMOID_FORM_ON_CPU", sigmoid_form)
    stab = make_stabilizer("softcap", cap=3.0)
    g = torch.Generator().manual_seed(0)
    h = (2 * torch.randn(40, 16, generator=g)).requires_grad_()
    E = torch.randn(300, 16, generator=g).requires_grad_()
    y = torch.randint(0, 300, (40,), generator=g)
    outs = []
    for slope in (None, stab.transform_logits_with_slope):
        total, ce, _, lse, st = chunked_head(h, E, y, chunk=16, transform=stab.transform_logits,
                                             transform_with_slope=slope, precision=precision)
        outs.append((total.detach(), ce, lse, st, *torch.autograd.grad(total, (h, E))))
    for i, (autograd_path, slope_path) in enumerate(zip(*outs)):
        if precision == "fp32" and i >= 4:  # the gradients of h and E
            scale = autograd_path.abs().max().item()  # a few ulps of the largest entry; sums can cancel
            torch.testing.assert_close(slope_path, autograd_path, rtol=1e-6, atol=1e-6 * scale)
        else:
            assert torch.equal(slope_path, autograd_path)


@pytest.mark.parametrize("chunk", [16, 64], ids=["3-chunks", "1-chunk"])
def test_the_bf16_head_follows_the_fp32_head(chunk):
    """precision="bf16" multiplies bf16 copies of h and E and accumulates ∂E over chunks in fp32; its
    loss and gradients are the fp32 head's to bf16's precision (8 bits), in one chunk or several."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    E = (0.5 * torch.randn(300, 16, generator=g)).requires_grad_()
    y = torch.randint(0, 300, (40,), generator=g)
    outs = []
    for precision in ("fp32", "bf16"):
        total = chunked_head(h, E, y, chunk=chunk, precision=precision)[0]
        outs.append((total.detach(), *torch.autograd.grad(total, (h, E))))
    for fp32, bf16 in zip(*outs):
        assert bf16.dtype == fp32.dtype
        torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2 * fp32.abs().max().item())
