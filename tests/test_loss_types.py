"""diffusers' --loss_type (sigmoid, hinge, ipo) and Diffusion-SDPO's DMPO on the f-divergence logit, MaPO's
reference-free head in the kernels' epilogue, and the flow trainers' error reduction over all elements: every
backend against the float64 reference, the reference against the trainers' formulas, DMPO's head against mpmath where
p is near 0 and 1, MaPO's phi against mpmath near 0, across the series' edge and past float32's exp range."""

import functools
import math

import mpmath
import pytest
import torch
import torch.nn.functional as F
from harness import BF16, F32, as64, assert_close, check_against_reference, cpu_backend_params, make_inputs, run

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
    dict(loss_type="dmpo", dmpo_alpha=0.01),
    dict(loss_type="dmpo", dmpo_alpha=0.7),
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
        (dict(loss_type="hinge", label_smoothing=0.1), r"label_smoothing is used by loss_type=.sigmoid. only"),
        (dict(loss_type="logistic"), r"loss_type='logistic' is not supported; expected one of \['sigmoid'"),
        (dict(loss_type="dmpo"), r"loss_type='dmpo' needs dmpo_alpha in \(0, 1\)"),
        (dict(loss_type="dmpo", dmpo_alpha=0.0), r"dmpo_alpha must be in \(0, 1\).*got 0.0"),
        (dict(loss_type="dmpo", dmpo_alpha=1.0), r"dmpo_alpha must be in \(0, 1\).*got 1.0"),
        (dict(loss_type="dmpo", dmpo_alpha=float("nan")), r"dmpo_alpha must be finite"),
        (dict(loss_type="sigmoid", dmpo_alpha=0.01), r"dmpo_alpha is used by loss_type='dmpo' only"),
        (dict(loss_type="dmpo", dmpo_alpha=0.01, label_smoothing=0.1), r"label_smoothing is used by loss_type="),
        # MaPO's head computes in float32: beta and its gradient scale beta s T must fit (the kernels' mapo_pair_head)
        (dict(loss_type="mapo", beta=5e38), r"beta and beta \* mapo_snr \* mapo_timesteps .* float32's range"),
        (dict(loss_type="mapo", beta=1e36), r"mapo_timesteps \(5e\+38\), the gradient's scale, must be within"),
        (dict(loss_type="mapo", mapo_snr=1e39), r"mapo_snr=1e\+39 is beyond float32's range"),
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


