"""heads.py: MaPO (loss_type="mapo"), Diffusion-SDPO's winner-preserving safeguard (sdpo_mu) and Diffusion-KTO
(fused_kto_loss) on the fused passes.

1. Parity: each head, fused (every backend) and the package's float64 reference, against its authors' formula
   written here in float64 from their repositories (cited at each formula): loss, gradient, logged statistics.
2. Every backend x dtype (fp32, fp16, bf16, and fp32 model_pred with bf16 target/reference as Accelerate gives) x
   odd sizes, 4-D/5-D, masks, layouts, against the float64 reference on fresh random inputs (harness tolerances).
3. Numerics: mapo_phi (phi and phi') against mpmath from x = 0 to 1e3, past exp's range; SDPO where g_l . g_w <= 0;
   KTO's reference point given vs computed.
4. Errors name the argument; KTO under torch.distributed never computes its reference point per process silently.
5. torch.compile of each head (cpu backend) matches eager.
"""

from __future__ import annotations

import math
import zlib

import mpmath
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import BETA, BF16, F16, F32, F64, TOL, Tol, assert_close, cpu_backend_params, make_inputs, rows_of_pairs

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss, fused_kto_loss, kto_loss_reference
from fdiv_kernels.backends.torch_backend import mapo_phi

BACKENDS = cpu_backend_params()  # cpu, torch, triton (TRITON_INTERPRET on CPU): skip marks with the registry's reason
EPS32 = torch.finfo(F32).eps


def _grad(loss, x, upstream=None):
    """d (loss * upstream).sum() / d x (upstream: a non-unit weight per element of an unreduced loss)."""
    total = loss.sum() if upstream is None else (loss * upstream.to(loss)).sum()
    (g,) = torch.autograd.grad(total, x)
    return g


def _close(actual, expected, rtol, atol=0.0, name=""):
    torch.testing.assert_close(
        torch.as_tensor(actual).double(),
        torch.as_tensor(expected).double(),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{name}: {m}",
    )


def _grad_close(actual, expected, rel, name="grad"):
    """Each row against its own scale (max |expected| over the row)."""
    e = expected.double()
    scale = e.abs().reshape(e.shape[0], -1).amax(dim=1).clamp_min(1e-300).reshape(-1, *([1] * (e.dim() - 1)))
    _close(actual.double() / scale, e / scale, rtol=0, atol=rel, name=name)


# ============================================================================================== 1. parity: MaPO


def _mapo_authors(model_pred, target, snr, timesteps, beta_mapo):
    """MaPO's loss and logs, written from mapo-t2i/mapo@374b3d3dd21d1c15a511547df46d355c9a6b8931:utils.py:286-301
    (compute_loss: per-sample MSE over the non-batch dims, chunk into winners and losers, log_odds = s m_w /
    (exp(s m_w) - 1) - s m_l / (exp(s m_l) - 1), ratio = logsigmoid(log_odds * T), loss = m_w.mean() -
    beta_mapo * ratio.mean()) and train.py:487-498 (its logged "Win Score" / "Lose Score": the means of
    s m / (exp(s m) - 1) over winners / losers). Float64, as written there (exp(x) - 1, not expm1)."""
    model_losses = F.mse_loss(model_pred, target, reduction="none").mean(dim=list(range(1, model_pred.ndim)))
    m_w, m_l = model_losses.chunk(2)
    score_w = (snr * m_w) / (torch.exp(snr * m_w) - 1)
    score_l = (snr * m_l) / (torch.exp(snr * m_l) - 1)
    log_odds = score_w - score_l
    ratio = F.logsigmoid(log_odds * timesteps)
    loss = m_w.mean() - (beta_mapo * ratio).mean()
    logs = {"win_score": score_w.mean(), "lose_score": score_l.mean(), "logits": log_odds * timesteps}
    return loss, logs, model_losses


def _mapo_case(name):
    """(model_pred, target, T) float64 with MaPO's logit T (phi_w - phi_l) in its unsaturated range. "close":
    T = 1000 (MaPO's own), the loser's residual a small rescaling of the winner's (errors within ~1 %); "t50":
    independent residuals, T = 50; "small": errors ~ 0.1 (x = s e below the series switch), T = 300."""
    g = torch.Generator().manual_seed(7)
    B, shape = 5, (4, 6, 5)
    target = torch.randn(B, *shape, generator=g, dtype=F64).repeat(2, 1, 1, 1)  # MaPO: the same noise for w and l
    r_w = torch.randn(B, *shape, generator=g, dtype=F64)
    if name == "close":
        r_l = r_w * (1 + 0.004 * torch.randn(B, 1, 1, 1, generator=g, dtype=F64))
        return target + torch.cat([r_w, r_l]), target, 1000.0
    sigma = 0.3 if name == "small" else 1.0
    r_l = torch.randn(B, *shape, generator=g, dtype=F64)
    return target + sigma * torch.cat([r_w, r_l]), target, 300.0 if name == "small" else 50.0


def _mapo_logit_slack(model_losses, snr, timesteps):
    """The fp32 head's absolute error on the logit T (phi(s e_w) - phi(s e_l)): T times a few ulps of each phi and
    of its change s phi' e under e's own rounding (phi' <= 1/2 in size, phi <= 1 for x >= 0)."""
    return timesteps * 8 * EPS32 * (2 + snr * model_losses.max().item())


