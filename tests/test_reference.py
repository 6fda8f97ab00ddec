"""The reference against the definitions of SPEC section 2, and the torch backend against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss, get_divergence
from fdiv_kernels.divergences import psi, psi_diff, psi_slope

# f'(u) of each divergence, exactly as SPEC section 2 tabulates it; psi(d) = f'(exp(d)).
F_PRIME = {
    "reverse_kl": lambda u, a: torch.log(u) + 1,
    "forward_kl": lambda u, a: -1 / u,
    "js": lambda u, a: torch.log(2 * u / (1 + u)),
    "alpha": lambda u, a: (1 - u ** (-a)) / a,
    "hellinger": lambda u, a: 1 - u ** -0.5,
}
DIVERGENCE_CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5), ("alpha", 0.1), ("alpha", 0.5),
                    ("alpha", 0.9), ("hellinger", 0.5)]


@pytest.mark.parametrize("name, alpha", DIVERGENCE_CASES)
def test_psi_is_f_prime_of_exp_up_to_a_constant(name, alpha):
    div = get_divergence(name, alpha)
    d = torch.linspace(-6, 6, 97, dtype=torch.float64)
    by_definition = F_PRIME[name](torch.exp(d), alpha)
    offset = by_definition - psi(div, d)
    torch.testing.assert_close(offset, torch.full_like(offset, offset[0].item()), rtol=0, atol=1e-12)
    d_req = d.clone().requires_grad_()
    (slope,) = torch.autograd.grad(F_PRIME[name](torch.exp(d_req), alpha).sum(), d_req)
    torch.testing.assert_close(psi_slope(div, d), slope, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, alpha", DIVERGENCE_CASES)
def test_psi_diff_matches_the_plain_difference_and_stays_finite(name, alpha):
    div = get_divergence(name, alpha)
    g = torch.Generator().manual_seed(1)
    d_w, d_l = (4 * torch.randn(257, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(psi_diff(div, d_w, d_l), psi(div, d_w) - psi(div, d_l), rtol=1e-12, atol=1e-12)
    huge = torch.tensor([-1e4, -1e4, 1e4, -1e4, 0.0], dtype=torch.float32)
    other = torch.tensor([-1e4, 1e4, -1e4, 0.0, -1e4], dtype=torch.float32)
    out = psi_diff(div, huge, other)
    assert not out.isnan().any(), out
    assert out[0] == 0  # equal arguments: exactly 0, never inf - inf


def test_js_never_forms_exp_of_the_logratio():
    div = get_divergence("js")
    d = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4])
    reward = psi(div, d)
    assert torch.isfinite(reward[1:]).all() and reward[0] == -1e4 + math.log(2)
    assert reward[-1] == pytest.approx(math.log(2))


def test_reference_is_the_diffusion_dpo_loss_for_reverse_kl():
    """Written out as the original code writes it, in float64 (the direct-difference form agrees to rounding)."""
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(8, 4, 9, 11, generator=g, dtype=torch.float64)
    ref = pred + 0.01 * torch.randn(pred.shape, generator=g, dtype=torch.float64)
    target = torch.randn(pred.shape, generator=g, dtype=torch.float64)
    model_losses = (pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses = (ref - target).pow(2).mean(dim=[1, 2, 3])
    model_diff = model_losses[:4] - model_losses[4:]
    ref_diff = ref_losses[:4] - ref_losses[4:]
    expected = -F.logsigmoid(-0.5 * 5000 * (model_diff - ref_diff)).mean()
    torch.testing.assert_close(fdpo_loss_reference(pred, ref, target), expected, rtol=1e-12, atol=0)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = (pred + 0.01 * torch.randn(pred.shape, generator=g, dtype=torch.float64)).detach()
    target = torch.randn(2, 2, 3, 5, generator=g, dtype=torch.float64)
    for name, alpha in DIVERGENCE_CASES:
        torch.autograd.gradcheck(
            lambda p: fdpo_loss_reference(p, ref, target, divergence=name, alpha=alpha, beta=200.0,
                                          label_smoothing=0.1, logratio_clip=3.0),
            (pred,),
        )


def _case(B, shape, dtype, seed, shared_target=False, with_mask=False):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2 * B, *shape, generator=g).to(dtype)
    ref = (pred.double() + 0.01 * torch.randn(pred.shape, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randn(B if shared_target else 2 * B, *shape, generator=g).to(dtype)
    kwargs = {"mask": torch.rand(2 * B, *shape, generator=g).to(dtype)} if with_mask else {}
    return pred, ref, target, kwargs


@pytest.mark.parametrize("name, alpha", DIVERGENCE_CASES)
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_backend_matches_reference(name, alpha, layout, reduction):
    pred, ref, target, kw = _case(3, (3, 17, 13), torch.float64, seed=4, shared_target=True, with_mask=True)
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    args = dict(divergence=name, alpha=alpha, layout=layout, reduction=reduction, pair_weight=weight,
                label_smoothing=0.05, gamma=1.5, return_stats=True, **kw)
    pred_a = pred.clone().requires_grad_()
    pred_b = pred.clone().requires_grad_()
    loss_a, stats_a = fdpo_loss_reference(pred_a, ref, target, **args)
    loss_b, stats_b = fused_fdpo_loss(pred_b, ref, target, backend="torch", **args)
    upstream = torch.rand(loss_a.shape, dtype=torch.float64) + 0.5
    (grad_a,) = torch.autograd.grad(loss_a, pred_a, upstream)
    (grad_b,) = torch.autograd.grad(loss_b, pred_b, upstream)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-10, atol=1e-14)
    for field, value in stats_a.as_dict().items():
        torch.testing.assert_close(getattr(stats_b, field), value, rtol=1e-12, atol=1e-14, msg=field)


@pytest.mark.parametrize("err_reduction", ["mean", "sum"])
def test_torch_backend_ref_err_path(err_reduction):
    pred, ref, target, _ = _case(4, (2, 5, 3, 7), torch.float64, seed=5)
    beta = 5000.0 if err_reduction == "mean" else 50.0
    ref_err = fdpo_loss_reference(ref, ref.clone(), target, err_reduction=err_reduction, return_stats=True)[1].model_err
    pred_a, pred_b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss_a = fdpo_loss_reference(pred_a, ref, target, divergence="js", beta=beta, err_reduction=err_reduction)
    loss_b = fused_fdpo_loss(pred_b, target=target, ref_err=ref_err, divergence="js", beta=beta,
                             err_reduction=err_reduction, backend="torch")
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss_b, pred_b)[0], torch.autograd.grad(loss_a, pred_a)[0],
                               rtol=1e-8, atol=1e-15)


@pytest.mark.parametrize("name, alpha", DIVERGENCE_CASES)
def test_reference_gradient_at_ties(name, alpha):
    """policy == reference (the first fine-tuning step): every d is 0 and the gradient must still be right."""
    pred, _, target, _ = _case(4, (3, 5), torch.float64, seed=6)
    a, b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    fdpo_loss_reference(a, pred, target, divergence=name, alpha=alpha).backward()
    fused_fdpo_loss(b, pred, target, divergence=name, alpha=alpha, backend="torch").backward()
    assert a.grad.abs().max() > 0
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
