"""Every backend against the float64 reference: one set of correctness tests, parametrized over the backends the
registry offers here (tests/harness.py). Backend-specific behaviour (ISA copies, streaming stores, thread counts,
huge pages: tests/test_cpu_kernel.py; Triton helpers: tests/test_triton_kernels.py; CUDA graphs, 2^31 elements:
tests/test_gpu.py) lives in the backend's own file.

Triton runs on CPU tensors in its interpreter (~1 ms per program instance, tests/conftest.py sets
TRITON_INTERPRET=1 on machines without CUDA): its grid is a subset, chosen per test and said so beside it.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from harness import (
    BETA,
    BF16,
    DIV_IDS,
    DIVERGENCES,
    F16,
    F32,
    F64,
    TOL,
    as64,
    assert_close,
    backend_params,
    check_against_reference,
    check_implicit_acc,
    kernel_dtypes,
    make_inputs,
    rows_of_pairs,
    run,
    upstream_for,
    why_unavailable,
    winner_loser,
)

from fdiv_kernels import fused_fdpo_loss

BACKENDS = backend_params()


def _ids(dtype):
    return str(dtype).split(".")[-1]


def _grid(*, triton=lambda **_: True, dtypes=None, **axes):
    """pytest params (backend, device, dtype, *axes) over every backend and dtype, keeping for triton only the
    combinations ``triton(dtype=..., **axes)`` accepts (interpreter time)."""
    names = list(axes)
    out = []
    for bp in BACKENDS:
        backend, device = bp.values
        for dtype in dtypes or kernel_dtypes(backend):
            if dtype not in kernel_dtypes(backend):
                continue
            for combo in itertools.product(*axes.values()):
                values = dict(zip(names, combo))
                if backend == "triton" and device == "cpu" and not triton(dtype=dtype, **values):
                    continue
                ids = [bp.id, _ids(dtype)] + [str(v) for v in combo]
                out.append(pytest.param(backend, device, dtype, *combo, marks=bp.marks, id="-".join(ids)))
    return out


# ----------------------------------------------------------------------------------------------- every divergence


@pytest.mark.parametrize("backend, device, dtype, div", _grid(div=DIV_IDS))
def test_every_divergence_matches_reference(backend, device, dtype, div):
    """Loss, every statistic and the gradient (non-unit upstream) of each divergence, in each dtype."""
    name, alpha = DIVERGENCES[DIV_IDS.index(div)]
    inputs = make_inputs(B=3, shape=(3, 17, 13), dtype=dtype, seed=1, device=device)
    check_against_reference(backend, inputs, torch.tensor(1.7), divergence=name, alpha=alpha, beta=BETA)


# ----------------------------------------------------------------------------------------------- options

# name -> (make_inputs arguments, loss keyword arguments)
CASES = {
    "4d_B1": (dict(B=1, shape=(4, 9, 11)), {}),
    "5d_B7": (dict(B=7, shape=(2, 3, 5, 7)), {}),
    "odd_D": (dict(B=2, shape=(1, 3, 7)), {}),  # D = 21: no full vector, only a tail
    "B32_small": (dict(B=32, shape=(5,)), {}),  # many pairs of few elements
    "multi_chunk": (dict(B=2, shape=(3, 67, 71)), {}),  # D = 14271: several chunks, a block remainder and a tail
    "shared_target": (dict(shared_target=True), {}),
    "ref_err": (dict(ref_err=True), {}),
    "ref_err_shared_target": (dict(ref_err=True, shared_target=True), {}),
    "ref_err_interleaved": (dict(ref_err=True, layout="interleaved"), dict(layout="interleaved")),
    "mask_per_sample": (dict(mask="per_sample"), {}),
    "mask_shared": (dict(mask="shared", shared_target=True), {}),
    "mask_shared_separate_target": (dict(mask="shared"), {}),
    # With "sum" and ref_err the errors are D times larger and so is their rounding: beta = 5 keeps d's error small.
    "mask_ref_err_sum": (
        dict(mask="per_sample", ref_err=True, err_reduction="sum", beta=5.0),
        dict(err_reduction="sum", beta=5.0),
    ),
    "mask_mean_all": (dict(mask="per_sample", err_reduction="mean_all"), dict(err_reduction="mean_all")),
    "interleaved": (dict(layout="interleaved"), dict(layout="interleaved")),
    "interleaved_shared_mask": (
        dict(shared_target=True, mask="shared", layout="interleaved"),
        dict(layout="interleaved"),
    ),
    "pair_weight": (dict(pair_weight=True), {}),
    "pair_weight_ref_err": (dict(pair_weight=True, ref_err=True), {}),
    "label_smoothing": ({}, dict(label_smoothing=0.2)),
    "logratio_clip": (dict(d_scale=4.0), dict(logratio_clip=3.0)),
    "gamma_full_beta": (
        dict(beta=2500.0, beta_convention="full"),
        dict(gamma=2.5, beta_convention="full", beta=2500.0),
    ),
    "err_sum": (dict(err_reduction="sum"), dict(err_reduction="sum")),
    "reduction_sum": ({}, dict(reduction="sum")),
    "reduction_none": (dict(B=4), dict(reduction="none")),
    "reduction_none_B1": (dict(B=1), dict(reduction="none")),
    "strict_ties": ({}, dict(implicit_acc_ties="strict")),
    "mean_all_shared_mask": (
        dict(mask="shared", shared_target=True, err_reduction="mean_all"),
        dict(err_reduction="mean_all"),
    ),
    "mean_all_no_mask": (dict(err_reduction="mean_all"), dict(err_reduction="mean_all")),
}
OPTION_DIVERGENCES = [("reverse_kl", 0.5), ("alpha", 0.3), ("js", 0.5)]
# Triton (interpreter): each case once, in fp32, with one divergence (cycled); bf16 and fp16 on a few cases; the
# mean_all cases with every divergence (issue 25: Triton's mean_all had 3 tests).
_TRITON_HALF_CASES = {
    "shared_target": BF16,
    "mask_shared": F16,
    "interleaved_shared_mask": BF16,
    "ref_err": BF16,
    "pair_weight": F16,
    "reduction_none": BF16,
}


def _triton_option(dtype, case, div):
    if "mean_all" in case:  # Triton's own count path (the row length, not the mask's sum): every divergence
        return dtype == F32 or (case == "mask_mean_all" and dtype == BF16 and div == "js")
    cycled = OPTION_DIVERGENCES[list(CASES).index(case) % len(OPTION_DIVERGENCES)][0]
    return div == cycled and (dtype == F32 or _TRITON_HALF_CASES.get(case) == dtype)


@pytest.mark.parametrize(
    "backend, device, dtype, case, div",
    _grid(case=list(CASES), div=[n for n, _ in OPTION_DIVERGENCES], triton=_triton_option),
)
def test_options_match_reference(backend, device, dtype, case, div):
    spec, kw = CASES[case]
    kw = {"beta": BETA, **kw, "divergence": div, "alpha": dict(OPTION_DIVERGENCES)[div]}
    inputs = make_inputs(dtype=dtype, seed=list(CASES).index(case), device=device, **spec)
    B = inputs["model_pred"].shape[0] // 2
    upstream = upstream_for((B,) if kw.get("reduction") == "none" else (), B)
    _, stats, grad = check_against_reference(backend, inputs, upstream.to(device), **kw)
    assert grad.abs().amax() > 0  # a live gradient: the comparison above is not of zeros
    if "mask" in inputs:  # the empty-mask row (or pair) 0: error 0, gradient 0
        empty = (
            [0]
            if inputs["mask"].shape[0] == 2 * B
            else list(rows_of_pairs(torch.arange(B), kw.get("layout", "halves")).eq(0).nonzero().flatten().tolist())
        )
        assert (stats["model_err"][empty] == 0).all() and (grad[empty] == 0).all()


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if p.values[0] not in ("cpu", "torch")])
def test_float64_is_a_documented_error_on_fp32_only_backends(backend, device):
    inputs = make_inputs(dtype=F64, device=device)
    with pytest.raises(
        TypeError,
        match=rf"backend='{backend}' supports float32, float16 and bfloat16 inputs; got "
        r"torch.float64 \(float64 runs on backend='cpu' or 'torch'\)",
    ):
        fused_fdpo_loss(**inputs, backend=backend)


# ----------------------------------------------------------------------------------------------- layouts, views


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_non_contiguous_inputs_match_reference(backend, device):
    """Every tensor input as a strided view (a permutation, and every other element of a wider buffer): the
    backend must read through the strides, and the gradient must come back in model_pred's view."""
    inputs = make_inputs(B=2, shape=(4, 6, 5), seed=4, shared_target=True, mask="shared", device=device)
    perm = {}
    for k, v in inputs.items():
        if k == "model_pred":
            perm[k] = v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        else:  # every other element of a buffer twice as wide
            wide = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype, device=v.device)
            wide[..., ::2] = v
            perm[k] = wide[..., ::2]
        assert not perm[k].is_contiguous() and torch.equal(perm[k], v)
    loss, stats, grad = check_against_reference(backend, perm, divergence="js", beta=BETA)
    loss_c, stats_c, grad_c = run(backend, inputs, divergence="js", beta=BETA)
    assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_target_mask_and_ref_of_each_sample_change_the_loss(backend, device):
    """Each row of target, mask and ref_pred (and each pair_weight) is read, and read for its own sample: perturbing
    one of them changes exactly the statistics of that sample, and the loss."""
    inputs = make_inputs(B=2, shape=(3, 5, 7), seed=8, mask="per_sample", pair_weight=True, device=device)
    inputs["mask"][0] = 0.5  # no empty row here: every row's error depends on its target
    base_loss, base, _ = run(backend, inputs, divergence="js", beta=BETA)
    for key, row in [("target", 1), ("target", 3), ("mask", 2), ("ref_pred", 1), ("pair_weight", 1)]:
        changed = {k: v.clone() for k, v in inputs.items()}
        v = changed[key][row]  # a non-uniform change (a uniformly scaled mask leaves its masked mean alone)
        changed[key][row] = v * (1.0 + 0.05 * torch.linspace(1, 2, v.numel()).reshape(v.shape).to(v))
        loss, stats, _ = run(backend, changed, divergence="js", beta=BETA)
        assert loss != base_loss, (key, row)
        err = "ref_err" if key == "ref_pred" else "model_err" if key != "pair_weight" else None
        if err is not None:
            moved = (stats[err] != base[err]).nonzero().flatten().tolist()
            assert moved == [row], (key, row, moved)


