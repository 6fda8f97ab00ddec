"""The C++ CPU kernel (backend="cpu", csrc/fdpo_cpu.cpp) against the float64 reference and the torch backend.

Every comparison with the reference runs the reference on float64 copies of the very same (possibly bf16/fp16)
inputs, so the only differences are the kernel's fp32 accumulation and, for the gradient, its rounding to the
input dtype. Inputs are fresh random tensors with ref_pred = model_pred + small noise, scaled so that the
log-ratios d = beta/2 * (e_ref - e) are O(1) at beta = 5000.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss
from fdiv_kernels._validation import make_config
from fdiv_kernels.backends import cpp

_WHY = cpp.why_unavailable("cpu")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=str(_WHY))

BETA = 5000.0
STAT_NAMES = ("logits", "model_err", "ref_err", "logratio", "reward", "implicit_acc", "raw_model_loss", "raw_ref_loss")
DIVERGENCES = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("js", 0.5),
    ("alpha", 0.1),
    ("alpha", 0.5),
    ("alpha", 0.9),
    ("hellinger", 0.5),
]
DIV_IDS = [f"{n}-{a}" if n == "alpha" else n for n, a in DIVERGENCES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Forward: the kernel computes in fp32 whatever the input dtype (inputs are exact in fp32), so one tolerance.
FWD_RTOL = 2e-5
# Gradient: fp32 arithmetic, then rounded to the input dtype (half an ulp: 2^-9 bf16, 2^-12 fp16).
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 1.5e-3, torch.bfloat16: 6e-3, torch.float64: 1e-12}


@pytest.fixture(params=["auto", "generic"])
def isa(request, monkeypatch):
    """Run a test on the ISA copy the CPU gets (AVX2 on x86-64 machines that have it) and on the generic copy."""
    if request.param == "generic":
        monkeypatch.setenv("FDIV_KERNELS_CPU_ISA", "generic")
    else:
        monkeypatch.delenv("FDIV_KERNELS_CPU_ISA", raising=False)
    return request.param


def make_inputs(B=3, shape=(3, 17, 13), dtype=torch.float32, *, seed=0, shared_target=False, mask=None,
                ref_err=False, pair_weight=False, d_scale=1.0, kw=None):
    """Random inputs; the reference noise is scaled so that d ~ N(0, d_scale^2) at beta = 5000.

    ref_err=True replaces ref_pred by the reference errors the reference computes from it (in float64, with the
    err_reduction / layout of ``kw``), rounded to the accumulate dtype, as a trainer caching them would.
    """
    g = torch.Generator().manual_seed(seed)
    rows, D = 2 * B, math.prod(shape)
    pred = torch.randn(rows, *shape, generator=g, dtype=torch.float64)
    target = torch.randn(B if shared_target else rows, *shape, generator=g, dtype=torch.float64)
    # d = beta/2 * mean((ref - pred) * (ref + pred - 2 t)) ~ beta/2 * sigma * 2 sqrt(2) / sqrt(D) for ref = pred + sigma n
    sigma = d_scale * math.sqrt(D) / (BETA / 2 * 2 * math.sqrt(2))
    ref = pred + sigma * torch.randn(rows, *shape, generator=g, dtype=torch.float64)
    out = dict(model_pred=pred.to(dtype), ref_pred=ref.to(dtype), target=target.to(dtype))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if mask is not None:
        m_rows = B if mask == "shared" else rows
        m = (torch.rand(m_rows, *shape, generator=g) > 0.3).double() * torch.rand(m_rows, *shape, generator=g)
        m[0].zero_()  # a sample (or pair) with an empty mask: its masked-mean error is defined as 0
        out["mask"] = m.to(dtype)
    if pair_weight:
        out["pair_weight"] = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5).to(acc)
    if ref_err:
        keep = {k: v for k, v in (kw or {}).items() if k in ("err_reduction", "layout")}
        _, stats = fdpo_loss_reference(**as64(out), return_stats=True, **keep)
        out["ref_err"] = stats.ref_err.to(acc)
        del out["ref_pred"]
    return out


def as64(inputs):
    return {k: v.double() for k, v in inputs.items()}


def run(fn, inputs, upstream=None, **kw):
    """(loss, stats dict, grad of model_pred) with an upstream gradient (random, non-unit)."""
    x = inputs["model_pred"].clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k != "model_pred"}
    loss, stats = fn(x, return_stats=True, **rest, **kw)
    if upstream is None:
        upstream = torch.full_like(loss, 0.7)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), {n: getattr(stats, n) for n in STAT_NAMES}, x.grad


def kernel(x, **kw):
    return fused_fdpo_loss(x, backend="cpu", **kw)


def torch_backend(x, **kw):
    return fused_fdpo_loss(x, backend="torch", **kw)


def reference(x, **kw):
    return fdpo_loss_reference(x, **kw)


def assert_close(actual, expected, rtol, name):
    """|a - e| <= rtol * (|e| + max|e|): relative to each value and to the tensor's scale."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{name}: NaN"
    scale = expected.abs().max() if expected.numel() else 0.0
    err = (actual - expected).abs()
    bound = rtol * (expected.abs() + scale) + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{name}: max error {err.max().item():.3e} is {worst:.2f}x the tolerance (rtol={rtol})"