@pytest.mark.parametrize("case", ["close", "t50", "small"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_mapo_reproduces_the_authors_loss_gradient_and_scores(backend, case):
    pred, target, T = _mapo_case(case)
    snr, beta = 0.5, 0.1
    x = pred.clone().requires_grad_()
    loss_a, logs, model_losses = _mapo_authors(x, target, snr, T, beta)
    grad_a = _grad(loss_a, x)
    z = logs["logits"].detach()
    assert (z > 0).any() and (z < 0).any() and (z.abs() < 4).sum() >= 3, z  # the logit's interesting range
    if case == "small":
        assert (snr * model_losses < 0.5).all()  # the series branch of mapo_phi
    kw = dict(loss_type="mapo", beta=beta, mapo_snr=snr, mapo_timesteps=T, return_stats=True)
    if backend == "reference":
        y = pred.clone().requires_grad_()
        loss, stats = fdpo_loss_reference(y, None, target, **kw)
        rtol, slack, grad_rel = 1e-10, 0.0, 1e-10
    else:
        y = pred.float().requires_grad_()
        loss, stats = fused_fdpo_loss(y, None, target.float(), backend=backend, **kw)
        rtol, slack = 2e-5, _mapo_logit_slack(model_losses, snr, T)
        grad_rel = 4e-5 + slack
    grad = _grad(loss, y)
    B = pred.shape[0] // 2
    _close(loss, loss_a, rtol, atol=beta * slack, name="loss")
    _close(stats.logits, z, rtol, atol=slack, name="logits")
    _close(stats.reward[:B].mean(), logs["win_score"], rtol, name="Win Score")
    _close(stats.reward[B:].mean(), logs["lose_score"], rtol, name="Lose Score")
    _close(stats.model_err, model_losses, rtol, name="model_err")
    _close(stats.logratio, snr * model_losses, rtol, name="logratio (s e)")
    assert stats.implicit_acc.item() == pytest.approx((z > 0).double().mean().item())
    _grad_close(grad, grad_a, grad_rel)


# ============================================================================================== 1. parity: SDPO


def _sdpo_authors_lambda(model_pred, target, mu, eps=1e-9, max_lambda=1.0):
    """Diffusion-SDPO's lambda, written from AIDC-AI/Diffusion-SDPO@84fb241c1b89705a247da8b0d6047798ca49830d:
    train.py:84-124 (get_adaptive_lose_l_scale): A, B = the batch-mean squared errors of the winner and loser
    halves, g_A, g_B their gradients in the predictions by autograd, lam = (1 - mu) |g_A|^2 / (g_B . g_A + eps)
    where g_B . g_A > 0, else max_lambda, clamped to [0, max_lambda], detached."""
    pred_w, pred_l = model_pred.detach().requires_grad_(True).chunk(2)
    true_w, true_l = target.detach().chunk(2)
    with torch.enable_grad():
        g_a = torch.autograd.grad(((pred_w - true_w) ** 2).mean(), pred_w)[0]
        g_b = torch.autograd.grad(((pred_l - true_l) ** 2).mean(), pred_l)[0]
    num, den = g_a.flatten().pow(2).sum(), (g_b.flatten() * g_a.flatten()).sum()
    lam = torch.where(den > 0, (1.0 - mu) * num / (den + eps), torch.tensor(max_lambda, dtype=num.dtype))
    return lam.clamp(0.0, max_lambda).detach(), den


def _sdpo_authors_loss(model_pred, ref_pred, target, beta_dpo, mu, method, dmpo_alpha=0.3):
    """Diffusion-SDPO's loss block, train.py:1186-1209 (model_losses_l_scaled = sg(m_l) + lam (m_l - sg(m_l)),
    inside_term = -beta_dpo / 2 * (model_diff - ref_diff), diffusion-dpo: -logsigmoid(inside_term).mean()) and
    L1220-1233 (dmpo: KL(p || q), p = sigmoid(inside_term), q = clamp(1 - dmpo_alpha, 1e-6, 1 - 1e-6), with log p =
    -softplus(-u), log(1 - p) = -softplus(u)). Returns (loss, lam, inside_term, raw_model_loss, raw_ref_loss)."""
    dims = list(range(1, model_pred.ndim))
    model_losses = (model_pred - target).pow(2).mean(dim=dims)
    m_w, m_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (m_w.mean() + m_l.mean())
    lam, _ = _sdpo_authors_lambda(model_pred, target, mu)
    m_l_scaled = m_l.detach() + lam * (m_l - m_l.detach())
    model_diff = m_w - m_l_scaled
    ref_losses = (ref_pred - target).pow(2).mean(dim=dims)
    r_w, r_l = ref_losses.chunk(2)
    inside = -0.5 * beta_dpo * (model_diff - (r_w - r_l))
    if method == "sigmoid":
        loss = -F.logsigmoid(inside).mean()
    else:
        p = torch.sigmoid(inside)
        q = torch.tensor([1.0 - dmpo_alpha], dtype=p.dtype).clamp(1e-6, 1 - 1e-6)
        log_p, log_1mp = -F.softplus(-inside), -F.softplus(inside)
        loss = (p * (log_p - torch.log(q)) + (1 - p) * (log_1mp - torch.log1p(-q))).mean()
    return loss, lam, inside, raw_model_loss, ref_losses.mean()


def _sdpo_inputs(corr, B=4, shape=(4, 6, 5), seed=3):
    """Float64 (pred, ref, target): the loser's residual corr * the winner's + sqrt(1 - corr^2) * fresh noise, so
    lambda ~ (1 - mu) / corr (corr <= 0: g_l . g_w <= 0); ref = pred + 0.1 N(0, 1) (|inside_term| ~ 1 at beta 100)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * B, *shape, generator=g, dtype=F64)
    r_w = torch.randn(B, *shape, generator=g, dtype=F64)
    r_l = corr * r_w + math.sqrt(1 - corr**2) * torch.randn(B, *shape, generator=g, dtype=F64)
    pred = target + torch.cat([r_w, r_l])
    return pred, pred + 0.1 * torch.randn(pred.shape, generator=g, dtype=F64), target


# corr, mu -> the regime of lambda
SDPO_CASES = {"interior": (0.9, 0.5), "opposed": (-0.6, 0.5), "capped": (0.3, 0.5)}


@pytest.mark.parametrize("method", ["sigmoid", "dmpo"])
@pytest.mark.parametrize("case", list(SDPO_CASES))
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_sdpo_reproduces_the_authors_loss_gradient_and_lambda(backend, case, method):
    """0 < lambda < 1 (correlated winner and loser residuals), g_B . g_A <= 0 (lambda = 1), and a cap
    (1 - mu) |g_A|^2 / g_B . g_A > 1 clamped to 1; sigmoid DPO and DMPO. In the interior case the gradient is
    also checked against the same call without the safeguard: winners' rows unchanged, losers' times lambda."""
    corr, mu = SDPO_CASES[case]
    pred, ref, target = _sdpo_inputs(corr)
    beta = 100.0
    x = pred.clone().requires_grad_()
    loss_a, lam_a, inside, raw_model, raw_ref = _sdpo_authors_loss(x, ref, target, beta, mu, method)
    grad_a = _grad(loss_a, x)
    _, den = _sdpo_authors_lambda(pred, target, mu)
    cap = ((1 - mu) * (2.0 / pred[:4].numel()) ** 2 * (pred[:4] - target[:4]).pow(2).sum() / (den + 1e-9)).item()
    regime = {"interior": 0.1 < lam_a < 0.9, "opposed": den <= 0, "capped": den > 0 and cap > 1.2}[case]
    assert regime and (case == "interior" or lam_a == 1.0), (lam_a, den, cap)
    assert (inside.detach().abs() < 4).sum() >= 2, inside  # the head's gradient is not saturated
    kw = dict(beta=beta, sdpo_mu=mu, loss_type=method, return_stats=True)
    if method == "dmpo":
        kw["dmpo_alpha"] = 0.3
    if backend == "reference":
        y, fn, dtype, rtol = pred.clone().requires_grad_(), fdpo_loss_reference, F64, 1e-10
        args = (ref, target)
    else:
        y, fn, dtype, rtol = pred.float().requires_grad_(), fused_fdpo_loss, F32, 2e-5
        args, kw["backend"] = (ref.float(), target.float()), backend
    loss, stats = fn(y, *args, **kw)
    grad = _grad(loss, y)
    assert loss.dtype == dtype and stats.extra["sdpo_lambda"].dtype == dtype
    _close(loss, loss_a, rtol, atol=1e-7 if dtype == F32 else 0.0, name="loss")
    _close(stats.extra["sdpo_lambda"], lam_a, rtol, name="lambda")
    _close(stats.logits, inside.detach(), rtol, atol=1e-6 if dtype == F32 else 0.0, name="logits")
    _close(stats.raw_model_loss, raw_model, rtol, name="raw_model_loss")
    _close(stats.raw_ref_loss, raw_ref, rtol, name="raw_ref_loss")
    assert stats.implicit_acc.item() == pytest.approx((inside > 0).double().mean().item())
    _grad_close(grad, grad_a, 10 * rtol)
    if case == "interior":  # the safeguard acts on the losers' rows only, by exactly lambda
        kw.pop("sdpo_mu")
        y0 = y.detach().clone().requires_grad_()
        grad0 = _grad(fn(y0, *args, **kw)[0], y0)
        torch.testing.assert_close(grad[:4], grad0[:4])
        torch.testing.assert_close(grad[4:], grad0[4:] * stats.extra["sdpo_lambda"], rtol=10 * rtol, atol=0)


# ============================================================================================== 1. parity: KTO


def _kto_authors(model_pred, ref_pred, target, labels, beta_dpo, lambda_d=1.0, lambda_u=1.0, kl=None):
    """Diffusion-KTO's loss and logs, written from jacklishufan/diffusion-kto@226bbd02580a557f5f516c9185619de8216b55
    00:train_kto_sd_v1.5.py:1451-1483 (--halo sigmoid, --bce_offset none): per-sample MSEs, g = policy_KL_logps -
    reference_KL_logps = ref_loss - model_loss, kl = mean(g) (accelerator.reduce: one process here) clamped at 0
    and detached, label_scale_g = sgn * beta_dpo * (g - kl), loss = mean(w_y (1 - sigmoid(label_scale_g))), w_y =
    lambda_d / lambda_u; logs kl, acc = mean(label_scale_g > 0), raw_model_loss, ref_loss. ``kl`` given: used as the
    reference point's mean (still clamped)."""
    dims = list(range(1, model_pred.ndim))
    model_losses = F.mse_loss(model_pred, target, reduction="none").mean(dim=dims)
    ref_loss = F.mse_loss(ref_pred, target, reduction="none").mean(dim=dims)
    g = -model_losses - (-ref_loss)
    kl = (g.mean() if kl is None else torch.as_tensor(kl, dtype=g.dtype).reshape(())).clamp(min=0).detach()
    labels = labels.long()
    sgn = 2 * labels - 1
    label_scale_g = sgn * beta_dpo * (g - kl)
    binary = labels == 1
    w_y = lambda_d * binary.to(g.dtype) + lambda_u * (~binary).to(g.dtype)  # in float64 (a bool times 0.7 is float32)
    loss = (w_y * (1 - torch.sigmoid(label_scale_g))).mean()
    logs = {
        "kl": kl,
        "logits": label_scale_g,
        "acc": (label_scale_g > 0).sum() / len(label_scale_g),
        "raw_model_loss": model_losses.mean(),
        "ref_loss": ref_loss.mean(),
        "logratio": beta_dpo * g,
    }
    return loss, logs


def _kto_inputs(N=8, shape=(4, 6, 5), seed=5, policy_better=True):
    """Float64 (pred, ref, target); policy_better: ref = pred + 0.1 N(0, 1) (KL > 0 on average), else pred = ref +
    0.1 N(0, 1) (KL < 0: clamped to 0)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(N, *shape, generator=g, dtype=F64)
    a = target + torch.randn(N, *shape, generator=g, dtype=F64)
    b = a + 0.1 * torch.randn(N, *shape, generator=g, dtype=F64)
    return (a, b, target) if policy_better else (b, a, target)


KTO_CASES = {
    "mixed": dict(labels=[1, 0, 1, 1, 0, 0, 1, 0]),
    "kl_clamped": dict(labels=[1, 0, 1, 1, 0, 0, 1, 0], policy_better=False),
    "all_desirable": dict(labels=[1] * 8),
    "all_undesirable": dict(labels=[0] * 8),
    "given_kl": dict(labels=[1, 0, 1, 1, 0, 0, 1, 0], kl=0.004),
    "given_kl_tensor": dict(labels=[0, 0, 1, 1, 0, 1, 1, 0], kl=torch.tensor([0.012], dtype=F64)),
    "weights": dict(labels=[1, 0, 1, 1, 0, 0, 1, 0], lambda_d=1.5, lambda_u=0.7),
}


@pytest.mark.parametrize("case", list(KTO_CASES))
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_kto_reproduces_the_authors_loss_gradient_and_logs(backend, case):
    spec = dict(KTO_CASES[case])
    labels = torch.tensor(spec.pop("labels"))
    pred, ref, target = _kto_inputs(policy_better=spec.pop("policy_better", True))
    lam_d, lam_u, kl = spec.get("lambda_d", 1.0), spec.get("lambda_u", 1.0), spec.get("kl")
    beta = 100.0
    x = pred.clone().requires_grad_()
    loss_a, logs = _kto_authors(x, ref, target, labels, beta, lam_d, lam_u, kl)
    grad_a = _grad(loss_a, x)
    raw_kl = (ref - target).pow(2).mean((1, 2, 3)).mean() - (pred - target).pow(2).mean((1, 2, 3)).mean()
    if case == "kl_clamped":
        assert raw_kl < 0 and logs["kl"] == 0
    elif kl is None:
        assert logs["kl"] > 0
    z = logs["logits"].detach()
    assert (z.abs() < 4).sum() >= 3, z
    kw = dict(
        labels=labels.bool() if case != "mixed" else labels,
        beta=beta,
        beta_convention="full",
        desirable_weight=lam_d,
        undesirable_weight=lam_u,
        return_stats=True,
    )
    if kl is not None:
        kw["kl"] = kl
    if backend == "reference":
        y, fn, dtype, rtol, args = pred.clone().requires_grad_(), kto_loss_reference, F64, 1e-10, (ref, target)
    else:
        y, fn, dtype, rtol = pred.float().requires_grad_(), fused_kto_loss, F32, 2e-5
        args, kw["backend"] = (ref.float(), target.float()), backend
        if isinstance(kl, torch.Tensor):
            kw["kl"] = kl.float()
    loss, stats = fn(y, *args, **kw)
    grad = _grad(loss, y)
    assert loss.dtype == dtype
    _close(loss, loss_a, rtol, atol=1e-7 if dtype == F32 else 0.0, name="loss")
    _close(stats.extra["kl"], logs["kl"], rtol, atol=1e-9 if dtype == F32 else 0.0, name="kl")
    _close(stats.logits, z, rtol, atol=1e-5 if dtype == F32 else 0.0, name="logits")
    _close(stats.logratio, logs["logratio"], rtol, atol=1e-5 if dtype == F32 else 0.0, name="logratio")
    _close(stats.raw_model_loss, logs["raw_model_loss"], rtol, name="raw_model_loss")
    _close(stats.raw_ref_loss, logs["ref_loss"], rtol, name="raw_ref_loss")
    assert stats.implicit_acc.item() == pytest.approx(logs["acc"].item())
    _grad_close(grad, grad_a, 10 * rtol)


def test_kto_reference_takes_an_odd_number_of_rows():
    """kto_loss_reference has no pairing: N = 5 is the authors' formula too (fused_kto_loss refuses it, below)."""
    pred, ref, target = (t[:5] for t in _kto_inputs())
    labels = torch.tensor([1, 0, 0, 1, 1])
    x = pred.clone().requires_grad_()
    loss_a, logs = _kto_authors(x, ref, target, labels, 100.0)
    y = pred.clone().requires_grad_()
    loss, stats = kto_loss_reference(
        y, ref, target, labels=labels, beta=100.0, beta_convention="full", return_stats=True
    )
    _close(loss, loss_a, 1e-12, name="loss")
    _close(stats.extra["kl"], logs["kl"], 1e-12, name="kl")
    _grad_close(_grad(loss, y), _grad(loss_a, x), 1e-11)


# ============================================================================================== 2. the grid

# model_pred's dtype, the others' (mixed: as Accelerate gives); fp64 on the backends that compute in it
DTYPES = {"fp32": (F32, F32), "fp16": (F16, F16), "bf16": (BF16, BF16), "mixed": (F32, BF16), "fp64": (F64, F64)}

GRID = {
    "mapo-4d-halves": ("mapo", dict(shape=(3, 7, 5), layout="halves")),
    "mapo-5d-interleaved-mask": ("mapo", dict(shape=(2, 3, 5, 7), layout="interleaved", mask="per_sample")),
    "mapo-4d-shared-mask-mean_all": (
        "mapo",
        dict(shape=(3, 9, 11), layout="interleaved", mask="shared", shared_target=True, err_reduction="mean_all"),
    ),
    "sdpo-sigmoid-4d-halves": ("sdpo", dict(shape=(3, 7, 5), layout="halves", loss_type="sigmoid")),
    "sdpo-dmpo-js-5d-interleaved": (
        "sdpo",
        dict(shape=(2, 3, 5, 7), layout="interleaved", loss_type="dmpo", divergence="js", shared_target=True),
    ),
    "sdpo-hinge-alpha-ref_err": ("sdpo", dict(shape=(3, 7, 5), loss_type="hinge", divergence="alpha", ref_err=True)),
    "sdpo-ipo-forward_kl-none": (
        "sdpo",
        dict(shape=(3, 9, 11), layout="interleaved", loss_type="ipo", divergence="forward_kl", reduction="none"),
    ),
    "kto-4d-mask": ("kto", dict(shape=(3, 7, 5), mask="per_sample")),
    "kto-js-5d-ref_err": ("kto", dict(shape=(2, 3, 5, 7), divergence="js", ref_err=True)),
    "kto-alpha-mean_all-none": (
        "kto",
        dict(shape=(3, 9, 11), divergence="alpha", mask="per_sample", err_reduction="mean_all", reduction="none"),
    ),
}
MAPO_T, MAPO_SNR = 50.0, 0.5
HEAD_OPTIONS = {"alpha": 0.5, "ipo_tau": 0.5, "dmpo_alpha": 0.3}


def _grid_inputs(head, spec, dtypes, seed):
    """Fresh random inputs (harness.make_inputs, float64), then per head: SDPO's losers' residuals correlated with
    the winners' (0 < lambda < 1 for mu = 0.5); rounded to the dtypes; ref_err from the rounded inputs."""
    spec = dict(spec)
    options = {k: spec.pop(k) for k in ("layout", "loss_type", "divergence", "reduction", "err_reduction") if k in spec}
    if options.get("divergence") == "alpha":
        options["alpha"] = HEAD_OPTIONS["alpha"]
    if options.get("loss_type") == "ipo":
        options["ipo_tau"] = HEAD_OPTIONS["ipo_tau"]
    if options.get("loss_type") == "dmpo":
        options["dmpo_alpha"] = HEAD_OPTIONS["dmpo_alpha"]
    want_ref_err = spec.pop("ref_err", False)
    layout = options.get("layout", "halves")
    B = 3
    x = make_inputs(B, dtype=F64, seed=seed, layout=layout, err_reduction=options.get("err_reduction", "mean"), **spec)
    pred, target = x["model_pred"], x["target"]
    if head == "sdpo":  # r_l = 0.9 r_w + 0.44 noise: lambda = (1 - mu) |r_w|^2 / r_w . r_l ~ 0.55
        t_rows = target if target.shape[0] == 2 * B else rows_of_pairs(target, layout)
        r = pred - t_rows
        w, l = (slice(0, 2 * B, 2), slice(1, 2 * B, 2)) if layout == "interleaved" else (slice(0, B), slice(B, 2 * B))
        offset = x["ref_pred"] - pred
        r[l] = 0.9 * r[w] + math.sqrt(1 - 0.81) * r[l]
        x["model_pred"] = t_rows + r
        x["ref_pred"] = x["model_pred"] + offset
    if head == "mapo":
        del x["ref_pred"]
    pd, rest = dtypes
    out = {k: v.to(pd if k == "model_pred" else rest) for k, v in x.items()}
    kw = dict(options)
    if head == "kto":
        kw.pop("layout", None)
        labels = torch.tensor([True, False, False, True, True, False])
        kw["labels"] = labels
        kw["beta"] = BETA
    elif head == "mapo":
        kw.update(loss_type="mapo", beta=0.5, mapo_timesteps=MAPO_T, mapo_snr=MAPO_SNR)
    else:
        kw.update(beta=BETA, sdpo_mu=0.5)
    if want_ref_err:
        ref_fn = kto_loss_reference if head == "kto" else fdpo_loss_reference
        _, stats = ref_fn(**{k: v.double() for k, v in out.items()}, **kw, return_stats=True)
        out["ref_err"] = stats.ref_err.to(F64 if pd == F64 else F32)
        del out["ref_pred"]
    return out, kw


def _run_head(fn, inputs, kw, upstream, backend=None):
    x = inputs["model_pred"].detach().clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k != "model_pred"}
    extra = {} if backend is None else {"backend": backend}
    loss, stats = fn(x, **rest, **kw, **extra, return_stats=True)
    grad = _grad(loss, x, upstream if loss.dim() else None)
    return loss.detach(), stats, grad


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GRID))
@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_match_the_float64_reference(backend, case, dtype):
    """Loss, every statistic (and extra) and the gradient against the float64 reference on copies of the same
    rounded inputs. Tolerances: harness.TOL of model_pred's dtype (the head runs in its accumulate dtype, float32);
    MaPO's logit T (phi_w - phi_l) adds T times a few ulps of phi; the ref_err cases harness's d tolerance."""
    if dtype == "fp64" and backend == "triton":
        pytest.skip("triton computes in float32 only (float64 input is refused: tests/test_kernels.py)")
    head, spec = GRID[case]
    inputs, kw = _grid_inputs(head, spec, DTYPES[dtype], seed=zlib.crc32(f"{case}-{dtype}".encode()) % 1000)
    fused_fn = fused_kto_loss if head == "kto" else fused_fdpo_loss
    ref_fn = kto_loss_reference if head == "kto" else fdpo_loss_reference
    n = inputs["model_pred"].shape[0]
    upstream = torch.rand(n if head == "kto" else n // 2, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5
    loss, stats, grad = _run_head(fused_fn, inputs, kw, upstream, backend)
    loss_r, stats_r, grad_r = _run_head(ref_fn, {k: v.double() for k, v in inputs.items()}, kw, upstream.double())
    tol = TOL[DTYPES[dtype][0]]
    if head == "mapo":
        eps = torch.finfo(F64 if dtype == "fp64" else F32).eps
        slack = MAPO_T * 8 * eps * (2 + MAPO_SNR * stats_r.model_err.max().item())
        tol = Tol(loss=tol.loss + slack, grad=tol.grad + slack, d=tol.d)
    if "ref_err" in inputs:
        tol = Tol(loss=max(tol.loss, tol.d), grad=max(tol.grad, tol.d), d=tol.d)
    assert grad.dtype == inputs["model_pred"].dtype and loss.dtype == (F64 if dtype == "fp64" else F32)
    assert_close(loss, loss_r, tol.loss, "loss")
    for name in ("logits", "model_err", "ref_err", "logratio", "reward", "raw_model_loss", "raw_ref_loss"):
        assert_close(getattr(stats, name), getattr(stats_r, name), tol.loss, name)
    assert stats.implicit_acc.item() == pytest.approx(
        ((stats.logits > 0).double() + 0.5 * (stats.logits == 0).double()).mean().item(), abs=1e-7
    )
    assert set(stats.extra) == set(stats_r.extra) == {"mapo": set(), "sdpo": {"sdpo_lambda"}, "kto": {"kl"}}[head]
    for name in stats.extra:  # KTO's kl, a mean of e_ref - e: on the scale of those gaps, not of its own size
        scale = (stats_r.ref_err - stats_r.model_err).abs().max() if name == "kl" else 0.0
        assert (stats.extra[name] - stats_r.extra[name]).abs() <= tol.loss * (stats_r.extra[name].abs() + scale)
    if head == "sdpo":
        assert 0.2 < stats_r.extra["sdpo_lambda"] < 0.9  # the safeguard acts
    # the gradient: each element against its own row's scale, plus the dtype's smallest subnormal (a row
    # whose pair is saturated, e.g. sigmoid(-z) ~ 1e-4, has fp16 gradients that round to 0 correctly)
    e = grad_r.double()
    row = e.abs().reshape(e.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (e.dim() - 1)))
    floor = torch.finfo(grad.dtype).tiny * torch.finfo(grad.dtype).eps
    err = (grad.double() - e).abs() / (tol.grad * (e.abs() + row) + floor)
    assert err.max() <= 1, (
        f"grad: worst error {err.max():.2f}x the tolerance at {divmod(int(err.argmax()), e[0].numel())}"
    )