# ----------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if p.values[0] in ("cpu", "torch")])
@pytest.mark.parametrize("div", DIV_IDS)
@pytest.mark.parametrize("case", ["base", "shared_masked_interleaved", "ref_err_clip_none"])
def test_gradcheck_float64(backend, device, div, case):
    """The backend's own backward (C++ or the torch backend's custom autograd) against finite differences."""
    name, alpha = DIVERGENCES[DIV_IDS.index(div)]
    spec = dict(B=2, shape=(2, 3, 5), dtype=F64, seed=21, device=device)
    kw = dict(beta=BETA, divergence=name, alpha=alpha, label_smoothing=0.1, gamma=1.5)
    if case == "shared_masked_interleaved":
        spec.update(shared_target=True, mask="shared", pair_weight=True, layout="interleaved")
        kw["layout"] = "interleaved"
    elif case == "ref_err_clip_none":
        spec.update(ref_err=True, d_scale=3.0)
        kw.update(logratio_clip=2.0, reduction="none")
    inputs = make_inputs(**spec)
    x = inputs.pop("model_pred").clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: fused_fdpo_loss(p, backend=backend, **inputs, **kw), (x,), eps=1e-6, atol=1e-6, rtol=1e-4
    )


# ----------------------------------------------------------------------------------------------- implicit_acc ties


