"""Numerics that no other test pins down (issue 12): the soft clip in every backend, the float64 reference against
mpmath over the whole claimed range, its double backward, NaN propagation and the backward's mul0 semantics.

The soft clip is checked through each backend's real code path: with model_pred = target + delta (D = 1) and
ref_err = r + delta^2, the log-ratio is exactly d = r (beta = 2), the clipped log-ratio comes back in the stats
and, with d_w = d_l (logit 0, so dloss/dz = -1/2 exactly) and an upstream gradient of 1/delta, the gradient is
exactly +-sech^2(d / c) as the kernel computed it.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from harness import DIV_IDS, DIVERGENCES

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss, get_divergence
from fdiv_kernels.backends import resolve_backend
from fdiv_kernels.divergences import clipped_psi_diff, psi_diff, psi_slope, soft_clip

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _available(backend: str, device: str = DEVICE) -> bool:
    try:
        resolve_backend(backend, torch.device(device))
    except RuntimeError:
        return False
    return True


BACKENDS = [b for b in ("cpu", "cuda", "triton", "torch") if _available(b)]


# ---------------------------------------------------------------------------------------------- the soft clip


def _clip_through_backend(backend: str, d: torch.Tensor, clip: float):
    """(clipped d, slope) as ``backend`` computes them for the log-ratios ``d`` (see the module doc)."""
    dtype = d.dtype
    delta = 2.0**-30
    rows = torch.cat([d, d])  # pairs with d_w = d_l: logit 0
    n = d.numel()
    target = torch.zeros(2 * n, 1, dtype=dtype, device=DEVICE)
    pred = torch.full((2 * n, 1), delta, dtype=dtype, device=DEVICE, requires_grad=True)
    ref_err = (rows + delta**2).to(DEVICE)
    d_used = ref_err - delta**2  # what the kernel's e_ref - e is (e = delta^2 exactly)
    fn = fdpo_loss_reference if backend == "reference" else fused_fdpo_loss
    kw = {} if backend == "reference" else {"backend": backend}
    loss, stats = fn(
        pred, target=target, ref_err=ref_err, beta=2.0, logratio_clip=clip, reduction="none", return_stats=True, **kw
    )
    (grad,) = torch.autograd.grad(loss, pred, torch.full_like(loss, 1.0 / delta))
    slope = grad[:n, 0]
    assert torch.equal(grad[n:, 0], -slope)
    return d_used[:n].cpu(), stats.logratio[:n].cpu(), slope.cpu()


def _soft_clip_truth(d: torch.Tensor, clip: float):
    """c * tanh(d / c) and sech^2(d / c) at 40 digits, for the float64 values of d and c, as float64."""
    mpmath.mp.dps = 40
    value, slope = [], []
    c = mpmath.mpf(clip)
    for x in d.double().tolist():
        t = mpmath.mpf(x) / c
        value.append(float(c * mpmath.tanh(t)))
        slope.append(float(mpmath.sech(t) ** 2))
    return torch.tensor(value, dtype=torch.float64), torch.tensor(slope, dtype=torch.float64)


def _log_ratios(dtype):
    mags = torch.logspace(-6, 30 if dtype != torch.float64 else 200, 181, dtype=torch.float64)
    d = torch.cat([mags, -mags])
    return d.to(dtype)


def _clip_cases():
    for backend in BACKENDS:
        dtypes = [torch.float32] + ([torch.float64] if backend in ("cpu", "torch") else [])
        for dtype in dtypes:
            for clip in (1e-3, 1.0, 1e4, 1e10):
                yield pytest.param(backend, dtype, clip, id=f"{backend}-{str(dtype)[6:]}-c{clip:g}")


@pytest.mark.parametrize("backend, dtype, clip", list(_clip_cases()))
def test_soft_clip_is_accurate_for_every_ratio(backend, dtype, clip):
    """c * tanh(d/c) to a few ulps, and sech^2(d/c) to a few ulps times its condition number 2|x| tanh|x| (x = d/c
    itself is rounded), for |d/c| from 1e-16 to 1e33; tiny x passes d through unchanged."""
    d = _log_ratios(dtype)
    if backend == "triton" and DEVICE == "cpu":  # the interpreter costs ~1 ms per program: every 4th ratio
        d = d[::4].contiguous()
    d_used, value, slope = _clip_through_backend(backend, d, clip)
    c = float(torch.tensor(clip, dtype=dtype))  # the clip as the kernel holds it
    want_value, want_slope = _soft_clip_truth(d_used, c)
    info = torch.finfo(dtype)
    eps = info.eps
    # CPU (C++, numpy under the Triton interpreter, torch): measured <= 1.5 ulps. CUDA: exp is ex2.approx in
    # Triton, expf/expm1f within 2 ulps in CUDA C++: twice the room, not measured here.
    ulps = 4 if DEVICE == "cpu" else 8
    value_err = (value.double() - want_value).abs() / want_value.abs().clamp_min(info.tiny)
    assert value_err.max().item() <= ulps * eps, (
        f"clipped d: worst relative error {value_err.max().item() / eps:.1f} ulps at d = "
        f"{d_used[value_err.argmax()].item()!r}"
    )
    x = (d_used.double() / c).abs()
    floor = 2.0**-120 if dtype != torch.float64 else 2.0**-1020  # subnormal slopes (flushed to 0 on GPUs)
    bound = ulps * eps * (1 + 2 * x) * want_slope + floor
    slope_err = (slope.double() - want_slope).abs()
    worst = (slope_err / bound).max().item()
    assert worst <= 1.0, f"slope: {worst:.2f}x the bound at d = {d_used[(slope_err / bound).argmax()].item()!r}"
    # Tiny x: d itself (not c * (d/c) rounded twice); saturated x: exactly +-c.
    tiny = x < 2.0**-12 if dtype != torch.float64 else x < 1e-8
    assert torch.equal(value[tiny], d_used[tiny])
    assert (value.abs() <= c).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_huge_clip_leaves_logratios_alone(backend):
    """Issue 12's repro: logratio_clip=1e10 gave logratio [0, 0, 0, 0] in the C++ and Triton kernels."""
    g = torch.Generator().manual_seed(0)
    mp = torch.randn(4, 60, generator=g)
    rp = mp + 0.01 * torch.randn(4, 60, generator=g)
    tg = torch.randn(2, 60, generator=g)
    mp, rp, tg = (t.to(DEVICE) for t in (mp, rp, tg))
    fn = fdpo_loss_reference if backend == "reference" else fused_fdpo_loss
    kw = {} if backend == "reference" else {"backend": backend}
    loss_c, stats_c = fn(mp, rp, tg, logratio_clip=1e10, return_stats=True, **kw)
    loss, stats = fn(mp, rp, tg, return_stats=True, **kw)
    assert stats.logratio.abs().min() > 0.1
    torch.testing.assert_close(stats_c.logratio, stats.logratio, rtol=2e-7, atol=0)
    torch.testing.assert_close(loss_c, loss, rtol=2e-7, atol=0)