def check_against_reference(inputs, upstream=None, grad_rtol=None, **kw):
    dtype = inputs["model_pred"].dtype
    loss, stats, grad = run(kernel, inputs, upstream, **kw)
    loss_r, stats_r, grad_r = run(reference, as64(inputs), upstream, **kw)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and grad.dtype == dtype
    fwd_rtol = 1e-12 if dtype == torch.float64 else FWD_RTOL
    grad_rtol = grad_rtol or GRAD_RTOL[dtype]
    if "ref_err" in inputs:
        # d = beta/2 * (ref_err - e) from two rounded numbers: e's rounding alone costs ~beta/2 * e * eps
        # (documented: the direct form of e_ref - e needs ref_pred).
        fwd_rtol = grad_rtol = max(grad_rtol, 1e-9 if dtype == torch.float64 else 1e-3)
    assert_close(loss, loss_r, fwd_rtol, "loss")
    for n in STAT_NAMES:
        if n == "implicit_acc":  # a count of signs: exact unless a logit sits within rounding of 0
            assert stats[n].item() == pytest.approx(stats_r[n].item(), abs=1.0 / stats["logits"].numel() + 1e-9)
        else:
            assert_close(stats[n], stats_r[n], fwd_rtol, n)
    assert_close(grad, grad_r, grad_rtol, "grad")
    return loss, stats, grad


# ----------------------------------------------------------------------------------------------- against reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_len", [2**20 + 8, 2**20 + 3], ids=["aligned_rows", "odd_rows"])
@pytest.mark.parametrize("stream_stores", ["auto", "0"])
def test_large_gradient_paths_match_reference(dtype, row_len, stream_stores, isa, monkeypatch):
    """Gradients of 8-16 MB: non-temporal stores (aligned rows) and huge-page advice on the fresh output, the
    paths every real batch takes and small test shapes never reach; with streaming forced off as well."""
    if stream_stores != "auto":
        monkeypatch.setenv("FDIV_KERNELS_CPU_STREAM_STORES", stream_stores)
    # Small d_scale: at this row length the reference's own error (sigma^2 per element) already puts d near 0.5.
    inputs = make_inputs(B=2, shape=(row_len,), dtype=dtype, seed=7, shared_target=True, d_scale=0.1)
    _, stats, grad = check_against_reference(inputs, divergence="js", beta=BETA)
    assert stats["logratio"].abs().max() < 5 and grad.abs().amax(dim=1).min() > 1e-6  # a live gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES, ids=DIV_IDS)