# ============================================================================================== 3. numerics

# x = s e >= 0 in MaPO: 0, tiny, across the series switch at 0.5, up to and past exp's float32 (88.7) and float64
# (709.8) overflow, while phi = x e^-x is still a normal number of the dtype (mpmath decides which)
PHI_X = [0.0, 1e-8, 1e-6, 1e-4, 1e-3, 0.01, 0.1, 0.3, 0.45, 0.499, 0.4999999, 0.5, 0.5000001, 0.501, 0.55, 0.7, 1.0]
PHI_X += [1.5, 2.0, 3.7, 5.0, 10.0, 20.0, 37.0, 50.0, 80.0, 88.0, 88.7, 89.0, 90.0, 91.0, 95.0, 100.0, 300.0]
PHI_X += [700.0, 709.0, 710.0, 712.0, 715.0, 800.0, 1000.0]


def _phi_exact(x):
    with mpmath.workdps(60):
        x = mpmath.mpf(x)
        if x == 0:
            return 1.0, -0.5
        e = mpmath.expm1(x)
        return float(x / e), float((e - x * mpmath.exp(x)) / e**2)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_mapo_phi_matches_mpmath(dtype):
    """torch_backend.mapo_phi's phi and phi' within 4 and 8 eps (relative; phi' = phi (1 - phi - x) / x cancels ~2.5x
    above the switch) of mpmath wherever the exact value is a normal number
    of the dtype (beyond: below the smallest normal, absolutely); the float64 reference's phi and its autograd
    derivative within 16 eps while e^-x is normal, plus the derivative's documented cancellation, 4 eps / x, between
    1e-2 and 1. Caught: the series to x^8 (2e-11 / 8e-10 in float64 near 0.5), phi = 0 past exp's overflow, the
    reference's phi' = 1 / expm1(x) once expm1(x)^2 overflowed (x > 354) and NaN past 709.8."""
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    xs = torch.tensor(PHI_X, dtype=dtype)
    phi, slope = mapo_phi(xs)
    from fdiv_kernels.reference import _mapo_phi_reference

    xr = xs.clone().requires_grad_()
    phi_r = _mapo_phi_reference(xr)
    (slope_r,) = torch.autograd.grad(phi_r.sum(), xr)
    for i, x in enumerate(xs.tolist()):
        exact = _phi_exact(x)
        checks = [("phi", phi[i], exact[0], 4 * eps), ("phi'", slope[i], exact[1], 8 * eps)]
        if dtype == F64 and math.exp(-x) >= tiny:  # the reference: float64, while its e^-x is a normal number
            checks += [
                ("reference phi", phi_r[i], exact[0], 16 * eps),
                ("reference phi'", slope_r[i], exact[1], 16 * eps + (4 * eps / x if 1e-2 <= x <= 1 else 0)),
            ]
        for name, got, ex, rel in checks:
            got = got.item()
            assert math.isfinite(got), (name, x, got)
            if abs(ex) >= tiny:
                assert abs(got - ex) <= rel * abs(ex), f"{name}({x}) = {got!r}, exact {ex!r}: {abs(got / ex - 1):.2e}"
            else:
                assert abs(got - ex) <= tiny, f"{name}({x}) = {got!r}, exact {ex!r}"