# ----------------------------------------------------------------------- the exponential family past exp's range

# (divergence, alpha, k): psi(d) = s (1 - exp(-k d)), s k = 1 (alpha, forward KL) or 1/2 (hellinger).
EXP_FAMILY = [("forward_kl", 0.5, 1.0), ("hellinger", 0.5, 0.5), ("alpha", 0.5, 0.5)]


def _exp_family_cases():
    for backend in BACKENDS:
        for dtype in [torch.float32] + ([torch.float64] if backend in ("cpu", "torch") else []):
            for name, alpha, k in EXP_FAMILY:
                yield pytest.param(backend, dtype, name, alpha, k, id=f"{backend}-{str(dtype)[6:]}-{name}")


def _head_through_backend(backend, dtype, d_w, d_l, **kw):
    """(logits, loss, gradient rows) of pairs with log-ratios exactly d_w, d_l (float64 lists, representable in
    dtype): D = 1, model_pred - target = 1, ref_err = d + 1 and beta = 2, so the kernel's d = ref_err - 1 exactly,
    and with reduction none and an upstream gradient of 1 the gradient is the per-row coefficient itself."""
    n = len(d_w)
    rows = torch.tensor(list(d_w) + list(d_l), dtype=torch.float64)
    pred = torch.ones(2 * n, 1, dtype=dtype, device=DEVICE, requires_grad=True)
    target = torch.zeros(2 * n, 1, dtype=dtype, device=DEVICE)
    ref_err = (rows + 1).to(dtype).to(DEVICE)
    assert torch.equal(ref_err.double().cpu() - 1, rows)
    loss, stats = fused_fdpo_loss(
        pred, target=target, ref_err=ref_err, beta=2.0, reduction="none", return_stats=True, backend=backend, **kw
    )
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    return stats.logits.double().cpu(), loss.double().cpu(), grad[:, 0].double().cpu()