def test_every_divergence_matches_reference(divergence, alpha, dtype, isa):
    inputs = make_inputs(B=3, shape=(3, 17, 13), dtype=dtype, seed=1)
    check_against_reference(inputs, upstream=torch.tensor(1.7), divergence=divergence, alpha=alpha, beta=BETA)


CASES = {
    "4d_B1": dict(B=1, shape=(4, 9, 11)),
    "5d_B7": dict(B=7, shape=(2, 3, 5, 7)),
    "multi_chunk": dict(B=2, shape=(3, 67, 71)),  # D = 14271: several chunks, a block remainder and a tail
    "shared_target": dict(shared_target=True),
    "shared_target_multi_chunk": dict(B=2, shape=(5, 41, 43), shared_target=True),
    "ref_err": dict(ref_err=True),
    "ref_err_shared_target": dict(ref_err=True, shared_target=True),
    "mask_per_sample": dict(mask="per_sample"),
    "mask_shared": dict(mask="shared", shared_target=True),
    "mask_shared_separate_target": dict(mask="shared"),
    "mask_ref_err_sum": dict(mask="per_sample", ref_err=True, kw=dict(err_reduction="sum", beta=5.0)),
    "interleaved": dict(kw=dict(layout="interleaved")),
    "interleaved_shared_mask": dict(shared_target=True, mask="shared", kw=dict(layout="interleaved")),
    "pair_weight": dict(pair_weight=True),
    "label_smoothing": dict(kw=dict(label_smoothing=0.2)),
    "logratio_clip": dict(d_scale=4.0, kw=dict(logratio_clip=3.0)),
    "gamma_full_beta": dict(kw=dict(gamma=2.5, beta_convention="full", beta=2500.0)),
    "err_sum": dict(kw=dict(err_reduction="sum", beta=5.0)),
    "reduction_sum": dict(kw=dict(reduction="sum")),
    "reduction_none": dict(B=4, kw=dict(reduction="none")),
    "reduction_none_B1": dict(B=1, kw=dict(reduction="none")),
    "strict_ties": dict(kw=dict(implicit_acc_ties="strict")),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence, alpha", [("reverse_kl", 0.5), ("alpha", 0.3), ("js", 0.5)],
                         ids=["reverse_kl", "alpha-0.3", "js"])
@pytest.mark.parametrize("case", list(CASES))
def test_options_match_reference(case, divergence, alpha, dtype):
    spec = dict(CASES[case])
    kw = spec.pop("kw", {})
    kw = {"beta": BETA, **kw}
    inputs = make_inputs(dtype=dtype, seed=list(CASES).index(case), kw=kw, **spec)
    B = inputs["model_pred"].shape[0] // 2
    upstream = torch.rand(B) + 0.5 if kw.get("reduction") == "none" else torch.tensor(-1.3)
    check_against_reference(inputs, upstream=upstream, divergence=divergence, alpha=alpha, **kw)


@pytest.mark.parametrize("case", ["multi_chunk", "mask_shared", "interleaved_shared_mask", "ref_err", "pair_weight"])
def test_generic_isa_copy_matches_reference(case, monkeypatch):
    monkeypatch.setenv("FDIV_KERNELS_CPU_ISA", "generic")
    spec = dict(CASES[case])
    kw = {"beta": BETA, **spec.pop("kw", {})}
    for dtype in DTYPES:
        check_against_reference(make_inputs(dtype=dtype, seed=7, kw=kw, **spec), divergence="hellinger", **kw)


@pytest.mark.parametrize("case", ["base", "multi_chunk", "mask_shared", "ref_err", "interleaved"])
def test_float64_inputs_compute_in_float64(case):
    spec = dict(CASES.get(case, {}))
    kw = {"beta": BETA, **spec.pop("kw", {})}
    check_against_reference(make_inputs(dtype=torch.float64, seed=3, kw=kw, **spec), upstream=torch.tensor(0.3),
                            divergence="alpha", alpha=0.7, **kw)