def test_mapo_past_exps_float32_range_keeps_the_losers_gradient():
    """Errors e with s e in (88.7, 92): phi = x e^-x is a normal float32 where e^x overflows; the loser's gradient
    (beta T s phi'(s e_l) sigmoid(-z) 2 (pred - t) / D) is tiny but not 0, on every backend and in the reference."""
    target = torch.zeros(2, 1, dtype=F64)
    pred = torch.tensor([[1.0], [math.sqrt(2 * 90.0)]], dtype=F64)  # e_w = 1, e_l = 180: x_l = 90
    kw = dict(loss_type="mapo", beta=1.0, mapo_timesteps=1.0, reduction="sum")
    expected = None
    for backend in ["reference", "cpu", "torch"]:
        y = pred.float().requires_grad_()
        fn = fdpo_loss_reference if backend == "reference" else fused_fdpo_loss
        loss = fn(y, None, target.float(), **kw, **({} if backend == "reference" else {"backend": backend}))
        g = _grad(loss, y)
        if expected is None:
            with mpmath.workdps(50):
                x_w, x_l = mpmath.mpf(0.5), mpmath.mpf(90)
                phi = lambda v: v / mpmath.expm1(v)  # noqa: E731
                z = phi(x_w) - phi(x_l)
                slope_l = mpmath.diff(phi, x_l)
                expected = float((1 / (1 + mpmath.exp(z))) * 0.5 * slope_l * 2 * mpmath.sqrt(180))
        assert g[1, 0].item() != 0 and g[1, 0].item() == pytest.approx(expected, rel=1e-5), (backend, g)