def _signed_pairs(signs, device, shared_target=False, layout="halves"):
    """fp32 pairs whose logit has the given sign (+1, -1, 0 = an exact tie: policy == reference on both samples).

    z > 0: the winner's reference error is larger than its own (d_w > 0), the loser's equal (d_l = 0); z < 0 the
    reverse. psi is increasing, so the sign holds for every divergence. Targets on a grid of 1/4, residuals of 1/2
    and a reference residual 5/4 times the model's, over D = 16 elements: every error is exact in fp32, so cached
    reference errors tie exactly too."""
    B = len(signs)
    g = torch.Generator().manual_seed(31)
    target = torch.randint(-8, 9, (B if shared_target else 2 * B, 4, 4), generator=g).to(F64) / 4
    t_rows = rows_of_pairs(target, layout) if shared_target else target
    residual = torch.randint(1, 4, (2 * B, 4, 4), generator=g).to(F64) / 2
    residual = residual * (torch.randint(0, 2, residual.shape, generator=g) * 2 - 1)
    pred = t_rows + residual
    scale = torch.ones(2 * B, dtype=F64)
    w_scale, l_scale = winner_loser(scale, layout)  # views into scale
    for p, s in enumerate(signs):
        if s > 0:
            w_scale[p] = 1.25
        elif s < 0:
            l_scale[p] = 1.25
    ref = t_rows + scale[:, None, None] * residual
    return {k: v.to(device, F32) for k, v in dict(model_pred=pred, ref_pred=ref, target=target).items()}