@pytest.mark.parametrize("backend, dtype, divergence, alpha, k", list(_exp_family_cases()))
def test_clipped_slope_past_exp_range(backend, dtype, divergence, alpha, k):
    """psi'(c tanh(x)) sech^2(x) where psi' alone overflows (k c past exp's range) and sech^2 underflows: the
    gradient is the finite product, not inf (the factors multiplied) and not 0 (mul0 of inf and an underflowed
    sech^2); inf only where the product itself is out of range. Ties (d_w = d_l), so z = 0 and dloss/dz = -1/2."""
    info = torch.finfo(dtype)
    log_max = math.log(info.max)
    c = 2.25 * log_max / k  # k c = 200 in fp32, 1597 in fp64
    xs = [0.5, 2.0, 0.4 * k * c, 0.5 * k * c, 0.55 * k * c, 0.6 * k * c, 0.75 * k * c, 0.9 * k * c]
    d = [float(torch.tensor(-x * c, dtype=dtype)) for x in xs]
    _, loss, grad = _head_through_backend(backend, dtype, d, d, divergence=divergence, alpha=alpha, logratio_clip=c)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)), rtol=4 * info.eps, atol=0)
    mpmath.mp.dps = 40
    s_k = 0.5 if divergence == "hellinger" else 1.0
    checked = 0
    for i, di in enumerate(d):
        x = mpmath.mpf(di) / mpmath.mpf(float(torch.tensor(c, dtype=dtype)))
        cc = mpmath.mpf(float(torch.tensor(c, dtype=dtype)))
        want = s_k * mpmath.exp(-k * cc * mpmath.tanh(x)) * mpmath.sech(x) ** 2
        got_w, got_l = grad[i].item(), grad[len(d) + i].item()
        assert got_l == -got_w, (got_w, got_l)
        if want > info.max:
            assert got_w == math.inf, (di, got_w)
        elif want > info.tiny:
            # exp of an argument ~ k c + 2|x| carries that many ulps of its rounding
            bound = 8 * info.eps * (1 + k * float(cc) + 2 * abs(float(x)))
            assert abs(got_w / float(want) - 1) <= bound, (di, got_w, float(want))
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("backend, dtype, divergence, alpha, k", list(_exp_family_cases()))
def test_near_tie_logit_past_exp_range(backend, dtype, divergence, alpha, k):
    """z = s (exp(-k d_l) - exp(-k d_w)) for a near-tie where exp(-k d) alone overflows but z does not: finite and
    accurate, in the logit and the loss (softplus(-z) = -z here)."""
    info = torch.finfo(dtype)
    hi = math.log(info.max) + 1.5  # exp(hi) overflows, exp(hi) * (k * gap) does not
    d_w = float(torch.tensor(-hi / k, dtype=dtype))
    gaps = [2.0**-10, 2.0**-6]
    d_l = [d_w + g for g in gaps]
    assert all(float(torch.tensor(v, dtype=dtype)) == v for v in d_l)
    logits, loss, _ = _head_through_backend(backend, dtype, [d_w] * len(gaps), d_l, divergence=divergence, alpha=alpha)
    mpmath.mp.dps = 40
    s = 1.0 if divergence == "forward_kl" else (1.0 / alpha if divergence == "alpha" else 1.0)
    for i, dl in enumerate(d_l):
        want = s * (mpmath.exp(-k * mpmath.mpf(dl)) - mpmath.exp(-k * mpmath.mpf(d_w)))
        assert -info.max < want < 0
        bound = 8 * info.eps * (1 + hi)
        assert abs(logits[i].item() / float(want) - 1) <= bound, (dl, logits[i].item(), float(want))
        assert abs(loss[i].item() / float(-want) - 1) <= bound, (dl, loss[i].item(), float(-want))


# ------------------------------------------------------------------------------- the reference against mpmath

# f'(u) and f''(u) of each divergence, written out independently of divergences.py; psi(d) = f'(e^d) and
# psi'(d) = f''(e^d) e^d. test_mpmath_tables checks f'' against the derivative of f'.
F1 = {
    "reverse_kl": lambda u, a: mpmath.log(u) + 1,
    "forward_kl": lambda u, a: -1 / u,
    "js": lambda u, a: mpmath.log(2 * u / (1 + u)),
    "alpha": lambda u, a: (1 - u ** (-a)) / a,
    "hellinger": lambda u, a: 1 - u ** mpmath.mpf(-0.5),
}
F2 = {
    "reverse_kl": lambda u, a: 1 / u,
    "forward_kl": lambda u, a: 1 / u**2,
    "js": lambda u, a: 1 / (u * (1 + u)),
    "alpha": lambda u, a: u ** (-a - 1),
    "hellinger": lambda u, a: u ** mpmath.mpf(-1.5) / 2,
}
_HUGE = mpmath.mpf(10) ** 6  # beyond this |z|, sigmoid(+-z) is 0 or 1 to far below float64's smallest number


def _softplus(x):
    if abs(x) > _HUGE:
        return max(x, 0)
    return max(x, 0) + mpmath.log1p(mpmath.exp(-abs(x)))


def _sigmoid(x):
    if x > _HUGE:
        return mpmath.mpf(1)
    if x < -_HUGE:
        return mpmath.mpf(0)
    return 1 / (1 + mpmath.exp(-x))


