"""The library of a CPU step's fp32 products (``RunConfig.cpu_gemm``, ``bench.gemm``): oneDNN's matmul
computes what ATen's does up to rounding, forward and backward, in the model and in the loss head; it is
deterministic; products it does not take (fp64, autocast, bf16 emulation) stay ATen's bit for bit; and
a run uses the library its config names, which records from before the setting read as ATen's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench import gemm
from bench.config import ConfigError, RunConfig, from_stored
from bench.head import chunked_head
from bench.precision import BF16Rounding
from bench.train_module import SingleModule

from helpers import tiny_config

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(),
                                  reason="this PyTorch has no oneDNN fp32 matmul on this CPU (not x86-64, or "
                                         "built without oneDNN); the 'aten' library is then the only one")


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the first operand of every oneDNN product while the test runs."""
    calls: list[tuple[int, ...]] = []
    real = gemm._onednn_linear
    monkeypatch.setattr(gemm, "_onednn_linear", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
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
    from bench.stabilizers import make_stabilizer
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