TIE_SIGNS = {"B1_tie": [0], "B1_win": [1], "B1_loss": [-1], "B5": [0, 1, 0, -1, 1]}


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("ties", ["half", "strict"])
@pytest.mark.parametrize("signs", list(TIE_SIGNS))
@pytest.mark.parametrize("variant", ["plain", "shared_interleaved", "ref_err"])
def test_implicit_acc_counts_exact_ties(backend, device, ties, signs, variant):
    """implicit_acc = mean of [z > 0], ties z == 0 counting 1/2 ("half") or 0 ("strict"), exact also at B = 1."""
    signs_list = TIE_SIGNS[signs]
    B = len(signs_list)
    layout = "interleaved" if variant == "shared_interleaved" else "halves"
    inputs = _signed_pairs(signs_list, device, shared_target=variant != "plain", layout=layout)
    kw = dict(divergence="js", beta=500.0, implicit_acc_ties=ties, layout=layout)
    if variant == "ref_err":  # the exact reference errors (exact in fp32 too, by construction)
        _, exact, _ = run("reference", as64(inputs), **kw)
        inputs = {k: v for k, v in inputs.items() if k != "ref_pred"}
        inputs["ref_err"] = exact["ref_err"].float()
    _, stats, _ = run(backend, inputs, **kw)
    z = stats["logits"].cpu()
    for p, s in enumerate(signs_list):
        assert z[p] > 0 if s > 0 else z[p] < 0 if s < 0 else z[p] == 0, (p, s, z)
    expected = sum(1.0 if s > 0 else (0.5 if ties == "half" else 0.0) if s == 0 else 0.0 for s in signs_list) / B
    assert stats["implicit_acc"].item() == pytest.approx(expected, abs=1e-6)  # counts differ by >= 1/(2B)
    check_implicit_acc(stats, ties)


# ----------------------------------------------------------------------------------------------- extreme log-ratios


EXTREME_BETA = 50.0  # errors of order |d| / 25: residuals well above the targets' rounding, also in bf16


