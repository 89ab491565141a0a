"""Each built-in stabilizer against an independent computation of its formula."""
import math

import pytest
import torch
import torch.nn.functional as F

from bench.model import GPT, preset
from bench.stabilizers import BUILTIN, OUTPUT_EMBEDDING, StabilizerError, make_stabilizer
from bench.train_module import AfterStep, stabilized_loss
from contextlib import nullcontext


def _model(tied: bool = False) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("nano", vocab_size=97, seq_len=16, weight_tying=tied))


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (3, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def test_builtins_are_the_five_of_the_study():
    assert set(BUILTIN) == {"baseline", "zloss", "softcap", "muloss", "mucentering"}


def test_baseline_loss_is_plain_cross_entropy():
    model, (x, y) = _model(), _batch()
    _, ce, reg, *_ = stabilized_loss(model, make_stabilizer("baseline"), x, y, nullcontext())
    logits, _ = model(x)
    assert reg.item() == 0.0
    torch.testing.assert_close(ce, F.cross_entropy(logits.reshape(-1, 97), y.reshape(-1)))


def test_zloss_value_is_lambda_times_mean_squared_log_normalizer():
    model, (x, y) = _model(), _batch()
    lam = 0.3
    reg = stabilized_loss(model, make_stabilizer("zloss", lam=lam), x, y, nullcontext()).reg
    # independent: log Z by exp/sum/log in float64, token by token
    l64 = model(x)[0].detach().double().reshape(-1, 97)
    expected = lam * sum(math.log(row.exp().sum().item()) ** 2 for row in l64) / l64.shape[0]
    assert reg.item() == pytest.approx(expected, rel=1e-5)


def test_zloss_gradient_is_2_lambda_logz_softmax_over_tokens():
    lam = 0.5
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    lse = torch.logsumexp(logits, dim=-1)
    reg = make_stabilizer("zloss", lam=lam).token_loss(lse).mean()
    (grad,) = torch.autograd.grad(reg, logits)
    n = 10
    expected = 2 * lam * lse.detach()[..., None] * torch.softmax(logits.detach(), -1) / n
    torch.testing.assert_close(grad, expected)


def test_softcap_bounds_logits_by_c_and_is_near_identity_for_small_logits():
    stab = make_stabilizer("softcap", cap=5.0)
    logits = torch.linspace(-1000, 1000, 2001)
    capped = stab.transform_logits(logits)
    assert capped.abs().max() <= 5.0
    small = torch.tensor([0.01, -0.02])
    torch.testing.assert_close(stab.transform_logits(small), small, rtol=1e-4, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_muloss_is_lambda_times_squared_norm_of_row_mean(tied):
    model, (x, y) = _model(tied), _batch()
    lam = 2.0
    reg = stabilized_loss(model, make_stabilizer("muloss", lam=lam), x, y, nullcontext()).reg
    E = model.lm_head.weight.detach().double()
    mu = [sum(E[i, j].item() for i in range(E.shape[0])) / E.shape[0] for j in range(E.shape[1])]
    assert reg.item() == pytest.approx(lam * sum(m * m for m in mu), rel=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_mucentering_step_leaves_zero_row_mean(tied):
    model = _model(tied)
    with torch.no_grad():
        model.output_embedding.add_(3.0)  # a large common offset
    AfterStep(model, make_stabilizer("mucentering"))()
    E = model.output_embedding
    assert E.mean(dim=0).abs().max().item() < 1e-6
    if tied:
        assert model.wte.weight.mean(dim=0).abs().max().item() < 1e-6  # the shared matrix was centred


def test_mucentering_hook_is_pure():
    E = torch.randn(7, 4)
    before = E.clone()
    out = make_stabilizer("mucentering").after_step({OUTPUT_EMBEDDING: E})
    torch.testing.assert_close(E, before)  # input untouched
    torch.testing.assert_close(out[OUTPUT_EMBEDDING], E - E.mean(0))


@pytest.mark.parametrize("vocab, threads", [(64, 1), (8192, 2)], ids=["V64", "V8192-blocked-mean"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-emu"])
@pytest.mark.parametrize("tied", [False, True])
def test_mucentering_by_increment_is_bit_identical_to_its_new_value(tied, precision, vocab, threads):
    """The trainer applies μ-centering through ``after_step_delta`` (E += −μ, in place, μ by
    ``row_mean``: by blocks of rows at V = 8192); the committed μ-centering results were trained
    through ``after_step`` (E ← E − μ, copied, μ by ``E.mean``). Same bits over 30 steps."""
    from dataclasses import dataclass

    from bench.config import RunConfig
    from bench.stabilizers import Stabilizer, rowmean
    from bench.stabilizers.mucentering import MuCentering
    from bench.train_module import SingleModule

    @dataclass(frozen=True)
    class ByValue(MuCentering):  # μ-centering without its increment: the engine copies after_step's value
        after_step_delta = Stabilizer.after_step_delta

    cfg = RunConfig(model="nano", vocab_size=vocab, seq_len=8, batch_size=2, stabilizer="mucentering", lr=3e-2,
                    weight_tying=tied, precision=precision, device="cpu", threads=threads, head_chunk=0)
    by_delta, by_value = SingleModule(cfg), SingleModule(cfg)
    by_value.stab = ByValue()
    assert type(by_delta.stab).has_hook("after_step_delta") and not ByValue.has_hook("after_step_delta")
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randint(0, vocab, (2, 8), generator=g)
        for m in (by_delta, by_value):
            m.train_batch(x, x, [3e-2], False)
    E = by_delta.model.output_embedding.detach()
    assert E.mean(0).abs().max() < 1e-6  # centred
    for a, b in zip(by_delta.model.parameters(), by_value.model.parameters()):
        assert torch.equal(a, b)
    assert rowmean._MATCHES.get((vocab, 32, torch.float32, threads)) is (True if vocab >= 8192 else None)


def test_muloss_gradient_is_bit_identical_to_the_row_mean_formula():
    """μ-loss forms μ as Σ rows / V (its backward adds a broadcast view to E's gradient); the committed
    μ-loss results were trained with E.mean(0): same loss and same gradient bits."""
    g = torch.Generator().manual_seed(0)
    grads = []
    for form in ("stabilizer", "mean"):
        g.manual_seed(0)
        E = torch.randn(300, 16, generator=g).add_(0.3).requires_grad_()
        E.grad = torch.full_like(E, 0.5)  # the head's gradient is there first, as in training
        if form == "stabilizer":
            from bench.stabilizers import LossInputs
            loss = make_stabilizer("muloss", lam=2.0).loss_term(LossInputs(None, None, None, E))
        else:
            loss = 2.0 * E.mean(dim=0).square().sum()
        loss.backward()
        grads.append((loss.detach(), E.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("spec,hp", [("zloss", {"lam": -1.0}), ("muloss", {"lam": float("nan")}),
                                     ("softcap", {"cap": 0.0}), ("baseline", {"lam": 1.0}),
                                     ("nonexistent", {})])
def test_bad_stabilizer_or_hyperparameter_is_a_clear_error(spec, hp):
    with pytest.raises(StabilizerError) as e:
        make_stabilizer(spec, **hp)
    assert spec.split(":")[0] in str(e.value) or "lam" in str(e.value) or "cap" in str(e.value)


def test_softcap_value_and_gradient_match_the_tanh_formula():
    from bench.stabilizers.softcap import softcap

    l = (40 * torch.randn(6, 9, dtype=torch.float64)).requires_grad_()
    out = softcap(l, 7.0)
    torch.testing.assert_close(out, 7.0 * torch.tanh(l / 7.0))
    assert torch.autograd.gradcheck(lambda x: softcap(x, 7.0), (l,))
    caps = torch.tensor([2.0, 30.0], dtype=torch.float64)  # vectorized over members
    ls = torch.randn(2, 4, 5, dtype=torch.float64) * 10
    torch.testing.assert_close(torch.vmap(softcap)(ls, caps), torch.stack([softcap(ls[i], caps[i]) for i in range(2)]))


def test_softcaps_sigmoid_form_has_the_bits_of_the_form_that_trained_the_committed_results():
    """The sigmoid form in four passes, x/(c/2) → sigmoid → ·2 → −1, gives every bit of the five-pass
    (x/c)·2 → sigmoid → ·2 → −1 that trained the committed soft-capping runs: logits over fp32's whole
    range, zeros, subnormals, infinities and NaN, with a float cap and with a per-member tensor cap
    (packs)."""
    from bench.stabilizers.softcap import _tanh_of_quotient

    g = torch.Generator().manual_seed(0)
    edge = torch.tensor([0.0, -0.0, 1e-45, -1e-38, 1e-30, 3e38, -3e38, float("inf"), -float("inf"), float("nan")])
    x = torch.cat([torch.randn(200_000, generator=g) * 10.0 ** torch.randint(-8, 8, (200_000,), generator=g), edge])
    for cap in (30.0, 3.0, 0.7, torch.tensor([[30.0], [5.0]])):
        xs = x.expand(2, -1) if isinstance(cap, torch.Tensor) else x
        five_pass = torch.div(xs, cap).mul_(2).sigmoid_().mul_(2).sub_(1)
        assert torch.equal(_tanh_of_quotient(xs, cap).view(torch.int32), five_pass.view(torch.int32))


@pytest.mark.parametrize("sigmoid_form", [False, True], ids=["tanh", "sigmoid-form"])
def test_softcap_in_fp32_is_tanh_within_a_few_ulps_in_either_form(sigmoid_form, monkeypatch):
    """fp32 soft-capping by ATen's tanh (CUDA), or by 2·sigmoid(2x) − 1 (CPU)."""
    from bench.stabilizers import softcap as module

    monkeypatch.setattr(module, "SIGMOID_FORM_ON_CPU", sigmoid_form)
    l = torch.linspace(-300, 300, 100_001)
    want = (30 * torch.tanh(l.double() / 30)).float()
    torch.testing.assert_close(module.softcap(l, 30.0), want, rtol=4e-7, atol=30 * 2.0 ** -22)


def test_muloss_with_grad_is_its_loss_term_and_autograds_gradient_to_the_bit():
    """``loss_term_with_grad`` (what the chunked head runs) gives ``loss_term``'s value and the gradient
    autograd forms from it (incoming gradient 1), bit for bit, in float32 and float64."""
    from bench.stabilizers import LossInputs
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        E = torch.randn(300, 16, generator=g, dtype=dtype).add_(0.3).requires_grad_()
        stab = make_stabilizer("muloss", lam=2e-3)
        loss = stab.loss_term(LossInputs(None, None, None, E))
        (grad,) = torch.autograd.grad(loss, E)
        value, row = stab.loss_term_with_grad(E.detach())
        assert row.shape == (1, 16) and value.shape == ()
        assert torch.equal(value, loss.detach())
        assert torch.equal(row.expand_as(E).to(dtype), grad)


@pytest.mark.parametrize("micro", [8, 2], ids=["one micro-batch", "four micro-batches"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-emu"])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_muloss_without_autograd_is_bit_identical_to_its_loss_term(tied, precision, micro):
    """The chunked head runs μ-loss through ``loss_term_with_grad`` (its value joins the loss, its gradient is
    added to E's in the head's backward); without that hook it runs ``loss_term`` through autograd. Same
    losses and parameters over 20 steps, tied (E's gradient also has the embedding's) and untied."""
    from dataclasses import dataclass

    from bench.config import RunConfig
    from bench.stabilizers import Stabilizer
    from bench.stabilizers.muloss import MuLoss
    from bench.train_module import SingleModule

    @dataclass(frozen=True)
    class ByAutograd(MuLoss):  # μ-loss without its gradient form: loss_term through autograd
        loss_term_with_grad = Stabilizer.loss_term_with_grad

    cfg = RunConfig(model="nano", vocab_size=97, seq_len=8, batch_size=8, micro_batch_size=micro,
                    stabilizer="muloss", hparams={"lam": 50.0}, lr=3e-2, weight_tying=tied, precision=precision,
                    device="cpu", threads=1, head_chunk=5)
    direct, by_autograd = SingleModule(cfg), SingleModule(cfg)
    by_autograd.stab = ByAutograd(lam=50.0)
    calls = []
    hook = direct.stab.loss_term_with_grad
    object.__setattr__(direct.stab, "loss_term_with_grad", lambda E: calls.append(1) or hook(E))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 97, (8, 8), generator=g)
        a, b = (m.train_batch(x, x.roll(-1, 1), [3e-2], False)[0] for m in (direct, by_autograd))
        assert torch.equal(a, b) and float(a[1]) > 0  # ce, reg (the μ-loss), grad norm
    assert len(calls) == 20 * (8 // micro)
    for p, q in zip(direct.model.parameters(), by_autograd.model.parameters()):
        assert torch.equal(p, q)
