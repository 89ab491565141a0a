"""The library of a CPU step's fp32 products (``RunConfig.cpu_gemm``, ``bench.gemm``): oneDNN's matmul
computes what ATen's does up to rounding, forward and backward, in the model and in the loss head; it is
deterministic; products it does not take (fp64, autocast, bf16 emulation) stay ATen's bit for bit; and
a run uses the library its config names, which records from before the setting read as ATen's."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench import gemm
from bench.config import ConfigError, RunConfig, from_stored
from bench.head import chunked_head
from bench.precision import BF16Rounding
from bench.stabilizers import make_stabilizer
from bench.train_module import SingleModule

from helpers import native_kernel, tiny_config

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(),
                                  reason="this PyTorch has no oneDNN fp32 matmul on this CPU (not x86-64, or "
                                         "built without oneDNN); the 'aten' library is then the only one")


class _KernelSpy:
    """The compiled kernel, recording the shape of every chunk of logits it is given."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __call__(self, l, *args, **kwargs):
        self.calls.append(tuple(l.shape))
        return self.kernel(l, *args, **kwargs)


@pytest.fixture(params=["native", "epilogue"])
def capped_path(request, monkeypatch) -> tuple[str, list]:
    """The head's own soft-capping under test, where oneDNN multiplies: "native", the compiled kernel
    (``bench.native``), or "epilogue", the kernel off: σ from the logit GEMM's epilogue and ATen's passes.
    Returns the path's name and the shapes of the chunks the kernel was given."""
    calls: list = []
    if request.param == "native":
        kernel = native_kernel()
        monkeypatch.setattr("bench.head.capped_kernel", lambda: _KernelSpy(kernel, calls))
    else:
        if not gemm.sigmoid_epilogue_available():
            pytest.skip("this oneDNN has no sigmoid epilogue (or no fp32 matmul) here")
        monkeypatch.setattr("bench.head.capped_kernel", lambda: None)
    return request.param, calls


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the first operand of every oneDNN product while the test runs, followed by the name of
    its epilogue's function where it has one: (64, 32) a plain product, (64, 32, "sigmoid") one through σ."""
    calls: list[tuple] = []
    real = gemm._onednn_linear

    def spy(x, w, post="none"):
        calls.append(tuple(x.shape) + (() if post == "none" else (post,)))
        return real(x, w, post)

    monkeypatch.setattr(gemm, "_onednn_linear", spy)
    return calls