def extreme_inputs(
    d_w, d_l, dtype, *, beta=EXTREME_BETA, ref_path=False, shared_target=False, mask=None, layout="halves", seed=17
):
    """One pair per (d_w, d_l) whose log-ratios are those values (up to the inputs' rounding), with a mask.

    Each sample's error is scaled to its log-ratio (beta/2 * e ~ max(4 |d|, 4)) so that e_ref = e + d / (beta/2)
    stays positive and rounding moves d by a relative ~eps only. The mask, shared target and layout are applied
    before the reference errors are built, so the intended log-ratios really occur.
    ref_err path: ref_err = e + d / (beta/2). ref_pred path: ref = target + s (pred - target), s^2 = e_ref / e.
    """
    B, D = len(d_w), 96
    g = torch.Generator().manual_seed(seed)
    d = torch.empty(2 * B, dtype=F64)
    w, l_ = winner_loser(d, layout)
    w.copy_(torch.tensor(d_w, dtype=F64))
    l_.copy_(torch.tensor(d_l, dtype=F64))
    target = torch.randn(B if shared_target else 2 * B, D, generator=g, dtype=F64).to(dtype)
    t_rows = (rows_of_pairs(target, layout) if shared_target else target).double()
    m = None
    if mask is not None:
        m = (torch.rand(B if mask == "shared" else 2 * B, D, generator=g, dtype=F64) > 0.2).to(dtype)
    m_rows = None if m is None else (rows_of_pairs(m, layout) if mask == "shared" else m).double()
    e_goal = torch.clamp(4 * d.abs(), min=4.0) / (beta / 2)
    noise = torch.randn(2 * B, D, generator=g, dtype=F64)
    pred = (t_rows + noise * e_goal.sqrt()[:, None]).to(dtype)
    res2 = (pred.double() - t_rows) ** 2
    e = (res2 * m_rows).sum(1) / m_rows.sum(1) if m is not None else res2.mean(1)
    e_ref = e + d / (beta / 2)
    assert (e_ref > 0).all()
    acc = F64 if dtype == F64 else F32
    out = dict(model_pred=pred, target=target)
    if m is not None:
        out["mask"] = m
    if not ref_path:
        out["ref_err"] = e_ref.to(acc)
    else:
        s = torch.sqrt(e_ref / e)
        out["ref_pred"] = (t_rows + s[:, None] * (pred.double() - t_rows)).to(dtype)
    return out, d


# d values chosen away from the output dtype's overflow thresholds, so that "inf in fp32" is the same decision for
# the kernels (fp32 arithmetic) and for the float64 reference cast to fp32: |d| = 1e4 overflows even float64,
# exp(300) and exp(150) overflow fp32 only, |d| <= 40 stays finite everywhere.
# Pairs of equal huge log-ratios are left out: their logit is a difference of two numbers of 1e4 whose rounding
# (~1e4 * 2^-24 in fp32) decides its value, and past overflow the sign of its inf (pairs 2 and 3 stay 5 % apart).
EXTREME_W = (1e4, -1e4, 1e4, -1e4, 300.0, -300.0, 0.5, 40.0, -3.0)
EXTREME_L = (-1e4, 1e4, 0.95e4, -0.95e4, -300.0, 0.5, 1e4, -30.0, 2.0)
EXTREME_VARIANTS = {
    "ref_err": dict(),
    "ref_pred": dict(ref_path=True),
    "shared_target_mask": dict(ref_path=True, shared_target=True, mask="shared"),
    "interleaved_shared": dict(shared_target=True, mask="shared", layout="interleaved"),
    "mask_per_sample": dict(ref_path=True, mask="per_sample"),
}


def _triton_extreme(dtype, variant, div):
    """Interpreter time: Triton runs every divergence on the ref_err and interleaved-shared variants in fp32, the
    other variants with the overflowing divergences, and bf16 on the ref_pred variant for two of them."""
    if dtype == BF16:
        return variant == "ref_pred" and div in ("forward_kl", "hellinger")
    return variant in ("ref_err", "interleaved_shared") or div in ("forward_kl", "alpha-0.9", "hellinger")