# ------------------------------------------------------------------------------------------- against torch backend


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", ["5d_B7", "multi_chunk", "shared_target", "mask_shared", "mask_ref_err_sum",
                                  "interleaved_shared_mask", "pair_weight", "reduction_none", "logratio_clip"])
def test_matches_torch_backend(case, dtype, isa):
    spec = dict(CASES[case])
    kw = {"beta": BETA, "divergence": "forward_kl", **spec.pop("kw", {})}
    inputs = make_inputs(dtype=dtype, seed=11, kw=kw, **spec)
    B = inputs["model_pred"].shape[0] // 2
    upstream = torch.rand(B) + 0.5 if kw.get("reduction") == "none" else torch.tensor(2.0)
    loss, stats, grad = run(kernel, inputs, upstream, **kw)
    loss_t, stats_t, grad_t = run(torch_backend, inputs, upstream, **kw)
    assert loss.dtype == loss_t.dtype and grad.dtype == grad_t.dtype
    rtol = 1e-12 if dtype == torch.float64 else FWD_RTOL
    if "ref_err" in inputs and dtype != torch.float64:
        rtol = 1e-3  # both subtract two fp32 numbers (cancellation), with e rounded differently
    assert_close(loss, loss_t, rtol, "loss")
    for n in STAT_NAMES:
        assert_close(stats[n], stats_t[n], rtol, n)
    # Both round fp32 values to the input dtype; rounding may differ by one ulp where the fp32 values differ.
    assert_close(grad, grad_t, max(GRAD_RTOL[dtype] * 2, rtol), "grad")


# ------------------------------------------------------------------------------------------------- the C++ ops


def _flat(x):
    return x.reshape(x.shape[0], -1).contiguous()


@pytest.mark.parametrize("D, stream", [(8 * 600 + 5, None), (8 * 700, "1"), (8 * 700, "0")],
                         ids=["tail", "aligned-streaming", "aligned-plain"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shared, masked, interleaved", [(False, False, False), (True, True, False),
                                                         (True, False, True), (False, True, True)])