def test_sdpo_lambda_is_one_where_the_gradients_oppose_and_the_value_is_unchanged():
    """g_l . g_w <= 0: lambda = 1 and loss, logits and gradient equal the call without the safeguard, on every
    CPU backend; any mu: the loss value never changes."""
    pred, ref, target = _sdpo_inputs(-0.6)
    for backend in ("cpu", "torch"):
        results = []
        for mu in (None, 0.0, 0.5, 1.0):
            y = pred.float().requires_grad_()
            loss, stats = fused_fdpo_loss(
                y, ref.float(), target.float(), beta=100.0, sdpo_mu=mu, return_stats=True, backend=backend
            )
            results.append((loss, stats, _grad(loss, y)))
            if mu is not None:
                assert stats.extra["sdpo_lambda"].item() == 1.0
        for loss, stats, grad in results[1:]:
            assert torch.equal(loss, results[0][0]) and torch.equal(stats.logits, results[0][1].logits)
            torch.testing.assert_close(grad, results[0][2])
    # correlated residuals: mu = 1 gives lambda = 0 (the losers get no gradient), the same loss value
    pred, ref, target = _sdpo_inputs(0.9)
    y = pred.clone().requires_grad_()
    loss, stats = fused_fdpo_loss(y, ref, target, beta=100.0, sdpo_mu=1.0, return_stats=True, backend="cpu")
    assert stats.extra["sdpo_lambda"].item() == 0.0
    assert torch.equal(loss, fused_fdpo_loss(pred, ref, target, beta=100.0, backend="cpu"))
    assert (_grad(loss, y)[4:] == 0).all()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_kto_given_kl_equal_to_the_computed_one_is_the_same_loss(backend):
    """kl= the batch mean that kl=None computes: the same loss, logits and gradient; a different kl moves the loss."""
    pred, ref, target = (t.float() for t in _kto_inputs())
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    fn = kto_loss_reference if backend == "reference" else fused_kto_loss
    extra = {} if backend == "reference" else {"backend": backend}

    def run(kl):
        y = pred.clone().requires_grad_()
        loss, stats = fn(y, ref, target, labels=labels, kl=kl, beta=BETA, return_stats=True, **extra)
        return loss, stats, _grad(loss, y)

    loss, stats, grad = run(None)
    kl = stats.extra["kl"]
    assert kl > 0
    for given in (kl, kl.item(), kl.reshape(1)):
        loss2, stats2, grad2 = run(given)
        torch.testing.assert_close(loss2, loss)
        torch.testing.assert_close(stats2.logits, stats.logits)
        torch.testing.assert_close(grad2, grad)
    assert (run(3 * kl.item())[0] - loss).abs() > 1e-4
    assert run(-1.0)[1].extra["kl"].item() == 0.0  # a negative reference point clamps to 0, as the authors'