# ---------------------------------------------------------------------------------------------- DMPO
def _sdpo_dmpo_loss(model_pred, ref_pred, target, beta_dpo, dmpo_alpha):
    """Diffusion-SDPO's DMPO loss and logged scalars, written from AIDC-AI/Diffusion-SDPO@84fb241c1b89705a247da8b0d60
    47798ca49830d:train.py:1181-1233 (its loss block with --train_method dmpo and no winner preserving, so that
    lose_l_scale = 1): inside_term = -beta_dpo/2 * (model_diff - ref_diff), p = sigmoid(inside_term),
    q = clamp(1 - dmpo_alpha, 1e-6, 1 - 1e-6), loss = mean(p (log p - log q) + (1 - p)(log(1 - p) - log(1 - q)))
    with log p = -softplus(-u), log(1 - p) = -softplus(u). Returns (loss, implicit_acc, raw_model_loss,
    raw_ref_loss, inside_term)."""
    dims = list(range(1, model_pred.ndim))
    model_losses = (model_pred - target).pow(2).mean(dim=dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=dims)
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    raw_ref_loss = ref_losses.mean()
    inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().double() / inside_term.size(0)
    p = torch.sigmoid(inside_term)
    q = torch.tensor([1.0 - dmpo_alpha], dtype=p.dtype).clamp(1e-6, 1 - 1e-6)
    log_p, log_1mp = -F.softplus(-inside_term), -F.softplus(inside_term)
    loss = (p * (log_p - torch.log(q)) + (1 - p) * (log_1mp - torch.log1p(-q))).mean()
    return loss, implicit_acc, raw_model_loss, raw_ref_loss, inside_term


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_reverse_kl_dmpo_reproduces_diffusion_sdpo(backend):
    """reverse_kl + loss_type="dmpo" is Diffusion-SDPO's DMPO (beta_dpo as beta, half convention): loss, gradient,
    logits and the logged implicit_acc / raw_model_loss / raw_ref_loss, in float64 (fp32 kernels: their tolerance),
    on pairs whose p = sigmoid(z) spreads across (0.05, 0.95) on both sides of q."""
    pred, ref, target = _inputs(B=6, spread=0.3, seed=2)
    beta_dpo, dmpo_alpha = 40.0, 0.3  # q = 0.7: logit q = 0.85 sits inside the logits' range
    pred.requires_grad_()
    loss, acc, raw_model, raw_ref, z = _sdpo_dmpo_loss(pred, ref, target, beta_dpo, dmpo_alpha)
    (expected_grad,) = torch.autograd.grad(loss, pred)
    p = torch.sigmoid(z.detach())
    assert ((p > 0.05) & (p < 0.95)).sum() >= 4 and (p < 0.7).any() and (p > 0.7).any(), p  # not saturated
    assert 0 < acc < 1
    kwargs = dict(beta=beta_dpo, loss_type="dmpo", dmpo_alpha=dmpo_alpha, return_stats=True)
    if backend == "reference":
        dtype, rtol, atol = torch.float64, 1e-12, 1e-14
        got, stats = fdpo_loss_reference(pred, ref, target, **kwargs)
    else:
        dtype, rtol, atol = torch.float32, 2e-5, 1e-6
        x = pred.detach().float().requires_grad_()
        got, stats = fused_fdpo_loss(x, ref.float(), target.float(), backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(got, pred if backend == "reference" else x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), loss.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(stats.logits.double(), z.detach(), rtol=rtol, atol=atol)
    assert stats.implicit_acc.item() == acc.to(dtype).item()  # the same count, rounded to the output dtype
    torch.testing.assert_close(stats.raw_model_loss.double(), raw_model.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(stats.raw_ref_loss.double(), raw_ref, rtol=rtol, atol=atol)
    scale = expected_grad.abs().max()
    torch.testing.assert_close(grad.double() / scale, expected_grad / scale, rtol=0, atol=10 * rtol)


def _dmpo_exact(z, alpha):
    """KL(p || q) of p = sigmoid(z), q = 1 - alpha, and its derivative p (1 - p) (z - logit q), in 60 digits."""
    with mpmath.workdps(60):
        z, a = mpmath.mpf(z), mpmath.mpf(alpha)
        q = 1 - a
        p, p_lose = 1 / (1 + mpmath.exp(-z)), 1 / (1 + mpmath.exp(z))
        loss = p * (mpmath.log(p) - mpmath.log(q)) + p_lose * (mpmath.log(p_lose) - mpmath.log(a))
        slope = p * p_lose * (z - mpmath.log(q / a))
        # the derivative identity itself, by mpmath's numerical differentiation of the loss
        kl = lambda x: (  # noqa: E731
            mpmath.log(1 + mpmath.exp(-x)) * (-1 / (1 + mpmath.exp(-x)))
            - mpmath.log(1 + mpmath.exp(x)) / (1 + mpmath.exp(x))
            - mpmath.log(q) / (1 + mpmath.exp(-x))
            - mpmath.log(a) / (1 + mpmath.exp(x))
        )
        if abs(z) < 50:
            assert abs(mpmath.diff(kl, z) - slope) <= mpmath.mpf(10) ** -40 * (1 + abs(slope))
        return float(loss), float(slope)


# |z| up to ~700 in float64 (p down to e^-700) and ~80 in float32 (e^-80 ~ 1.8e-35, still a normal float32)
_DMPO_Z = {
    torch.float64: [-700.0, -300.0, -40.0, -5.5, -0.5, 0.25, 3.0, 20.0, 37.0, 80.0, 300.0, 700.0],
    torch.float32: [-80.0, -40.0, -17.0, -5.5, -0.5, 0.25, 3.0, 17.0, 40.0, 80.0],
}


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_dmpo_head_matches_mpmath_with_p_near_0_and_1(backend, dtype):
    """The DMPO loss and its gradient against mpmath, with z chosen exactly: D = 1, e = (1.5 - 0.5)^2 = 1 for every
    row and ref_err = 1 + |z| on the winner (z > 0) or the loser (z < 0), so d = ref_err - e is exact (beta = 2,
    half convention) and z = d_w - d_l. The gradient is -2 L'(z) on the winner's row and +2 L'(z) on the loser's."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton computes in float32 only (float64 input is refused: tests/test_kernels.py)")
    alpha = 0.01
    zs = torch.tensor(_DMPO_Z[dtype], dtype=torch.float64)
    B = zs.numel()
    ref_err = torch.ones(2 * B, dtype=torch.float64)
    ref_err[:B] += zs.clamp_min(0)
    ref_err[B:] += (-zs).clamp_min(0)
    pred = torch.full((2 * B, 1), 1.5, dtype=dtype, requires_grad=True)
    target = torch.full((2 * B, 1), 0.5, dtype=dtype)
    kwargs = dict(beta=2.0, loss_type="dmpo", dmpo_alpha=alpha, reduction="none", return_stats=True)
    fn = fdpo_loss_reference if backend == "reference" else functools.partial(fused_fdpo_loss, backend=backend)
    loss, stats = fn(pred, None, target, ref_err=ref_err.to(dtype), **kwargs)
    assert torch.equal(stats.logits.double(), zs)  # the inputs give exactly the intended logits
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    exact = [_dmpo_exact(z, alpha) for z in zs.tolist()]
    exact_loss = torch.tensor([e[0] for e in exact], dtype=torch.float64)
    exact_slope = torch.tensor([e[1] for e in exact], dtype=torch.float64)
    assert exact_slope.abs().min() > torch.finfo(dtype).tiny  # every case has a normal, non-zero gradient to check
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    # the loss is in [0, -log alpha]: relative error, and absolute error on the scale of its O(1) terms
    torch.testing.assert_close(loss.double(), exact_loss, rtol=rtol, atol=rtol * -math.log(alpha))
    torch.testing.assert_close(grad[:B, 0].double(), -2 * exact_slope, rtol=rtol, atol=0)
    torch.testing.assert_close(grad[B:, 0].double(), 2 * exact_slope, rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------------------- MaPO (kernel head)
# dtype of (model_pred, target and mask): one low-precision dtype, or fp32 predictions with bf16 targets and masks
_MAPO_DTYPES = {"fp32": (F32, F32), "bf16": (BF16, BF16), "mixed": (F32, BF16)}
# T <= 80 keeps |z| <= T (phi is in (0, 1] for e >= 0) where sigmoid(-z) is a normal float32: every row's gradient
# keeps its relative precision, so each row is compared against its own scale
_MAPO_CASES = [
    dict(beta=0.1, mapo_timesteps=50.0),
    dict(beta=5.0, mapo_snr=0.9, mapo_timesteps=3.0, reduction="none", err_reduction="mean_all"),
]


def _mapo_inputs(dtypes, mask, layout, seed=0):
    pred_dtype, other = dtypes
    inputs = make_inputs(B=3, shape=(3, 7, 5), dtype=pred_dtype, mask=mask, layout=layout, seed=seed)
    del inputs["ref_pred"]  # reference-free
    inputs["target"] = inputs["target"].to(other)
    if mask is not None:
        inputs["mask"] = inputs["mask"].to(other)
    return inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", list(_MAPO_DTYPES), ids=list(_MAPO_DTYPES))
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
@pytest.mark.parametrize("mask", [None, "per_sample", "shared"])
@pytest.mark.parametrize("case", _MAPO_CASES, ids=["mean", "none-mean_all"])
def test_mapo_matches_the_reference(backend, dtypes, layout, mask, case):
    """loss_type="mapo" in every backend's epilogue against the float64 reference (reference.py's own MaPO, autograd
    of x / expm1(x)): loss, every statistic (logratio s e, reward phi(s e), ref_err 0) and the gradient, with the
    dtype's tolerances. The empty mask of row 0 gives e = 0, phi = 1 on that row."""
    inputs = _mapo_inputs(_MAPO_DTYPES[dtypes], mask, layout)
    upstream = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) if case.get("reduction") == "none" else None
    _, stats, _ = check_against_reference(backend, inputs, upstream, loss_type="mapo", layout=layout, **case)
    assert not stats["ref_err"].any() and not stats["raw_ref_loss"].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mapo_with_the_authors_defaults_matches_the_reference(backend):
    """beta 0.1, s 0.5, T 1000 (MaPO's script): z reaches tens, where sigmoid(-z) of a loser's row underflows float32
    long before float64; the gradient is compared against the whole tensor's scale (a winner's dL/de_w >= 1)."""
    inputs = _mapo_inputs((F32, F32), "per_sample", "halves", seed=3)
    loss, stats, grad = run(backend, inputs, loss_type="mapo", beta=0.1)
    loss_r, stats_r, grad_r = run("reference", as64(inputs), loss_type="mapo", beta=0.1)
    assert_close(loss, loss_r, 2e-5, "loss")
    for name in ("logits", "model_err", "logratio", "reward"):
        assert_close(stats[name], stats_r[name], 2e-5, name)
    assert_close(grad, grad_r, 4e-5, "grad")