def test_backward_op_is_exact(dtype, shared, masked, interleaved, D, stream, isa, monkeypatch):
    """grad = (grad_coef * G) * (pred - target) * m in fp32, rounded once to the input dtype: bitwise as torch,
    with plain and with non-temporal stores (FDIV_KERNELS_CPU_STREAM_STORES)."""
    if stream is not None:
        monkeypatch.setenv("FDIV_KERNELS_CPU_STREAM_STORES", stream)
    B = 3  # D: vector body (+ scalar tail), two chunks
    g = torch.Generator().manual_seed(5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    pred = (torch.randn(2 * B, D, generator=g) * 3).to(dtype)
    target = (torch.randn(B if shared else 2 * B, D, generator=g) * 3).to(dtype)
    mask = torch.rand(B if shared else 2 * B, D, generator=g).to(dtype) if masked else None
    # Coefficients that push the products into fp16/bf16 subnormals, overflow and everything between.
    coef = torch.tensor([1e-9, -3e-6, 0.37, -1.0, 7e3, -1e5], dtype=acc)
    t_rows = torch.arange(2 * B) // 2 if interleaved else torch.arange(2 * B) % B
    pair_of_row = t_rows
    for grad_loss in (torch.tensor(0.7, dtype=acc), torch.rand(B, generator=g).to(acc) + 0.5):
        out = torch.ops.fdiv_kernels.fdpo_backward(grad_loss, pred, target, mask, coef, interleaved)
        G = grad_loss[pair_of_row] if grad_loss.dim() == 1 else grad_loss
        tg = target.to(acc)[t_rows] if shared else target.to(acc)
        expected = (coef * G)[:, None] * (pred.to(acc) - tg)
        if masked:
            expected = expected * (mask.to(acc)[t_rows] if shared else mask.to(acc))
        expected = expected.to(dtype)
        assert out.dtype == dtype and out.shape == pred.shape
        assert torch.equal(out.view(torch.uint8) if dtype != torch.float64 else out, 
                           expected.view(torch.uint8) if dtype != torch.float64 else expected)


@pytest.mark.parametrize("D", [8, 3], ids=["vector", "scalar_tail"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_conversions_are_exact(dtype, D, isa):
    """Every finite 16-bit pattern, subnormals included, loads exactly (per-row sums of squares of D values) and
    stores exactly (backward with coefficient 1 and target 0 reproduces the input bits)."""
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[x.isfinite() & (x.float().abs() < (1e4 if dtype == torch.float16 else 1e15))]
    n = (x.numel() // (2 * D)) * 2 * D
    rows = x[:n].reshape(-1, D)
    target = torch.zeros_like(rows)
    pairs = rows.shape[0] // 2
    loss, logits, stats, summary, coef = torch.ops.fdiv_kernels.fdpo_forward(
        rows, None, target, torch.zeros(2 * pairs), None, None, *make_config(beta=1.0, err_reduction="sum").op_scalars())
    expected = (rows.double() ** 2).sum(dim=1)
    torch.testing.assert_close(stats[0].double(), expected, rtol=1e-6, atol=1e-30)
    grad = torch.ops.fdiv_kernels.fdpo_backward(torch.tensor(1.0), rows, target, None, torch.ones(2 * pairs), False)
    assert torch.equal(grad.view(torch.int16), rows.view(torch.int16))


def test_forward_op_outputs_follow_the_contract():
    inputs = make_inputs(B=3, shape=(4, 5, 6), dtype=torch.bfloat16, seed=2)
    p, r, t = (_flat(inputs[k]) for k in ("model_pred", "ref_pred", "target"))
    for reduction, loss_shape in ((0, (3,)), (1, ()), (2, ())):
        scalars = make_config(beta=BETA, divergence="js", reduction=["none", "mean", "sum"][reduction]).op_scalars()
        loss, logits, stats, summary, coef = torch.ops.fdiv_kernels.fdpo_forward(p, r, t, None, None, None, *scalars)
        assert loss.shape == loss_shape and logits.shape == (3,) and stats.shape == (4, 6) and coef.shape == (6,)
        assert summary.shape == (3,)
        assert {loss.dtype, logits.dtype, stats.dtype, summary.dtype, coef.dtype} == {torch.float32}
    with pytest.raises(RuntimeError, match="exactly one of ref_pred and ref_err"):
        torch.ops.fdiv_kernels.fdpo_forward(p, r, t, torch.zeros(6), None, None, *scalars)
    with pytest.raises(RuntimeError, match="target must have model_pred's shape"):
        torch.ops.fdiv_kernels.fdpo_forward(p, r, t[:, :-1], None, None, None, *scalars)


def test_non_contiguous_inputs():
    inputs = make_inputs(B=2, shape=(4, 6, 5), seed=4)
    perm = {k: v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for k, v in inputs.items()}
    assert not perm["model_pred"].is_contiguous()
    a = run(kernel, perm, beta=BETA, divergence="js")
    b = run(kernel, inputs, beta=BETA, divergence="js")
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


# ------------------------------------------------------------------------------------------------- determinism


def _bits(result):
    loss, stats, grad = result
    return [loss, *stats.values(), grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_thread_counts(dtype):
    # 4 pairs x 5 chunks: enough work items for at::parallel_for to split them over threads.
    inputs = make_inputs(B=4, shape=(4, 65, 67), dtype=dtype, seed=9, shared_target=True, mask="per_sample")
    kw = dict(beta=BETA, divergence="alpha", alpha=0.4, pair_weight=torch.rand(4) + 0.5)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (2, 1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_bits(run(kernel, inputs, **kw)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_isa_copies_agree(monkeypatch):
    """The generic and the AVX2 copies differ at most by FMA contraction (fp32 rounding)."""
    inputs = make_inputs(B=2, shape=(3, 67, 71), dtype=torch.bfloat16, seed=12, mask="shared")
    auto = run(kernel, inputs, beta=BETA)
    monkeypatch.setenv("FDIV_KERNELS_CPU_ISA", "generic")
    generic = run(kernel, inputs, beta=BETA)
    assert_close(auto[0], generic[0], 1e-5, "loss")
    for n in STAT_NAMES:
        assert_close(auto[1][n], generic[1][n], 1e-5, n)
    assert_close(auto[2], generic[2], GRAD_RTOL[torch.bfloat16] * 2, "grad")


# ------------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("divergence, alpha", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("case", ["base", "shared_masked_interleaved", "ref_err_clip_none"])
def test_gradcheck_float64(divergence, alpha, case):
    spec = dict(B=2, shape=(2, 3, 5), dtype=torch.float64, seed=21)
    kw = dict(beta=BETA, divergence=divergence, alpha=alpha, label_smoothing=0.1, gamma=1.5)
    if case == "shared_masked_interleaved":
        spec.update(shared_target=True, mask="shared", pair_weight=True)
        kw["layout"] = "interleaved"
    elif case == "ref_err_clip_none":
        spec.update(ref_err=True, d_scale=3.0)
        kw.update(logratio_clip=2.0, reduction="none")
    inputs = make_inputs(**spec, kw=kw)
    x = inputs.pop("model_pred").clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: fused_fdpo_loss(p, backend="cpu", **inputs, **kw), (x,),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- extreme d


def _extreme_inputs(d_w, d_l, dtype, beta=BETA, ref_path=False):
    """One pair per (d_w, d_l) with those log-ratios (up to rounding).

    ref_err path: ref_err = e + d / (beta / 2). ref_pred path: ref = target + s * (pred - target), s^2 = e_ref / e.
    """
    B, D = len(d_w), 96
    g = torch.Generator().manual_seed(17)
    target = torch.randn(2 * B, D, generator=g, dtype=torch.float64)
    pred = (target + 4.0 * torch.randn(2 * B, D, generator=g, dtype=torch.float64)).to(dtype)  # e ~ 16
    target = target.to(dtype)
    e = ((pred.double() - target.double()) ** 2).mean(dim=1)
    d = torch.tensor(list(d_w) + list(d_l), dtype=torch.float64)
    e_ref = e + d / (beta / 2)
    assert (e_ref > 0).all()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if not ref_path:
        return dict(model_pred=pred, target=target, ref_err=e_ref.to(acc))
    s = torch.sqrt(e_ref / e)
    ref = target.double() + s[:, None] * (pred.double() - target.double())
    return dict(model_pred=pred, target=target, ref_pred=ref.to(dtype))


EXTREME_W = (1e4, -1e4, 1e4, -1e4, 300.0, -300.0, 0.5, 40.0)
EXTREME_L = (-1e4, 1e4, 1e4, -1e4, -300.0, 0.5, 1e4, -90.0)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES, ids=DIV_IDS)
def test_extreme_logratios_give_no_nan(divergence, alpha, dtype, backend):
    """|d| up to 1e4 without a clip: loss, stats and gradient may overflow to +-inf (documented) but never NaN,
    also where pred == target (bf16 rounds some elements equal) and where the mask is 0. Every CPU-runnable
    backend: the overflowed coefficient times a zero residual or mask must give 0 in each backward."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/fp16/bf16 inputs")

    def kernel(x, **kw):
        return fused_fdpo_loss(x, backend=backend, **kw)

    inputs = _extreme_inputs(EXTREME_W, EXTREME_L, dtype)
    inputs["mask"] = (torch.rand(inputs["model_pred"].shape, generator=torch.Generator().manual_seed(3)) > 0.2
                      ).to(dtype)
    for reduction in ("mean", "none"):
        for smoothing in (0.0, 0.1):
            loss, stats, grad = run(kernel, inputs, beta=BETA, divergence=divergence, alpha=alpha,
                                    reduction=reduction, label_smoothing=smoothing)
            assert not loss.isnan().any(), "loss"
            for n in STAT_NAMES:
                assert not stats[n].isnan().any(), n
            assert not grad.isnan().any(), "grad"
            assert (loss >= 0).all()
    assert stats["logratio"].abs().max() > 9e3  # the log-ratios really are extreme


def _clip_cases():
    """(divergence, alpha, dtype, clip c, largest |d|) where the clipped gradient is representable.

    The gradient of a clipped d carries psi'(c) * sech^2(d/c) ~ exp(-k c) * 4 exp(-2 |d| / c) (k = 1 forward KL
    and JS, alpha, 1/2 hellinger, 0 reverse KL). float64 holds it for |d| = 1e4 and every divergence with c = 150.
    fp32 holds it (with margin, exponent budget k c + 2 |d| / c <= 60) for |d| up to min(1e4, 450 / k) with
    c = sqrt(2 |d| / k): reverse KL at 1e4 (c = 300), alpha=0.1 at 4500, the others at 450..900.
    """
    for (name, alpha), div_id in zip(DIVERGENCES, DIV_IDS):
        yield pytest.param(name, alpha, torch.float64, 150.0, 1e4, id=f"{div_id}-f64")
        k = {"reverse_kl": 0.0, "alpha": alpha, "hellinger": 0.5}.get(name, 1.0)
        d_max = 1e4 if k == 0 else min(1e4, 450.0 / k)
        clip = 300.0 if k == 0 else math.sqrt(2 * d_max / k)
        yield pytest.param(name, alpha, torch.float32, clip, d_max, id=f"{div_id}-f32")


@pytest.mark.parametrize("divergence, alpha, dtype, clip, d_max", list(_clip_cases()))
@pytest.mark.parametrize("ref_path", [False, True], ids=["ref_err", "ref_pred"])
def test_logratio_clip_keeps_gradients_finite_and_nonzero(divergence, alpha, dtype, clip, d_max, ref_path):
    d_w = tuple(v * d_max for v in (1.0, -1.0, 1.0, -1.0, 0.7, -0.2))
    d_l = tuple(v * d_max for v in (-1.0, 1.0, 1.0, -1.0, -0.9, 0.6))
    inputs = _extreme_inputs(d_w, d_l, dtype, ref_path=ref_path)
    for smoothing in (0.0, 0.2):
        loss, stats, grad = run(kernel, inputs, beta=BETA, divergence=divergence, alpha=alpha,
                                logratio_clip=clip, reduction="none", label_smoothing=smoothing)
        assert loss.isfinite().all() and grad.isfinite().all() and stats["logits"].isfinite().all()
        assert stats["logratio"].abs().max() <= clip and stats["logratio"].abs().max() > 0.9 * clip
        per_row = grad.double().abs().amax(dim=1)
        B = len(d_w)
        z = stats["logits"]
        # With smoothing every sample gets a gradient; without it, the pairs whose loss is not saturated
        # (z <= 0: sigmoid(-z) >= 1/2) do; a pair with z >> 0 has loss ~ 0 and, rightly, a zero gradient.
        live = torch.ones(B, dtype=torch.bool) if smoothing > 0 else z <= 0
        assert live.any()
        live_rows = torch.cat([live, live])
        assert (per_row[live_rows] > 0).all(), per_row
        expected = run(reference, as64(inputs), beta=BETA, divergence=divergence, alpha=alpha,
                       logratio_clip=clip, reduction="none", label_smoothing=smoothing)
        assert_close(loss, expected[0], 1e-4 if dtype != torch.float64 else 1e-9, "loss")