# ============================================================================================== 4. errors


def _pair_inputs():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 3, 5, generator=g)
    return pred, pred + 0.1 * torch.randn(pred.shape, generator=g), torch.randn(4, 3, 5, generator=g)


FDPO_ERRORS = [
    (dict(loss_type="mapo", ref="pred"), r"loss_type='mapo' is reference-free .*got ref_pred"),
    (dict(loss_type="mapo", ref="err"), r"loss_type='mapo' is reference-free .*got ref_err"),
    (dict(loss_type="mapo", ref=None, pair_weight=True), r"pair_weight is not defined for loss_type='mapo'"),
    (dict(loss_type="mapo", ref=None, divergence="js"), r"no reference log-ratio for divergence to act on"),
    (dict(loss_type="mapo", ref=None, gamma=2.0), r"no reference log-ratio for gamma to act on"),
    (dict(loss_type="mapo", ref=None, logratio_clip=3.0), r"no reference log-ratio for logratio_clip to act on"),
    (dict(loss_type="mapo", ref=None, beta_convention="full"), r"no reference log-ratio for beta_convention"),
    (dict(loss_type="mapo", ref=None, mapo_snr=0.0), r"mapo_snr must be > 0"),
    (dict(loss_type="mapo", ref=None, mapo_timesteps=float("inf")), r"mapo_timesteps must be finite"),
    (dict(mapo_snr=0.5), r"mapo_snr is used by loss_type='mapo' only; got loss_type='sigmoid'"),
    (dict(loss_type="hinge", mapo_timesteps=1000), r"mapo_timesteps is used by loss_type='mapo' only"),
    (dict(sdpo_mu=1.5), r"sdpo_mu must be in \[0, 1\].*got 1.5"),
    (dict(sdpo_mu=-0.1), r"sdpo_mu must be in \[0, 1\].*got -0.1"),
    (dict(sdpo_mu=float("nan")), r"sdpo_mu must be finite"),
    (dict(sdpo_mu=0.5, mask=True), r"sdpo_mu with a mask is not supported"),
    (dict(loss_type="mapo", ref=None, sdpo_mu=0.5), r"sdpo_mu applies to .*not to loss_type='mapo'"),
    (dict(loss_type="kto"), r"loss_type='kto' takes unpaired rows with labels: call fdiv_kernels.fused_kto_loss"),
]