def _mapo_exact(e_w, e_l, beta, snr, timesteps):
    """MaPO's per-pair loss, logit, scores and dL/de_w, dL/de_l in 60 digits; phi'(x) = (e^x - 1 - x e^x) /
    (e^x - 1)^2, checked against mpmath's numerical derivative of x / (e^x - 1)."""
    with mpmath.workdps(60):
        phi = lambda x: x / mpmath.expm1(x)  # noqa: E731
        slope = lambda x: (mpmath.expm1(x) - x * mpmath.exp(x)) / mpmath.expm1(x) ** 2  # noqa: E731
        x_w, x_l = snr * mpmath.mpf(e_w), snr * mpmath.mpf(e_l)
        for x in (x_w, x_l):
            assert abs(mpmath.diff(phi, x) - slope(x)) <= mpmath.mpf(10) ** -40 * (1 + abs(slope(x)))
        z = timesteps * (phi(x_w) - phi(x_l))
        loss = e_w + beta * mpmath.log1p(mpmath.exp(-z))
        k = beta / (1 + mpmath.exp(z)) * timesteps * snr  # beta sigmoid(-z) T s
        return [float(v) for v in (loss, z, phi(x_w), phi(x_l), 1 - k * slope(x_w), k * slope(x_l))]


# winner / loser residuals r (D = 1, target 0, e = r^2 exact in float32), s = 0.5 so x = r^2 / 2: x tiny (2^-21),
# both sides of the series' edge |x| = 0.5 (and x = 0.5 itself, the direct branch), moderate, and past float32's
# exp range (x = 98 and 91.1: phi underflows to 0 there in float32, phi' too)
_MAPO_R = [(2.0**-10, 2.0**-9), (255 / 256, 257 / 256), (1.0, 0.75), (1.5, 2.0), (14.0, 13.5), (0.5, 14.0)]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_mapo_phi_near_0_across_the_series_edge_and_past_exp_range_matches_mpmath(backend, dtype):
    """The MaPO loss, logits, scores and gradient against mpmath at chosen errors (beta = T = 1, so sigmoid(-z) is
    O(1) and every phi' term counts): the kernels' series below |x| = 0.5 (truncation < 3e-11 relative, hence
    fp64's 1e-9), x / expm1(x) above it, 0 once e^x overflows (an absolute error below 1e-30)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton computes in float32 only (float64 input is refused: tests/test_kernels.py)")
    if backend == "reference" and dtype == torch.float32:
        pytest.skip(
            "the reference is the float64 oracle: in float32 its autograd of x / expm1(x) overflows past x ~ 44"
        )
    B = len(_MAPO_R)
    r = torch.tensor([w for w, _ in _MAPO_R] + [lo for _, lo in _MAPO_R], dtype=torch.float64)
    pred = r.to(dtype)[:, None].requires_grad_(True)
    kwargs = dict(loss_type="mapo", beta=1.0, mapo_snr=0.5, mapo_timesteps=1.0, reduction="none", return_stats=True)
    fn = fdpo_loss_reference if backend == "reference" else functools.partial(fused_fdpo_loss, backend=backend)
    loss, stats = fn(pred, None, torch.zeros_like(pred), **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    exact = torch.tensor([_mapo_exact(w * w, lo * lo, 1.0, 0.5, 1.0) for w, lo in _MAPO_R], dtype=torch.float64)
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    close = functools.partial(torch.testing.assert_close, rtol=rtol, atol=1e-30)
    assert torch.equal(stats.model_err.double(), r * r) and torch.equal(stats.logratio.double(), r * r / 2)
    close(loss.double(), exact[:, 0])
    torch.testing.assert_close(stats.logits.double(), exact[:, 1], rtol=rtol, atol=rtol)  # phi_w - phi_l cancels
    close(stats.reward.double(), torch.cat([exact[:, 2], exact[:, 3]]), atol=1e-37)  # phi(91.1) ~ 3e-38: 0 in fp32
    close(grad[:B, 0].double(), 2 * r[:B] * exact[:, 4])  # dL/de * de/dpred, de/dpred = 2 r
    close(grad[B:, 0].double(), 2 * r[B:] * exact[:, 5])