def _fp64_linear(x, w, g):
    """F.linear(x, w) and its gradients for incoming gradient g, in float64 (the reference)."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    out = F.linear(x64, w64)
    out.backward(g.double())
    return out, x64.grad, w64.grad


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)], ids=["2d", "3d"])
def test_onednn_linear_and_its_gradients_equal_fp64_within_fp32_rounding(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(40, 24, generator=gen, requires_grad=True)
    g = torch.randn(*shape[:-1], 40, generator=gen)
    out = gemm.linear(x, w, "onednn")
    assert out.grad_fn is not None and "_Linear" in type(out.grad_fn).__name__  # through oneDNN, not F.linear
    out.backward(g)
    ref, gx, gw = _fp64_linear(x.detach(), w.detach(), g)
    for got, want in ((out, ref), (x.grad, gx), (w.grad, gw)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linear_forms_only_the_gradients_asked_for():
    x, w = torch.randn(6, 8), torch.randn(4, 8, requires_grad=True)
    gemm.linear(x, w, "onednn").sum().backward()
    assert x.grad is None and w.grad is not None


@needs_onednn
def test_onednn_products_are_deterministic_and_head_products_take_views():
    gen = torch.Generator().manual_seed(1)
    h, E = torch.randn(64, 32, generator=gen), torch.randn(300, 32, generator=gen)
    a, b = gemm.mm(h, E.T, "onednn"), gemm.mm(h, E.T, "onednn")  # E.T: a strided view, as the head passes it
    assert torch.equal(a, b)
    torch.testing.assert_close(a.double(), h.double() @ E.double().T, rtol=1e-5, atol=1e-5)
    q = torch.randn(64, 300, generator=gen)
    torch.testing.assert_close(gemm.mm(h.T, q, "onednn").double(), h.double().T @ q.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["fp64", "autocast", "bf16-emu", "aten"])
def test_products_oneDNN_does_not_take_are_atens_bit_for_bit(case):
    import contextlib

    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 16, generator=gen), torch.randn(8, 16, generator=gen)
    library = "aten" if case == "aten" else "onednn"
    if case == "fp64":
        x, w = x.double(), w.double()
    context = {"autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
               "bf16-emu": BF16Rounding}.get(case, contextlib.nullcontext)
    with context():  # the emulation rounds what F.linear receives and returns: it must see the call
        got, want = gemm.linear(x, w, library), F.linear(x, w)
        got_mm, want_mm = gemm.mm(x, w.T, library), x @ w.T
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert got_mm.dtype == want_mm.dtype and torch.equal(got_mm, want_mm)
    if case == "bf16-emu":
        assert torch.equal(got, got.bfloat16().float())  # rounded to bf16 values: the mode saw the call


@needs_onednn
@pytest.mark.parametrize("precision, stabilizer", [("fp32", "softcap"), ("fp32", "zloss"), ("bf16-emu", "baseline")],
                         ids=["fp32-softcap-folded", "fp32-zloss-folded", "bf16-emu-explicit-gradient"])
def test_the_chunked_head_in_onednn_equals_the_head_in_aten_up_to_rounding(precision, stabilizer):
    from bench.train_module import term_with_grad, transform_with_slope

    stab = make_stabilizer(stabilizer, **({"cap": 5.0} if stabilizer == "softcap" else {}))
    gen = torch.Generator().manual_seed(3)
    h0, E0 = torch.randn(2, 45, 24, generator=gen), torch.randn(200, 24, generator=gen) * 0.3
    y = torch.randint(0, 200, (2, 45), generator=gen)
    tok = stab.token_loss if type(stab).has_hook("token_loss") else None
    got = {}
    for library in ("aten", "onednn"):
        h, E = h0.clone().requires_grad_(), E0.clone().requires_grad_()
        total, ce, pen, lse, st = chunked_head(h, E, y, chunk=32, token_loss=tok, precision=precision,
                                               transform_with_slope=transform_with_slope(stab),
                                               loss_term_with_grad=term_with_grad(stab), gemm=library)
        total.backward()
        got[library] = (total.detach(), lse, st, h.grad, E.grad)
    for a, b in zip(got["aten"], got["onednn"]):
        torch.testing.assert_close(b.double(), a.double(), rtol=2e-4 if precision == "fp32" else 2e-2, atol=1e-5)


@needs_onednn
def test_a_run_multiplies_in_the_library_its_config_names(onednn_calls):
    calls = onednn_calls
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses, weights = {}, {}
    for library in ("aten", "onednn", "auto"):
        calls.clear()
        module = SingleModule(tiny_config(cpu_gemm=library, precision="fp32", head_chunk=64))
        losses[library] = [float(module.train_batch(x, x.roll(-1, 1), [3e-3], stats=False)[0][0, 0]) for _ in range(3)]
        # aten: none; oneDNN: every linear layer forward and backward, and the head's products
        assert (len(calls) > 0) is (library != "aten"), library
        if library == "onednn":  # a chunk of 64 tokens' hidden states times Eᵀ: the head's
            assert (64, module.model.cfg.n_embd) in calls
        weights[library] = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    assert losses["auto"] == losses["onednn"] and torch.equal(weights["auto"], weights["onednn"])  # auto: oneDNN here
    assert not torch.equal(weights["onednn"], weights["aten"])  # other sums, other bits …
    assert losses["onednn"] == pytest.approx(losses["aten"], rel=1e-4)  # … the same run up to rounding
    # Adam moves a weight by at most ~lr per step whatever its gradient: a near-zero gradient's rounding can
    # flip its step's sign, so the weights agree within 2·lr per step, not within fp32 rounding
    assert float((weights["onednn"] - weights["aten"]).abs().max()) <= 2 * 3e-3 * 3


@needs_onednn
def test_a_compiled_run_keeps_atens_products():
    assert gemm.for_run(tiny_config(compile=True, device="cpu")) == "aten"
    assert gemm.for_run(tiny_config(device="cpu")) == "onednn"


def test_a_stored_config_from_before_cpu_gemm_reads_with_atens_products():
    old = {k: v for k, v in RunConfig(adamw="fused").to_dict().items() if k != "cpu_gemm"}
    assert from_stored(old).cpu_gemm == "aten"
    assert from_stored({**old, "cpu_gemm": "onednn"}).cpu_gemm == "onednn"  # today's records keep theirs


def test_asking_for_onednn_where_it_is_missing_fails_before_training(monkeypatch):
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    with pytest.raises(ConfigError, match="cpu_gemm.*not available"):
        tiny_config(cpu_gemm="onednn", device="cpu")
    assert tiny_config(cpu_gemm="auto", device="cpu").cpu_gemm == "auto"  # auto falls back to ATen there
    assert gemm.resolve("auto", torch.device("cpu")) == "aten"
    assert gemm.resolve("onednn", torch.device("cuda")) == "aten"  # a CUDA run's products are cuBLAS's


@needs_onednn
def test_a_packs_loss_head_multiplies_in_the_library_its_members_name(onednn_calls):
    from bench.pack.module import PackModule

    calls = onednn_calls
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for library in ("aten", "onednn"):
        calls.clear()
        cfgs = [tiny_config(cpu_gemm=library, precision="fp32", head_chunk=64, seed=s, data_seed=1) for s in (1, 2)]
        pack = PackModule(cfgs)
        pack.train_batch(x, x.roll(-1, 1), [3e-3, 1e-3], stats=False)
        # per member, a chunk of 64 tokens' hidden states times Eᵀ (the batched body's products stay ATen's)
        assert ((64, pack.scratch.cfg.n_embd) in calls) is (library == "onednn"), library


def test_a_runs_record_names_the_library_that_multiplied():
    import json

    from bench.trainer import train

    cfg = tiny_config(steps=6, warmup=1, eval_every=3, device="cpu", precision="fp32")
    assert cfg.cpu_gemm == "auto"
    stored = json.loads(train(cfg).run["config"])
    assert stored["cpu_gemm"] == gemm.for_run(cfg) == ("onednn" if gemm.onednn_available() else "aten")
    assert from_stored(stored).key() == cfg.key()  # an execution setting: the run keeps its key


def _softcap_reference(h, E, y, cap, pen):
    """Mean cross-entropy of cap·tanh(h·Eᵀ/cap) + mean pen(log Z), its log Z, logit statistics and gradients of
    h and E, by autograd in float64."""
    h64, E64 = h.double().requires_grad_(), E.double().requires_grad_()
    lt = cap * torch.tanh(h64 @ E64.T / cap)
    lse = torch.logsumexp(lt, dim=-1)
    loss = F.cross_entropy(lt, y) + (pen(lse).mean() if pen is not None else 0)
    gh, gE = torch.autograd.grad(loss, (h64, E64))
    stats = torch.stack([lt.sum(), lt.square().sum(), lt.abs().max()]).detach()
    return loss.detach(), lse.detach(), stats, gh, gE


@pytest.mark.parametrize("penalty", [None, "z-loss", "slope -1"])
@pytest.mark.parametrize("chunk", [32, 45], ids=["chunk32-not-dividing", "chunk45-dividing"])
def test_soft_capping_in_the_heads_own_passes_equals_the_transform(onednn_calls, capped_path, chunk, penalty):
    """With its cap (``Stabilizer.logit_cap``) the oneDNN head caps each chunk itself — the compiled kernel once
    per chunk, or σ(2l/c) from the logit GEMM and the slope 4σ(1 − σ) by one pass: the loss, log Z, statistics
    and gradients of c·tanh(l/c) to fp32 rounding, with a token loss whose one-hot term joins the softmax
    buffer (z-loss) and one whose does not (slope −1)."""
    path, kernel_calls = capped_path
    pen = {None: None, "z-loss": lambda z: 0.1 * z.square(), "slope -1": lambda z: -z}[penalty]
    stab = make_stabilizer("softcap", cap=4.0)
    gen = torch.Generator().manual_seed(5)
    h, E = torch.randn(90, 24, generator=gen), torch.randn(200, 24, generator=gen) * 0.6  # logits to ±13: capped
    y = torch.randint(0, 200, (90,), generator=gen)
    want = _softcap_reference(h, E, y, 4.0, pen)
    hg, Eg = h.clone().requires_grad_(), E.clone().requires_grad_()
    total, ce, p, lse, st = chunked_head(hg, Eg, y, chunk=chunk, token_loss=pen, transform=stab.transform_logits,
                                         transform_with_slope=stab.transform_logits_with_slope, gemm="onednn",
                                         cap=stab.logit_cap())
    total.backward()
    chunks = [chunk] * (90 // chunk) + [90 % chunk] * (90 % chunk > 0)
    sigmoid_gemms = [c for c in onednn_calls if "sigmoid" in c]
    if path == "native":
        assert kernel_calls == [(n, 200) for n in chunks] and sigmoid_gemms == []
    else:
        assert kernel_calls == [] and sigmoid_gemms == [(n, 24, "sigmoid") for n in chunks]
    for got, ref in zip((total.detach(), lse, st, hg.grad, Eg.grad), want):
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5 * float(ref.abs().max()))


def test_a_soft_capped_run_caps_in_the_head_where_onednn_multiplies_and_through_its_transform_elsewhere(
        onednn_calls, capped_path):
    """ATen's products keep the transform's own passes, the bits of the committed results; oneDNN's take the
    cap into the head's own passes (the compiled kernel, or the GEMM's epilogue), in a single run and in a pack's
    members; the same training up to rounding."""
    from bench.pack.module import PackModule

    path, kernel_calls = capped_path
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = {}

    def capped_in_head(width: int) -> bool:
        return bool(kernel_calls) if path == "native" else (64, width, "sigmoid") in onednn_calls

    for library in ("aten", "onednn"):
        onednn_calls.clear(), kernel_calls.clear()
        cfg = tiny_config(cpu_gemm=library, precision="fp32", head_chunk=64, stabilizer="softcap", hparams={"cap": 3.0})
        module = SingleModule(cfg)
        losses[library] = [float(module.train_batch(x, x.roll(-1, 1), [3e-3], stats=False)[0][0, 0]) for _ in range(3)]
        width = module.model.cfg.n_embd
        assert capped_in_head(width) is (library == "onednn"), library
        onednn_calls.clear(), kernel_calls.clear()
        PackModule([cfg.replace(seed=s, data_seed=1) for s in (1, 2)]).train_batch(x, x.roll(-1, 1), [3e-3, 1e-3], stats=False)
        assert capped_in_head(width) is (library == "onednn"), f"pack, {library}"
    assert losses["onednn"] == pytest.approx(losses["aten"], rel=1e-4)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_a_capped_target_whose_probability_underflows_keeps_a_finite_exact_loss(onednn_calls, capped_path, chunk):
    """A target 199 nats below its row's top (cap 100: logits ±99.5), whose fp32 probability is 0, still gets
    float64's log Z and cross-entropy: the kernel's is log Z − l[y]; the epilogue path's softmax overwrites its
    logits in place, and its row's logits are formed again from the GEMM's σ."""
    path, kernel_calls = capped_path
    torch.manual_seed(0)
    N, H, V = 8, 4, 64
    h, E = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    top = (int(y[0]) + 1) % V
    E[y[0]], E[top] = -300 * h[0] / h[0].norm() ** 2, 300 * h[0] / h[0].norm() ** 2  # raw logits ∓300
    loss64, lse64, *_ = _softcap_reference(h, E, y, 100.0, None)
    total, ce, _, lse, _ = chunked_head(h.float(), E.float(), y, chunk=chunk, gemm="onednn", cap=100.0,
                                        transform=make_stabilizer("softcap", cap=100.0).transform_logits)
    assert bool(kernel_calls) if path == "native" else any("sigmoid" in c for c in onednn_calls)
    assert torch.isfinite(lse).all() and math.isfinite(float(ce))
    torch.testing.assert_close(lse.double(), lse64, rtol=1e-6, atol=1e-4)
    assert float(ce) == pytest.approx(float(loss64), rel=1e-5)
    assert float(loss64) > 190 / N  # the token's loss counts in full