def _reference_truth(name, alpha, gamma, eps, clip, d_w, d_l, eta=0):
    """Bounds on (loss, dloss/dd_w, dloss/dd_l) of one pair at mpmath's precision over all log-ratios within a relative
    ``eta`` of d_w and d_l, clipped log-ratios C(d) within ``eta`` of theirs and logits within ``eta`` of theirs
    (eta = 0: the exact values, as intervals of width 0). Also whether the exact logit overflows float64.

    Interval arithmetic on monotone pieces: psi increases with C and psi' = f''(e^C) e^C decreases (or is 1),
    C'(d) = sech^2(d/c) decreases with |d|, dloss/dz increases with z, and the loss is convex in z.
    """
    a, g, e = mpmath.mpf(alpha), mpmath.mpf(gamma), mpmath.mpf(eps)
    lo_hi = lambda x: (min(x * (1 - eta), x * (1 + eta)), max(x * (1 - eta), x * (1 + eta)))  # noqa: E731

    def clip_bounds(d):
        d_lo, d_hi = lo_hi(d)
        if clip is None:
            return (d_lo, d_hi), (mpmath.mpf(1), mpmath.mpf(1))
        c = mpmath.mpf(clip)
        c_lo = lo_hi(c * mpmath.tanh(d_lo / c))[0]
        c_hi = lo_hi(c * mpmath.tanh(d_hi / c))[1]
        sech2 = sorted(mpmath.sech(x / c) ** 2 for x in (d_lo, d_hi))
        if d_lo <= 0 <= d_hi:
            sech2[1] = mpmath.mpf(1)
        return (c_lo, c_hi), tuple(sech2)

    def psi(cv):
        return F1[name](mpmath.exp(cv), a)

    def slope(cv):
        return F2[name](mpmath.exp(cv), a) * mpmath.exp(cv)

    def loss_of(z):
        return (1 - e) * _softplus(-z) + e * _softplus(z)

    def dloss(z):
        return -(1 - e) * _sigmoid(-z) + e * _sigmoid(z)

    (cw, cpw), (cl, cpl) = clip_bounds(d_w), clip_bounds(d_l)
    z_lo = lo_hi(g * (psi(cw[0]) - psi(cl[1])))[0]
    z_hi = lo_hi(g * (psi(cw[1]) - psi(cl[0])))[1]
    losses = [loss_of(z_lo), loss_of(z_hi)]
    z_min = mpmath.log((1 - e) / e) if e > 0 else mpmath.inf  # where the loss is smallest
    loss = (loss_of(z_min) if z_lo <= z_min <= z_hi else min(losses), max(losses))
    lz = (dloss(z_lo), dloss(z_hi))

    def product(*intervals):
        ends = [mpmath.mpf(1)]
        for lo, hi in intervals:
            ends = [x * y for x in ends for y in (lo, hi)]
        return min(ends), max(ends)

    s_w = sorted(slope(x) for x in cw)
    s_l = sorted(slope(x) for x in cl)
    grad_w = product(lz, (g, g), s_w, cpw)
    grad_l = product(lz, (-g, -g), s_l, cpl)
    z = g * (psi(cw[0]) - psi(cl[0])) if eta == 0 else None
    overflow = z is not None and abs(z) > mpmath.mpf(torch.finfo(torch.float64).max)
    return (loss, grad_w, grad_l), overflow


_GRID = [0.0, 1e-8, 0.3, 3.0, 17.0, 40.0, 100.0, 709.5, 711.0, 1420.0, 1e4]
_GRID = sorted({s * v for v in _GRID for s in (1.0, -1.0)})
# Near-ties at large |d| (psi_w - psi_l cancels) and exact ties.
_NEAR_TIES = [
    (-1000.0, -1000.0 * (1 + 1e-12)),
    (700.0, 700.0 + 1e-9),
    (1e4, 1e4 - 1e-9),
    (-40.0, -40.0 + 1e-13),
    (-1e4, -1e4),
    (5.0, 5.0),
]
_PAIRS = [(x, y) for x in _GRID for y in _GRID] + _NEAR_TIES


def _reference_with(d_w, d_l, **kw):
    """Loss and dloss/dd of the float64 reference for pairs with exactly these log-ratios (ref_err path, D = 1,
    model_pred - target = 1, beta = 2: d = ref_err - 1 and dloss/dmodel_pred = -2 dloss/dd)."""
    d = torch.tensor(list(d_w) + list(d_l), dtype=torch.float64)
    ref_err = d + 1.0
    d_used = ref_err - 1.0
    rows = d.numel()
    pred = torch.ones(rows, 1, dtype=torch.float64, requires_grad=True)
    loss = fdpo_loss_reference(
        pred, target=torch.zeros(rows, 1, dtype=torch.float64), ref_err=ref_err, beta=2.0, reduction="none", **kw
    )
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    return d_used, loss.detach(), grad[:, 0]


