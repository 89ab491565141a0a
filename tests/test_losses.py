"""cross_entropy_lse: the cross-entropy and log Z of one fused pass, equal to the textbook formulas."""
import torch

from bench.losses import cross_entropy_lse


def _reference(logits, y):
    lse = torch.logsumexp(logits, -1)
    return lse - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1), lse


def test_values_and_gradients_match_logsumexp_and_gather():
    g = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(3, 6, 50, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 50, (3, 6), generator=g)
    w_ce, w_lse = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    ce, lse = cross_entropy_lse(logits, y)
    ce_ref, lse_ref = _reference(logits, y)
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(lse, lse_ref)
    (grad,) = torch.autograd.grad((w_ce * ce + w_lse * lse).sum(), logits)
    (grad_ref,) = torch.autograd.grad((w_ce * ce_ref + w_lse * lse_ref).sum(), logits)
    torch.testing.assert_close(grad, grad_ref)


def test_gradcheck():
    logits = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, 3, 3])
    assert torch.autograd.gradcheck(lambda l: cross_entropy_lse(l, y), (logits,))


def test_vmap_over_a_member_dimension_gives_each_members_gradient():
    y = torch.randint(0, 11, (5,))
    xs = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)

    def loss(l):
        ce, lse = cross_entropy_lse(l, y)
        return ce.mean() + 0.1 * lse.square().mean()

    (g,) = torch.autograd.grad(torch.vmap(loss)(xs).sum(), xs)
    for k in range(3):
        (gk,) = torch.autograd.grad(loss(xs[k]), xs)
        torch.testing.assert_close(g[k], gk[k])
