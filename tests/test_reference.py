"""The reference against the definitions of spec §2 (docs/spec.md): f', the Diffusion-DPO loss, and the gradient
formula. (Every backend, the torch backend included, against the reference: tests/test_kernels.py; the reference
against mpmath and its double backward: tests/test_numerics.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F
from harness import DIVERGENCES

from fdiv_kernels import fdpo_loss_reference, get_divergence
from fdiv_kernels.divergences import psi, psi_diff, psi_slope

# f'(u) of each divergence, exactly as spec §2 (docs/spec.md) tabulates it; psi(d) = f'(exp(d)).
F_PRIME = {
    "reverse_kl": lambda u, a: torch.log(u) + 1,
    "forward_kl": lambda u, a: -1 / u,
    "js": lambda u, a: torch.log(2 * u / (1 + u)),
    "alpha": lambda u, a: (1 - u ** (-a)) / a,
    "hellinger": lambda u, a: 1 - u**-0.5,
}


@pytest.mark.parametrize("name, alpha", DIVERGENCES)
def test_psi_is_f_prime_of_exp_up_to_a_constant(name, alpha):
    div = get_divergence(name, alpha)
    d = torch.linspace(-6, 6, 97, dtype=torch.float64)
    by_definition = F_PRIME[name](torch.exp(d), alpha)
    offset = by_definition - psi(div, d)
    torch.testing.assert_close(offset, torch.full_like(offset, offset[0].item()), rtol=0, atol=1e-12)
    d_req = d.clone().requires_grad_()
    (slope,) = torch.autograd.grad(F_PRIME[name](torch.exp(d_req), alpha).sum(), d_req)
    torch.testing.assert_close(psi_slope(div, d), slope, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, alpha", DIVERGENCES)
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


# psi'(d) of each divergence as spec §2 tabulates it.
PSI_PRIME = {
    "reverse_kl": lambda d, a: torch.ones_like(d),
    "forward_kl": lambda d, a: torch.exp(-d),
    "js": lambda d, a: torch.sigmoid(-d),
    "alpha": lambda d, a: torch.exp(-a * d),
    "hellinger": lambda d, a: torch.exp(-d / 2) / 2,
}


@pytest.mark.parametrize("name, alpha", DIVERGENCES)
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_reference_gradient_is_the_spec_formula(name, alpha, layout):
    """The reference's autograd gradient against spec §2's closed form, written out here from f' and the table:
    coef_w = -g gamma psi'(d_w) clip'(d_w) beta/2 w red 2 inv_w, coef_l = +..., grad = coef m (pred - target)."""
    B, beta, gamma, eps, clip = 3, 400.0, 1.5, 0.1, 3.0
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2 * B, 2, 3, 5, generator=g, dtype=torch.float64)
    ref = pred + 0.05 * torch.randn(pred.shape, generator=g, dtype=torch.float64)
    target = torch.randn(B, 2, 3, 5, generator=g, dtype=torch.float64)  # shared
    mask = (torch.rand(B, 2, 3, 5, generator=g, dtype=torch.float64) > 0.3).double()  # shared
    weight = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    upstream = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    p = pred.clone().requires_grad_()
    loss = fdpo_loss_reference(
        p,
        ref,
        target,
        mask=mask,
        pair_weight=weight,
        divergence=name,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        label_smoothing=eps,
        logratio_clip=clip,
        layout=layout,
        reduction="none",
    )
    (grad,) = torch.autograd.grad(loss, p, upstream)

    pair = torch.arange(2 * B) // 2 if layout == "interleaved" else torch.arange(2 * B) % B
    winner = (torch.arange(2 * B) % 2 == 0) if layout == "interleaved" else torch.arange(2 * B) < B
    t, m, w = target[pair], mask[pair], weight[pair]
    inv = 1 / m.sum(dim=(1, 2, 3))
    e = ((pred - t) ** 2 * m).sum(dim=(1, 2, 3)) * inv
    e_ref = ((ref - t) ** 2 * m).sum(dim=(1, 2, 3)) * inv
    d_raw = beta / 2 * w * (e_ref - e)
    d = clip * torch.tanh(d_raw / clip)
    psi_rows = F_PRIME[name](torch.exp(d), alpha)
    z = torch.zeros(B, dtype=torch.float64).index_add(0, pair, torch.where(winner, gamma, -gamma) * psi_rows)
    dloss_dz = -(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)
    torch.testing.assert_close(loss, (1 - eps) * F.softplus(-z) + eps * F.softplus(z), rtol=1e-10, atol=0)
    sign = torch.where(winner, -1.0, 1.0).double()
    coef = (
        sign
        * (dloss_dz * upstream)[pair]
        * gamma
        * PSI_PRIME[name](d, alpha)
        / torch.cosh(d_raw / clip) ** 2
        * beta
        / 2
        * w
        * 2
        * inv
    )
    expected = coef[:, None, None, None] * m * (pred - t)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-13 * expected.abs().max().item())