@pytest.mark.parametrize(
    "backend, device, dtype, variant, div",
    _grid(dtypes=(F32, BF16, F64), variant=list(EXTREME_VARIANTS), div=DIV_IDS, triton=_triton_extreme),
)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, documented
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in lanes never stored
def test_extreme_logratios_match_reference(backend, device, dtype, variant, div):
    """|d| up to 1e4 without a clip: finite values, and the position and sign of every inf in the loss, the
    statistics and the gradient, as the float64 reference rounded to the output dtype has them; never NaN."""
    stats = _check_logratios(backend, device, dtype, variant, div, EXTREME_W, EXTREME_L)
    name = DIVERGENCES[DIV_IDS.index(div)][0]
    assert stats["logratio"].abs().max() > 9e3 and stats["reward"].isinf().any() or name in ("reverse_kl", "js")


# Moderate |d| (3 to 31): between the random inputs' O(1) and the extreme grid, where a stable form switched to an
# approximation too early shows (issue 25: JS's psi' as exp(-d) for d > 8 passed every test; it is off by
# exp(-d) relative, 3e-4 at d = 8 and 2e-9 at d = 20, against rtol 1e-4 in fp32 and 1e-9 in fp64).
MODERATE_W = (3.0, -5.0, 8.0, -12.0, 20.0, -31.0, 9.5, -3.0, 31.0)
MODERATE_L = (-8.0, 12.0, -3.0, 31.0, -20.0, 5.0, 15.0, 8.0, 12.0)


def _triton_moderate(dtype, variant, div):
    return variant == "ref_err"  # interpreter time: every divergence once, fp32


@pytest.mark.parametrize(
    "backend, device, dtype, variant, div",
    _grid(dtypes=(F32, F64), variant=["ref_err", "ref_pred"], div=DIV_IDS, triton=_triton_moderate),
)
def test_moderate_logratios_match_reference(backend, device, dtype, variant, div):
    """|d| in 3..31, every divergence, fp32 and fp64: loss, statistics and gradient against the float64 reference."""
    stats = _check_logratios(backend, device, dtype, variant, div, MODERATE_W, MODERATE_L)
    assert stats["logratio"].abs().max() > 30


def _check_logratios(backend, device, dtype, variant, div, d_w, d_l):
    """One backend against the float64 reference on pairs with log-ratios (d_w, d_l), with and without label
    smoothing and reduction; the position and sign of every inf must agree. Returns the last call's statistics."""
    name, alpha = DIVERGENCES[DIV_IDS.index(div)]
    spec = EXTREME_VARIANTS[variant]
    inputs, d = extreme_inputs(d_w, d_l, dtype, **spec)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    layout = spec.get("layout", "halves")
    acc = F64 if dtype == F64 else F32
    tol = TOL[dtype]
    combos = [("mean", 0.0), ("mean", 0.1), ("none", 0.0), ("none", 0.1)]
    if backend == "triton" and device == "cpu":
        combos = combos[::3]  # interpreter time: (mean, no smoothing) and (none, smoothing)
    for reduction, smoothing in combos:
        kw = dict(
            beta=EXTREME_BETA,
            divergence=name,
            alpha=alpha,
            reduction=reduction,
            label_smoothing=smoothing,
            layout=layout,
        )
        B = len(d_w)
        upstream = upstream_for((B,) if reduction == "none" else (), B).to(device)
        loss, stats, grad = run(backend, inputs, upstream, **kw)
        loss_r, stats_r, grad_r = run("reference", as64(inputs), upstream.double(), **kw)
        # the intended log-ratios really occur (to the inputs' rounding: relative eps of beta/2 e ~ 4 |d|)
        slack = 0.05 if dtype == BF16 else 1e-3
        assert ((stats_r["logratio"].cpu() - d).abs() <= slack * (d.abs() + 1)).all(), (stats_r["logratio"], d)
        rtol = 1e-4 if dtype != F64 else 1e-9  # exp of a rounded |d| <= 300: relative error ~ |d| eps
        assert_close(loss, loss_r.to(acc), rtol, "loss", elementwise=True)
        for n in ("logits", "model_err", "ref_err", "logratio", "reward", "raw_model_loss", "raw_ref_loss"):
            assert_close(stats[n], stats_r[n].to(acc), rtol, n, elementwise=True)
        check_implicit_acc(stats)
        # The reference's gradient rounded as the kernels round theirs: coefficient in the accumulate dtype
        # (where it overflows), the product in the output dtype.
        assert_close(grad, grad_r.to(dtype), max(rtol, tol.grad), "grad", row_scale=True)
    return stats