@pytest.mark.parametrize("fn", [fused_fdpo_loss, fdpo_loss_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kwargs, message", FDPO_ERRORS, ids=[m[:40] for _, m in FDPO_ERRORS])
def test_head_option_errors_name_the_argument(fn, kwargs, message):
    pred, ref, target = _pair_inputs()
    kwargs = dict(kwargs)
    which = kwargs.pop("ref", "pred")
    args = {"pred": dict(ref_pred=ref), "err": dict(ref_err=torch.rand(4)), None: {}}[which]
    if kwargs.pop("pair_weight", False):
        args["pair_weight"] = torch.ones(2)
    if kwargs.pop("mask", False):
        args["mask"] = torch.ones_like(pred)
    with pytest.raises(ValueError, match=message):
        fn(pred, target=target, **args, **kwargs)


KTO_ERRORS = [
    (dict(labels=None), TypeError, r"labels must be a torch.Tensor \[N\]"),
    (dict(labels=[1, 0, 1, 0]), TypeError, r"labels must be a torch.Tensor"),
    (dict(labels=torch.ones(5, dtype=torch.bool)), ValueError, r"labels must have shape \[N\] = \(4,\).*got \(5,\)"),
    (dict(labels=torch.ones(4, 1, dtype=torch.bool)), ValueError, r"labels must have shape \[N\] = \(4,\)"),
    (dict(labels=torch.tensor([0, 1, 2, 1])), ValueError, r"labels must be bool, or integers 0 .* and 1"),
    (dict(labels=torch.tensor([0.0, 1.0, 1.0, 0.0])), ValueError, r"labels must be bool, or integers"),
    (dict(labels=torch.ones(4, dtype=torch.bool, device="meta")), ValueError, r"labels is on meta but model_pred"),
    (dict(target="shared"), ValueError, r"target must have one row per sample, \[N, ...\] with N = 4; got \(2, 3, 5\)"),
    (dict(layout="interleaved"), TypeError, r"unexpected option 'layout'; its options are \["),
    (dict(sdpo_mu=0.5), TypeError, r"unexpected option 'sdpo_mu'"),
    (dict(loss_type="sigmoid"), TypeError, r"unexpected option 'loss_type'"),
    (dict(desirable_weight=-1.0), ValueError, r"desirable_weight must be a finite number >= 0 .*got -1.0"),
    (dict(undesirable_weight=float("inf")), ValueError, r"undesirable_weight must be a finite number >= 0"),
    (dict(undesirable_weight=float("nan")), ValueError, r"undesirable_weight must be a finite number >= 0"),
    (dict(kl=[0.1]), TypeError, r"kl must be a number or a one-element tensor"),
    (dict(kl=torch.zeros(2)), TypeError, r"kl must be a number or a one-element tensor"),
    (dict(beta=-1.0), ValueError, r"beta must be > 0"),
]


@pytest.mark.parametrize("fn", [fused_kto_loss, kto_loss_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kwargs, error, message", KTO_ERRORS, ids=[m[:40] for _, _, m in KTO_ERRORS])
def test_kto_errors_name_the_argument(fn, kwargs, error, message):
    pred, ref, target = _pair_inputs()
    kwargs = dict(kwargs)
    kwargs.setdefault("labels", torch.tensor([True, False, True, False]))
    if kwargs.get("target") == "shared":
        target = target[:2]
        del kwargs["target"]
    with pytest.raises(error, match=message):
        fn(pred, ref, target, **kwargs)


@pytest.mark.parametrize("fn", [fused_kto_loss, kto_loss_reference], ids=lambda f: f.__name__)
def test_kto_needs_labels(fn):
    pred, ref, target = _pair_inputs()
    with pytest.raises(TypeError, match=r"missing 1 required keyword-only argument: 'labels'"):
        fn(pred, ref, target)


def test_fused_kto_needs_an_even_number_of_rows_and_the_reference_does_not():
    pred, ref, target = (t[:3] for t in _pair_inputs())
    labels = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match=r"model_pred has 3 rows; .* fused_kto_loss needs an even, non-zero number"):
        fused_kto_loss(pred, ref, target, labels=labels)
    assert torch.isfinite(kto_loss_reference(pred, ref, target, labels=labels))  # parity above: N = 5
    with pytest.raises(ValueError, match=r"model_pred has 0 rows"):
        kto_loss_reference(pred[:0], ref[:0], target[:0], labels=labels[:0])


# ---------------------------------------------------------------------------------------------- distributed


@pytest.fixture
def several_processes(monkeypatch):
    """torch.distributed as seen by one of 2 processes: all_reduce adds the other process's KL, 0.01 more."""
    calls = []

    def all_reduce(t, op=None):
        calls.append((t.clone(), op))
        t.mul_(2).add_(0.01)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


@pytest.mark.parametrize("fn", [fused_kto_loss, kto_loss_reference], ids=lambda f: f.__name__)
def test_kto_under_several_processes_never_uses_a_per_process_kl_silently(fn, several_processes):
    pred, ref, target = (t.float() for t in _kto_inputs())
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    kw = dict(labels=labels, beta=BETA, return_stats=True)
    with pytest.raises(ValueError, match=r"several processes: .*pass kl_all_reduce=True .* or kl="):
        fn(pred, ref, target, **kw)
    assert not several_processes
    loss, stats = fn(pred, ref, target, kl_all_reduce=True, **kw)
    ((local, op),) = several_processes
    assert op == dist.ReduceOp.SUM
    _close(stats.extra["kl"], local + 0.005, 1e-6, name="all-reduced kl")  # (local + local + 0.01) / 2
    several_processes.clear()
    loss2, _ = fn(pred, ref, target, kl=local + 0.005, **kw)  # the caller's kl: no all-reduce
    assert not several_processes
    torch.testing.assert_close(loss2, loss)


def test_kto_under_a_one_process_gloo_group(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pred, ref, target = (t.float() for t in _kto_inputs())
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    expected = fused_kto_loss(pred, ref, target, labels=labels, beta=BETA, backend="cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for all_reduce in (False, True):
            got = fused_kto_loss(pred, ref, target, labels=labels, beta=BETA, kl_all_reduce=all_reduce, backend="cpu")
            torch.testing.assert_close(got, expected)
    finally:
        dist.destroy_process_group()


# ============================================================================================== 5. torch.compile


@pytest.mark.parametrize("head", ["mapo", "sdpo", "kto"])
def test_torch_compile_matches_eager(head):
    """Each head under torch.compile (graph breaks allowed: fullgraph=False) on the cpu backend: loss, statistics
    and gradient equal eager's."""
    pred, ref, target = (t.float() for t in _kto_inputs(N=4, shape=(2, 3, 5)))
    labels = torch.tensor([True, False, False, True])

    def step(p):
        if head == "mapo":
            loss, stats = fused_fdpo_loss(
                p, None, target, loss_type="mapo", mapo_timesteps=50.0, return_stats=True, backend="cpu"
            )
            return loss, stats.logits
        if head == "sdpo":
            loss, stats = fused_fdpo_loss(p, ref, target, beta=BETA, sdpo_mu=0.5, return_stats=True, backend="cpu")
            return loss, stats.extra["sdpo_lambda"]
        loss, stats = fused_kto_loss(p, ref, target, labels=labels, beta=BETA, return_stats=True, backend="cpu")
        return loss, stats.extra["kl"]

    torch._dynamo.reset()
    compiled = torch.compile(step)
    p_eager, p_compiled = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    eager, result = step(p_eager), compiled(p_compiled)
    eager[0].backward()
    result[0].backward()
    for c, e in zip(result, eager):
        torch.testing.assert_close(c, e)
    torch.testing.assert_close(p_compiled.grad, p_eager.grad)