@pytest.mark.parametrize("name, alpha", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("clip", [None, 150.0, 720.0], ids=["no_clip", "clip150", "clip720"])
@pytest.mark.parametrize("gamma, eps", [(1.0, 0.0), (1.3, 0.1)], ids=["plain", "gamma_smoothing"])
def test_reference_matches_mpmath(name, alpha, clip, gamma, eps):
    """The float64 reference's loss and gradient, |d| up to 1e4, against a 50-digit evaluation of the definitions.

    Each value must be within 8 ulps of the exact one, or else (ill-conditioned points: near-ties at large |d|,
    where rounding d or c tanh(d/c) at all moves the answer, or a loss that amplifies the logit's last bit) within
    8 ulps of the range of exact values over log-ratios, clipped log-ratios and logits each perturbed by up to
    8 ulps (backward stability). Overflow: the correctly
    signed inf exactly where the true value overflows float64, and (documented, as in the kernels) for the loss
    also where the logit itself overflows on the way to a loss that would just fit.
    """
    mpmath.mp.dps = 50  # near-ties cancel ~15 digits of psi_w - psi_l: 50 leave 20 to spare
    B = len(_PAIRS)
    d_used, loss, grad = _reference_with(
        [p[0] for p in _PAIRS],
        [p[1] for p in _PAIRS],
        divergence=name,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=eps,
        logratio_clip=clip,
    )
    ulp = 2.0**-52
    f64_max = mpmath.mpf(torch.finfo(torch.float64).max)
    floor = mpmath.mpf(2) ** -1020  # subnormal results: absolute
    scale = (1, -2, -2)  # the reference's dloss/dmodel_pred = -2 dloss/dd (2 (pred - target) / D = 2)
    names = ("loss", "grad_w", "grad_l")
    failures = []

    def close(value, want):
        if abs(want) > f64_max:
            return math.isinf(value) and (value > 0) == (want > 0)
        return not math.isinf(value) and abs(mpmath.mpf(value) - want) <= 8 * ulp * abs(want) + floor

    for i in range(B):
        dw, dl = mpmath.mpf(d_used[i].item()), mpmath.mpf(d_used[B + i].item())
        got = (loss[i].item(), grad[i].item(), grad[B + i].item())
        exact, z_overflows = _reference_truth(name, alpha, gamma, eps, clip, dw, dl)
        bounds = None
        for k in range(3):
            value, want = got[k], exact[k][0] * scale[k]
            if math.isnan(value):
                failures.append((names[k], float(dw), float(dl), value, float(want)))
                continue
            if close(value, want) or (k == 0 and z_overflows and value == math.inf):
                continue
            if bounds is None:  # ill-conditioned? the range over log-ratios, clipped ones and logits +-8 ulps
                bounds = _reference_truth(name, alpha, gamma, eps, clip, dw, dl, eta=8 * ulp)[0]
            lo, hi = sorted(v * scale[k] for v in bounds[k])
            if close(value, lo) or close(value, hi):
                continue
            tol = 8 * ulp * max(abs(lo), abs(hi)) + floor
            if not math.isinf(value) and lo - tol <= value <= hi + tol:
                continue
            failures.append((names[k], float(dw), float(dl), value, float(want), float(lo), float(hi)))
    assert not failures, f"{len(failures)} of {3 * B} values wrong, e.g. (what, d_w, d_l, got, want): {failures[:6]}"


def test_mpmath_tables():
    """F2 is the derivative of F1 (and psi_slope agrees with both at moderate d)."""
    mpmath.mp.dps = 40
    for name, alpha in DIVERGENCES:
        a = mpmath.mpf(alpha)
        div = get_divergence(name, alpha)
        for u in (mpmath.mpf("0.01"), mpmath.mpf("0.7"), mpmath.mpf(3), mpmath.mpf(50)):
            assert mpmath.almosteq(mpmath.diff(lambda v, f=F1[name], a=a: f(v, a), u), F2[name](u, a), rel_eps=1e-25)
            d = float(mpmath.log(u))
            slope = psi_slope(div, torch.tensor(d, dtype=torch.float64)).item()
            assert slope == pytest.approx(float(F2[name](mpmath.exp(d), a) * mpmath.exp(d)), rel=1e-14)


# ------------------------------------------------------------------------------ the three bugs of the issue


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_reference_gradient_beyond_expm1_cancellation(backend):
    """Hellinger at d = (-100, 0): autograd of expm1 gave 0 for the loser; the truth is dloss/dd_l = psi'(0)
    (dloss/dz = -1), as cpu and torch had it all along. Every exponential-family divergence, k |d_w - d_l| >> 37."""
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} unavailable")
    for name, alpha in [("hellinger", 0.5), ("forward_kl", 0.5), ("alpha", 0.1), ("alpha", 0.9)]:
        d_used, loss, grad = _reference_with([-100.0, 0.0], [0.0, -100.0], divergence=name, alpha=alpha)
        div = get_divergence(name, alpha)
        # Pair 0: z -> -inf, dloss/dz = -1: dloss/dd_l = +psi'(0); the reference returns -2 * that per element.
        assert grad[2].item() == pytest.approx(
            -2 * psi_slope(div, torch.tensor(0.0, dtype=torch.float64)).item(), rel=1e-14
        )
        rows = 4
        ref_err = d_used.clone()
        kernel_pred = torch.ones(rows, 1, dtype=torch.float64, requires_grad=True)
        kernel_loss = fused_fdpo_loss(
            kernel_pred,
            target=torch.zeros(rows, 1, dtype=torch.float64),
            ref_err=ref_err + 1.0,
            beta=2.0,
            reduction="none",
            divergence=name,
            alpha=alpha,
            backend=backend,
        )
        (kernel_grad,) = torch.autograd.grad(kernel_loss.sum(), kernel_pred)
        torch.testing.assert_close(grad, kernel_grad[:, 0], rtol=1e-13, atol=0)
        torch.testing.assert_close(loss, kernel_loss.detach(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("name, alpha", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("path", ["ref_pred", "ref_err"])
def test_reference_has_no_nan_at_extreme_logratios(name, alpha, path):
    """|d| = 1e4 through the real error paths (ref_pred: the direct form (ref - pred)(ref + pred - 2t), whose
    autograd gave inf - inf), with a mask that zeroes elements and residuals that are exactly 0."""
    g = torch.Generator().manual_seed(5)
    B, D = 4, 64
    target = torch.randn(2 * B, D, generator=g, dtype=torch.float64)
    pred = target + 4 * torch.randn(2 * B, D, generator=g, dtype=torch.float64)
    pred[:, :3] = target[:, :3]  # zero residuals
    e = ((pred - target) ** 2).mean(dim=1)
    d = torch.tensor([1e4, -1e4, 1e4, -1e4, -1e4, 1e4, 1e4, -1e4], dtype=torch.float64)
    beta = 5000.0
    e_ref = e + d / (beta / 2)
    mask = (torch.rand(2 * B, D, generator=g) > 0.2).double()
    kw = dict(beta=beta, divergence=name, alpha=alpha, reduction="none", mask=mask)
    if path == "ref_err":
        # With a mask the masked means change: recompute e_ref so that d stays +-1e4.
        e_m = ((pred - target) ** 2 * mask).sum(1) / mask.sum(1)
        kw["ref_err"] = e_m + d / (beta / 2)
    else:
        s = torch.sqrt(e_ref / e)
        kw["ref_pred"] = target + s[:, None] * (pred - target)
    x = pred.clone().requires_grad_()
    loss, stats = fdpo_loss_reference(x, target=target, return_stats=True, **kw)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    assert stats.logratio.abs().max() > 5e3
    assert not loss.isnan().any() and not grad.isnan().any()
    assert (grad[:, :3] == 0).all() and (grad[mask == 0] == 0).all()
    if "cpu" in BACKENDS:
        y = pred.clone().requires_grad_()
        kernel_loss = fused_fdpo_loss(y, target=target, backend="cpu", **kw)
        (kernel_grad,) = torch.autograd.grad(kernel_loss, y, torch.ones_like(kernel_loss))
        finite = kernel_grad.isfinite()
        assert torch.equal(finite, grad.isfinite())
        assert torch.equal(kernel_grad[~finite], grad[~finite])  # the same signed infs
        torch.testing.assert_close(grad[finite], kernel_grad[finite], rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_mask_propagates(backend):
    """A NaN mask entry makes that sample's errors NaN in every backend and in the reference (which made it e = 0)."""
    g = torch.Generator().manual_seed(6)
    pred = torch.randn(4, 9, generator=g, device="cpu").to(DEVICE)
    ref = pred + 0.01 * torch.randn(4, 9, generator=g).to(DEVICE)
    target = torch.randn(4, 9, generator=g).to(DEVICE)
    mask = torch.ones(4, 9, device=DEVICE)
    mask[1, 4] = float("nan")
    fn = fdpo_loss_reference if backend == "reference" else fused_fdpo_loss
    kw = {} if backend == "reference" else {"backend": backend}
    loss, stats = fn(pred, ref, target, mask=mask, reduction="none", return_stats=True, **kw)
    nan_rows = torch.tensor([False, True, False, False], device=DEVICE)
    assert torch.equal(stats.model_err.isnan(), nan_rows) and torch.equal(stats.ref_err.isnan(), nan_rows)
    assert torch.equal(loss.isnan(), torch.tensor([False, True], device=DEVICE))


# ------------------------------------------------------------------------------------- the backward's mul0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_backward_zero_times_inf_is_zero(backend):
    """mul0 in every backward: a zero coefficient (saturated sigmoid) times an infinite upstream gradient, and a
    zero upstream gradient times an infinite residual, are 0, not NaN (the Triton backward gave NaN for both)."""
    inf = float("inf")
    B, D = 3, 5
    g = torch.Generator().manual_seed(7)
    target = torch.randn(2 * B, D, generator=g)
    pred = target + torch.randn(2 * B, D, generator=g)
    pred[2, 1] = inf  # pair 2's winner: an infinite residual (and error)
    pred[5, 3] = -inf  # pair 2's loser
    e = ((pred.double() - target.double()) ** 2).mean(1)
    # Pair 0: z >> 0, the sigmoid saturates (coef 0); pair 1: ordinary; pair 2: infinite errors.
    d = torch.tensor([200.0, 0.3, 0.0, -200.0, -0.4, 0.0], dtype=torch.float64)
    ref_err = torch.where(e.isfinite(), e + d / 2500.0, torch.zeros_like(e)).float()
    upstream = torch.tensor([inf, 1.5, 0.0])  # G = inf where coef = 0, G = 0 where the residual is inf
    grads = {}
    for name in sorted({backend, "torch"}) + ["reference"]:
        fn = fdpo_loss_reference if name == "reference" else fused_fdpo_loss
        kw = {} if name == "reference" else {"backend": name}
        dtype = torch.float64 if name == "reference" else torch.float32
        x = pred.to(DEVICE, dtype).requires_grad_()
        loss = fn(x, target=target.to(DEVICE, dtype), ref_err=ref_err.to(DEVICE, dtype), reduction="none", **kw)
        (grads[name],) = torch.autograd.grad(loss, x, upstream.to(DEVICE, dtype))
    got = grads[backend]
    assert not got.isnan().any(), got
    assert (got[[0, 3]] == 0).all() and (got[[2, 5]] == 0).all()
    assert (got[[1, 4]] != 0).all()
    torch.testing.assert_close(got, grads["torch"], rtol=1e-5, atol=0)
    # The float64 reference only on the ordinary pair: in float64 sigmoid(-z) at z = 400 does not underflow
    # (G = inf times it is inf), and pair 2's logit is NaN (autograd: 0 * NaN = NaN; the kernels' mul0: 0).
    torch.testing.assert_close(got[[1, 4]].double(), grads["reference"][[1, 4]].to(DEVICE), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------- double backward


def _gradgrad_case(seed, shared=False, masked=False, ref_err=False, layout="halves"):
    g = torch.Generator().manual_seed(seed)
    B, S = 2, (2, 3)
    pred = torch.randn(2 * B, *S, generator=g, dtype=torch.float64)
    ref = pred + 0.05 * torch.randn(pred.shape, generator=g, dtype=torch.float64)
    target = torch.randn(B if shared else 2 * B, *S, generator=g, dtype=torch.float64)
    kw = {"target": target}
    if masked:
        kw["mask"] = (torch.rand(B if shared else 2 * B, *S, generator=g) > 0.3).double()
    if ref_err:
        e = fdpo_loss_reference(pred, ref, target, return_stats=True, mask=kw.get("mask"), layout=layout)[1].model_err
        kw["ref_err"] = e + 0.005 * torch.randn(e.shape, generator=g, dtype=torch.float64)  # d = O(1) at beta 400
    else:
        kw["ref_pred"] = ref
    return pred, kw


@pytest.mark.parametrize("name, alpha", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("case", ["plain", "clip_smoothing_masked", "ref_err_shared_interleaved_none", "ipo_clip"])
def test_reference_gradgradcheck(name, alpha, case):
    """The reference's backward is differentiable: gradgradcheck in float64 (the fused backends refuse double
    backward and point here)."""
    kw = dict(divergence=name, alpha=alpha, beta=400.0)
    if case == "plain":
        pred, inputs = _gradgrad_case(11)
    elif case == "clip_smoothing_masked":
        pred, inputs = _gradgrad_case(12, masked=True)
        kw.update(logratio_clip=1.5, label_smoothing=0.1, gamma=1.7)
    elif case == "ipo_clip":
        pred, inputs = _gradgrad_case(15)
        kw.update(loss_type="ipo", ipo_tau=0.5, logratio_clip=2.0)
    else:
        pred, inputs = _gradgrad_case(13, shared=True, masked=True, ref_err=True, layout="interleaved")
        kw.update(layout="interleaved", reduction="none", pair_weight=torch.tensor([0.7, 1.3], dtype=torch.float64))
    x = pred.clone().requires_grad_()

    def fn(p):
        return fdpo_loss_reference(p, **inputs, **kw)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_reference_double_backward_is_the_exact_second_derivative():
    """The penalty use case of issue 12: d/dx |grad|^2 of the reference equals central differences of |grad|^2."""
    pred, inputs = _gradgrad_case(14, masked=True)
    kw = dict(divergence="js", beta=400.0, logratio_clip=2.0, label_smoothing=0.05)

    def penalty(p):
        p = p.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fdpo_loss_reference(p, **inputs, **kw), p, create_graph=True)
        return grad.pow(2).sum(), p

    value, p = penalty(pred)
    (analytic,) = torch.autograd.grad(value, p)
    direction = torch.randn(pred.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-6
    numeric = (penalty(pred + h * direction)[0] - penalty(pred - h * direction)[0]) / (2 * h)
    assert analytic.abs().max() > 0
    torch.testing.assert_close((analytic * direction).sum(), numeric.detach(), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------- the divergences API


@pytest.mark.parametrize("name, alpha", DIVERGENCES, ids=DIV_IDS)
def test_psi_diff_and_soft_clip_gradients_are_psi_prime_and_sech2(name, alpha):
    """Under autograd, psi_diff's gradient is (psi'(d_w), -psi'(d_l)) exactly (also at ties and beyond expm1's
    cancellation), and soft_clip's is sech^2 (not 1 - tanh^2, which is 0 beyond |d/c| ~ 19)."""
    div = get_divergence(name, alpha)
    d_w = torch.tensor([0.0, 1.0, -100.0, 0.0, 300.0, -3.0], dtype=torch.float64, requires_grad=True)
    d_l = torch.tensor([0.0, 1.0, 0.0, -100.0, -300.0, 2.0], dtype=torch.float64, requires_grad=True)
    gw, gl = torch.autograd.grad(psi_diff(div, d_w, d_l).sum(), (d_w, d_l))
    # psi' is formed as exp(log psi'): a few ulps times |k d| (d up to 300 here)
    torch.testing.assert_close(gw, psi_slope(div, d_w.detach()), rtol=1e-13, atol=0)
    torch.testing.assert_close(gl, -psi_slope(div, d_l.detach()), rtol=1e-13, atol=0)
    d = torch.tensor([0.0, 1e-3, 5.0, 30.0, -60.0, 300.0], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(soft_clip(d, 1.5).sum(), d)
    want = torch.tensor(
        [float(mpmath.sech(mpmath.mpf(v) / mpmath.mpf(1.5)) ** 2) for v in d.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(slope, want, rtol=1e-14, atol=0)
    assert (slope > 0).all()
    # The clipped difference: the slope psi'(c tanh(r/c)) sech^2(r/c), also where psi' alone overflows.
    r = torch.tensor([-5000.0, 3.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(2, dtype=torch.float64)
    (g,) = torch.autograd.grad(clipped_psi_diff(div, r, zero, 720.0).sum(), r)
    assert g.isfinite().all() and (g > 0).all()


# ------------------------------------------------------------------ issue 25: non-finite inputs, overflowed products

_LOSS_TYPES = [("sigmoid", {}), ("hinge", {}), ("ipo", {"ipo_tau": 0.1})]


def _nonfinite_inputs(where: str, value: float):
    """Fresh inputs (B = 2, D = 5, masked) with one entry of ``where`` (in pair 0's winner row) set to ``value``."""
    g = torch.Generator().manual_seed(11)
    target = torch.randn(4, 5, generator=g)
    pred = target + torch.randn(4, 5, generator=g)
    ref = pred + 0.01 * torch.randn(4, 5, generator=g)
    mask = torch.rand(4, 5, generator=g) + 0.2
    inputs = dict(model_pred=pred, ref_pred=ref, target=target, mask=mask)
    if where == "ref_err":
        inputs["ref_err"] = ((ref - target) ** 2 * mask).sum(1) / mask.sum(1)
        del inputs["ref_pred"]
    changed = inputs[where].clone()
    changed.view(-1)[1] = value
    inputs[where] = changed
    return {k: v.to(DEVICE) for k, v in inputs.items()}


def _loss_stats_grad(backend, inputs, **kw):
    x = inputs["model_pred"].clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k != "model_pred"}
    fn = fdpo_loss_reference if backend == "reference" else fused_fdpo_loss
    extra = {} if backend == "reference" else {"backend": backend}
    loss, stats = fn(x, reduction="none", return_stats=True, **rest, **kw, **extra)
    loss.sum().backward()
    names = ("logits", "model_err", "ref_err", "logratio", "reward", "implicit_acc", "raw_model_loss")
    return {"loss": loss.detach(), **{n: getattr(stats, n) for n in names}, "grad": x.grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["model_pred", "ref_pred", "target", "mask", "ref_err"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_nonfinite_inputs_propagate_as_in_the_reference(backend, where):
    """A NaN or inf input entry gives NaN and inf exactly where the float64 reference has them, in the loss, every
    statistic and the gradient, for every divergence and loss type (issue 25: Triton's tl.maximum dropped a NaN, a
    finite loss log 2 for forward_kl, alpha and hellinger with NaN in one gradient row; hinge's z < 1 test turned
    a NaN logit into loss 0 on every backend; the cpu kernel's zero-row shortcut multiplied 0 by a NaN mask)."""
    for value in (float("nan"), float("inf")):
        inputs = _nonfinite_inputs(where, value)
        five = [(n, a) for n, a in DIVERGENCES if n != "alpha" or a == 0.5]
        for (name, alpha), (loss_type, extra) in [(d, lt) for d in five for lt in _LOSS_TYPES]:
            kw = dict(beta=10.0, divergence=name, alpha=alpha, loss_type=loss_type, **extra)
            got = _loss_stats_grad(backend, inputs, **kw)
            want = _loss_stats_grad("reference", {k: v.double() for k, v in inputs.items()}, **kw)
            for key, expected in want.items():
                torch.testing.assert_close(
                    got[key].double(),
                    expected,
                    rtol=1e-4,
                    atol=1e-6,
                    equal_nan=True,
                    msg=lambda m, tag=f"{where}={value} {name} {loss_type} {key}": f"{tag}: {m}",
                )


@pytest.mark.parametrize("backend, dtype, divergence, alpha, k", list(_exp_family_cases()))
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # lanes of tl.where not taken
def test_ipo_gradient_at_overflow_is_the_references_infinity(backend, dtype, divergence, alpha, k):
    """ipo with z past the dtype's range: dloss/dz = 2(z - m) is -inf, and the loser's slope psi'(1e4) underflows
    (its exact product is ~ -1e377): the gradient is the reference's signed inf, not 0 (issue 25: mul0 of the
    infinite g and the underflowed slope gave 0 on every backend)."""
    d_w, d_l = [-1e4, 0.5], [1e4, -0.25]
    kw = dict(divergence=divergence, alpha=alpha, loss_type="ipo", ipo_tau=0.1)
    _, loss, grad = _head_through_backend(backend, dtype, d_w, d_l, **kw)
    _, loss_r, grad_r = _reference_with(d_w, d_l, **kw)
    assert grad_r[2].item() == -math.inf  # the reference's loser gradient; its winner's is +inf
    torch.testing.assert_close(loss, loss_r.to(dtype).double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, grad_r.to(dtype).double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's fp64 -> fp32
def test_pair_weight_products_stay_representable(backend):
    """policy == reference with pair_weight 1e35 and 1e36 (fp32): beta/2 * w overflows float32, but d = 0 (loss
    log 2) and, for 1e35, the gradient coefficient (~4e37) fit; issue 25: -inf gradient and a NaN loss. Against the
    float64 reference; for 1e36 the coefficient itself (~4e38) is beyond float32, so that pair's gradient is the
    reference's sign times inf."""
    g = torch.Generator().manual_seed(12)
    target = torch.randn(4, 1, 3, generator=g)
    pred = target + torch.randn(4, 1, 3, generator=g)
    inputs = dict(model_pred=pred, ref_pred=pred.clone(), target=target, pair_weight=torch.tensor([1e35, 1e36]))
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    got = _loss_stats_grad(backend, inputs, beta=5000.0)
    want = _loss_stats_grad("reference", {k: v.double() for k, v in inputs.items()}, beta=5000.0)
    assert torch.equal(got["loss"].cpu(), torch.full((2,), math.log(2), dtype=torch.float32))
    grad_1e35 = got["grad"][[0, 2]].double()  # pair 0's rows (halves: winners 0..B-1, losers B..2B-1)
    assert grad_1e35.isfinite().all() and grad_1e35.abs().max() > 1e37
    torch.testing.assert_close(grad_1e35, want["grad"][[0, 2]], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["grad"][[1, 3]].double(), want["grad"][[1, 3]].sign() * math.inf)