def _clip_cases():
    """(divergence, alpha, dtype, clip c, largest |d|) where the clipped gradient is representable.

    The gradient of a clipped d carries psi'(c) * sech^2(d/c) ~ exp(-k c) * 4 exp(-2 |d| / c) (k = 1 forward KL
    and JS, alpha, 1/2 hellinger, 0 reverse KL). float64 holds it for |d| = 1e4 and every divergence with c = 150.
    fp32 holds it (with margin, exponent budget k c + 2 |d| / c <= 60) for |d| up to min(1e4, 450 / k) with
    c = sqrt(2 |d| / k): reverse KL at 1e4 (c = 300), alpha=0.1 at 4500, the others at 450..900.
    """
    for (name, alpha), div_id in zip(DIVERGENCES, DIV_IDS):
        yield name, alpha, F64, 150.0, 1e4, f"{div_id}-f64"
        k = {"reverse_kl": 0.0, "alpha": alpha, "hellinger": 0.5}.get(name, 1.0)
        d_max = 1e4 if k == 0 else min(1e4, 450.0 / k)
        clip = 300.0 if k == 0 else math.sqrt(2 * d_max / k)
        yield name, alpha, F32, clip, d_max, f"{div_id}-f32"


def _clip_params():
    out = []
    for bp in BACKENDS:
        backend, device = bp.values
        for name, alpha, dtype, clip, d_max, cid in _clip_cases():
            for ref_path in (False, True):
                if dtype not in kernel_dtypes(backend) or (backend == "triton" and ref_path):
                    continue  # Triton (interpreter time): the ref_err path only
                out.append(
                    pytest.param(
                        backend,
                        device,
                        name,
                        alpha,
                        dtype,
                        clip,
                        d_max,
                        ref_path,
                        marks=bp.marks,
                        id=f"{bp.id}-{cid}-{'ref_pred' if ref_path else 'ref_err'}",
                    )
                )
    return out


