"""diffusers' --loss_type (sigmoid, hinge, ipo) on the f-divergence logit, and the flow trainers' error reduction
over all elements: every backend against the float64 reference, and the reference against the trainers' formulas."""

import pytest
import torch
import torch.nn.functional as F
from harness import cpu_backend_params

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss, get_divergence
from fdiv_kernels.divergences import psi_slope

BACKENDS = cpu_backend_params()  # tests/harness.py: skip marks with the backend registry's reason


def _inputs(B=4, shape=(3, 6, 5), seed=0, spread=0.03):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2 * B, *shape, generator=g, dtype=torch.float64)
    ref = pred + spread * torch.randn(pred.shape, generator=g, dtype=torch.float64)
    target = torch.randn(2 * B, *shape, generator=g, dtype=torch.float64)  # distinct targets for w and l
    return pred, ref, target


def _value_and_grad(fn, pred, *args, **kwargs):
    pred = pred.detach().clone().requires_grad_()
    loss = fn(pred, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    return loss.detach(), grad


LOSS_CASES = [
    dict(loss_type="hinge"),
    dict(loss_type="ipo", ipo_tau=0.5),
    dict(loss_type="ipo", ipo_tau=0.01),
    dict(loss_type="ipo", ipo_tau=50.0),  # margin 0.01, close to the logits: 2(z - m) loses precision in fp32
]
_U32 = 2.0**-24  # float32's unit roundoff
_LOG_SLOPE_RATE = {"reverse_kl": 0.0, "js": 1.0, "hellinger": 0.5}  # max |d log psi'(d) / dd|


def _logit_error_bound(pred, ref, target, beta, divergence):
    """Per pair, a bound on the fp32 kernels' logit error, derived from their computation: each row's e_ref - e is a
    D-term fp32 sum of (ref - pred)(ref + pred - 2t), within (D + 3) u of the sum of the terms' magnitudes (each
    product's rounding and recursive summation's worst case), then scaled by beta/2 into d; z = psi(d_w) - psi(d_l)
    moves by psi'(d) times that. Returns (dz, dd [2B], d [2B]) in float64."""
    rows = pred.shape[0]
    terms = ((ref - pred) * (ref + pred - 2 * target)).reshape(rows, -1)
    D = terms.shape[1]
    dd = beta / 2 * (D + 3) * _U32 * terms.abs().sum(1) / D
    d = beta / 2 * terms.mean(1)
    slope = psi_slope(get_divergence(divergence), d)
    B = rows // 2
    dz = slope[:B] * dd[:B] + slope[B:] * dd[B:]
    return dz, dd, d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("divergence", ["reverse_kl", "js", "hellinger"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_types_match_the_reference(backend, case, divergence, reduction):
    """Every backend against the float64 reference, within bounds derived from the fp32 logit's error dz (see
    _logit_error_bound) plus 2e-5 for the rest of the fp32 arithmetic: the loss moves by |dloss/dz| dz (+ dz^2 for
    ipo's square); each gradient row by dz / |z - m| relative (ipo's dloss/dz = 2(z - m), which loses all precision
    as z nears the margin m) and by the slope's own sensitivity |d log psi'/dd| dd. A fixed 2e-5 rejected correct
    code at ipo_tau = 50, where |z - m| is small (issue 25)."""
    pred, ref, target = _inputs()
    beta = 400.0
    kwargs = dict(beta=beta, divergence=divergence, reduction=reduction, **case)
    exact_loss, exact_grad = _value_and_grad(fdpo_loss_reference, pred, ref, target, **kwargs)
    loss, grad = _value_and_grad(fused_fdpo_loss, pred.float(), ref.float(), target.float(), backend=backend, **kwargs)
    _, stats = fdpo_loss_reference(pred, ref, target, return_stats=True, **{**kwargs, "reduction": "none"})
    dz, dd, _ = _logit_error_bound(pred, ref, target, beta, divergence)
    if case["loss_type"] == "ipo":
        gap = (stats.logits - 1.0 / (2.0 * case["ipo_tau"])).abs()
        loss_slack, grad_rel = 2 * gap * dz + dz**2, dz / gap
    else:  # hinge: slope -1 below 1, 0 above; no logit is within its error of the kink
        assert ((stats.logits - 1).abs() > dz).all()
        loss_slack, grad_rel = dz, torch.zeros_like(dz)
    loss_slack = loss_slack.mean() if reduction == "mean" else loss_slack
    assert ((loss.double() - exact_loss).abs() <= 2e-5 * exact_loss.abs() + 1e-6 + loss_slack).all()
    dims = tuple(range(1, pred.dim()))
    scale = exact_grad.abs().amax(dim=dims).clamp_min(1e-30)
    row_rel = 2e-5 + torch.cat([grad_rel, grad_rel]) + _LOG_SLOPE_RATE[divergence] * dd
    worst = ((grad.double() - exact_grad).abs().amax(dim=dims) / scale / row_rel).max().item()
    assert worst <= 1.0, f"gradient error is {worst:.2f}x its derived bound"


def test_hinge_is_exactly_zero_past_the_margin_and_linear_before():
    """relu(1 - z): no gradient once a pair's logit passes 1, slope -1 on z before."""
    pred, ref, target = _inputs(B=2)
    ref[:2] = target[:2]  # winners: the reference is perfect, so the policy is worse (z < 0)
    loss, stats = fdpo_loss_reference(
        pred, ref, target, beta=2.0, loss_type="hinge", reduction="none", return_stats=True
    )
    torch.testing.assert_close(loss, torch.relu(1 - stats.logits))


# ---------------------------------------------------------------------------------------------- trainer parity
def _sd15_script_losses(model_pred, ref_pred, target, beta_dpo, loss_type, ipo_beta=None):
    """diffusers' train_diffusion_dpo.py (SD1.5): its loss block, verbatim in substance."""
    model_losses = F.mse_loss(model_pred, target, reduction="none").mean(dim=list(range(1, model_pred.ndim)))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = F.mse_loss(ref_pred, target, reduction="none").mean(dim=list(range(1, ref_pred.ndim)))
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        return -1 * F.logsigmoid(beta_dpo * logits).mean()
    if loss_type == "hinge":
        return torch.relu(1 - beta_dpo * logits).mean()
    return ((logits - 1 / (2 * ipo_beta)) ** 2).mean()  # the script reads an undefined args.beta here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_reverse_kl_reproduces_diffusers_sd15_loss_types(backend, loss_type):
    """reverse_kl with beta_convention="full" is the script's loss for each --loss_type; for ipo, whose logits the
    script does not scale by beta_dpo, pass beta=1 and the intended tau as ipo_tau (docs/dropin.md)."""
    pred, ref, target = _inputs(B=3, spread=0.3)
    beta_dpo, tau = 25.0, 0.1
    if loss_type == "ipo":
        kwargs = dict(beta=1.0, beta_convention="full", loss_type="ipo", ipo_tau=tau)
    else:
        kwargs = dict(beta=beta_dpo, beta_convention="full", loss_type=loss_type)
    expected, expected_grad = _value_and_grad(_sd15_script_losses, pred, ref, target, beta_dpo, loss_type, tau)
    assert expected.item() > 1e-3  # a case where the loss is not trivially 0
    loss, grad = _value_and_grad(fused_fdpo_loss, pred.float(), ref.float(), target.float(), backend=backend, **kwargs)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6 * expected_grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_mask", [False, True])
def test_mean_all_is_the_flow_trainers_masked_mean_over_every_element(backend, shared_mask):
    """SimpleTuner-style trainers: e = mean over all elements of (pred - t)^2 * mask (not over the mask)."""
    B = 3
    pred, ref, target = _inputs(B=B)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(B if shared_mask else 2 * B, *pred.shape[1:], generator=g) > 0.4).double()
    full_mask = torch.cat([mask, mask]) if shared_mask else mask
    dims = list(range(1, pred.ndim))

    def trainer(p):
        e = ((p - target) ** 2 * full_mask).mean(dims)
        e_ref = ((ref - target) ** 2 * full_mask).mean(dims)
        gap = e_ref - e
        return -F.logsigmoid(0.5 * 300.0 * (gap[:B] - gap[B:])).mean()

    expected, expected_grad = _value_and_grad(trainer, pred)
    kwargs = dict(beta=300.0, mask=mask, err_reduction="mean_all")
    ref_loss, _ = _value_and_grad(fdpo_loss_reference, pred, ref, target, **kwargs)
    torch.testing.assert_close(ref_loss, expected)
    masked_mean, _ = _value_and_grad(fdpo_loss_reference, pred, ref, target, beta=300.0, mask=mask)
    assert (masked_mean - expected).abs() > 1e-3  # the two reductions really differ here
    kwargs["mask"] = mask.float()
    loss, grad = _value_and_grad(fused_fdpo_loss, pred.float(), ref.float(), target.float(), backend=backend, **kwargs)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6 * expected_grad.abs().max().item())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="ipo"), r"loss_type='ipo' needs ipo_tau"),
        (dict(loss_type="hinge", ipo_tau=0.1), r"ipo_tau is used by loss_type='ipo' only"),
        (dict(loss_type="ipo", ipo_tau=-1.0), r"ipo_tau must be > 0"),
        (dict(loss_type="hinge", label_smoothing=0.1), r"label_smoothing applies to loss_type='sigmoid' only"),
        (dict(loss_type="logistic"), r"loss_type='logistic' is not supported; expected one of \['sigmoid'"),
        (
            dict(err_reduction="max"),
            r"err_reduction='max' is not supported; expected one of \['mean', 'sum', "
            r"'mean_all'\]",
        ),
    ],
)
def test_bad_loss_type_arguments_are_named(kwargs, message):
    pred, ref, target = _inputs(B=1)
    for fn in (fused_fdpo_loss, fdpo_loss_reference):
        with pytest.raises(ValueError, match=message):
            fn(pred, ref, target, **kwargs)