@pytest.mark.parametrize("backend, device, divergence, alpha, dtype, clip, d_max, ref_path", _clip_params())
def test_logratio_clip_keeps_gradients_finite_and_matching(
    backend, device, divergence, alpha, dtype, clip, d_max, ref_path
):
    """A soft clip where |d| reaches d_max: loss, statistics and gradient finite, equal to the reference's, and a
    gradient on every pair whose loss is not saturated."""
    d_w = tuple(v * d_max for v in (1.0, -1.0, 1.0, -1.0, 0.7, -0.2))
    # Pairs 2 and 3 have equal log-ratios: both clip to c in every dtype, so z = 0 (unequal saturated log-ratios
    # make z = psi(d_w) - psi(d_l) ill-conditioned: psi'(c) times d's rounding, exp(30) * 2e-6 in fp32).
    d_l = tuple(v * d_max for v in (-1.0, 1.0, 1.0, -1.0, -0.9, 0.6))
    inputs, _ = extreme_inputs(d_w, d_l, dtype, beta=BETA, ref_path=ref_path)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    B = len(d_w)
    for smoothing in (0.0, 0.2):
        kw = dict(
            beta=BETA,
            divergence=divergence,
            alpha=alpha,
            logratio_clip=clip,
            reduction="none",
            label_smoothing=smoothing,
        )
        loss, stats, grad = run(backend, inputs, **kw)
        loss_r, stats_r, grad_r = run("reference", as64(inputs), **kw)
        assert loss.isfinite().all() and grad.isfinite().all() and stats["logits"].isfinite().all()
        assert stats["logratio"].abs().max() <= clip and stats["logratio"].abs().max() > 0.9 * clip
        rtol = 1e-4 if dtype != F64 else 1e-9
        assert_close(loss, loss_r.to(loss.dtype), rtol, "loss", elementwise=True)
        for n in ("logits", "logratio", "reward"):
            assert_close(stats[n], stats_r[n].to(loss.dtype), rtol, n, elementwise=True)
        # sech^2(d/c) of a d rounded relative to |d| ~ 1e4 moves by ~ 2 |d|/c * eps |d|/c: 1e-3 in fp32
        assert_close(grad, grad_r.to(dtype), 1e-3 if dtype != F64 else 1e-8, "grad", row_scale=True)
        z = stats["logits"].cpu()
        # With smoothing every sample gets a gradient; without it, the pairs whose loss is not saturated
        # (z <= 0: sigmoid(-z) >= 1/2) do; a pair with z >> 0 has loss ~ 0 and, rightly, a zero gradient.
        live = torch.ones(B, dtype=torch.bool) if smoothing > 0 else z <= 0
        assert live.any()
        per_row = grad.double().abs().amax(dim=1).cpu()
        assert (per_row[torch.cat([live, live])] > 0).all(), per_row


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("div", DIV_IDS)
def test_policy_equal_to_reference_has_the_right_gradient(backend, device, div):
    """The first fine-tuning step: policy == reference, every d is exactly 0, and the gradient is still right."""
    name, alpha = DIVERGENCES[DIV_IDS.index(div)]
    inputs = make_inputs(B=4, shape=(3, 5), seed=6, device=device)
    inputs["ref_pred"] = inputs["model_pred"].clone()
    _, stats, grad = check_against_reference(backend, inputs, divergence=name, alpha=alpha, label_smoothing=0.1)
    assert (stats["logratio"] == 0).all() and (stats["logits"] == 0).all() and grad.abs().amax(dim=1).min() > 0


# ----------------------------------------------------------------------------------------------- backend="auto"


def test_auto_picks_the_cpu_kernel_on_cpu_tensors():
    """With the extension built, "auto" on CPU tensors is the C++ kernel: the same bits as backend="cpu"."""
    from fdiv_kernels.backends import resolve_backend

    if why_unavailable("cpu") is not None:
        pytest.skip(f"backend='cpu' unavailable: {why_unavailable('cpu')} (tests/test_build_present.py fails)")
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    inputs = make_inputs(B=2, shape=(3, 5, 7), dtype=BF16, seed=40, mask="shared", shared_target=True)
    auto, cpu = run("auto", inputs, divergence="js"), run("cpu", inputs, divergence="js")
    assert torch.equal(auto[0], cpu[0]) and torch.equal(auto[2], cpu[2])


def test_auto_falls_back_to_torch_with_one_warning_that_says_why(monkeypatch):
    """Without a fused kernel for the device, "auto" warns once (with the reasons) and runs the torch backend."""
    import fdiv_kernels.backends as registry
    from fdiv_kernels import ops

    reason = "the C++ extension fdiv_kernels._C failed to load (simulated)"
    real = registry._why_unavailable
    monkeypatch.setattr(registry, "_why_unavailable", lambda n, d: reason if n == "cpu" else real(n, d))
    monkeypatch.setattr(ops, "_TABLE", {})  # the dispatch table, refilled with the patched registry
    monkeypatch.setattr(ops, "_warned", set())
    inputs = make_inputs(B=2, shape=(3, 5, 7), seed=41)
    with pytest.warns(
        RuntimeWarning,
        match=r"no fused kernel for cpu tensors \(.*failed to load \(simulated\)\); "
        r"backend='auto' uses the eager PyTorch backend",
    ):
        loss, _, grad = run("auto", inputs, divergence="hellinger")
    loss_t, _, grad_t = run("torch", inputs, divergence="hellinger")
    assert torch.equal(loss, loss_t) and torch.equal(grad, grad_t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("auto", inputs, divergence="hellinger")  # once per device type
