"""The forward's cross term (issue 23): with the op configuration's cross_term, summary[3] is
X = sum over pairs and elements of (pred_w - target_w)(pred_l - target_l), reduced in the same pass as the errors,
and the Diffusion-SDPO safeguard (heads.sdpo_lambda) reads it instead of making a pass of its own."""

import pytest
import torch
from harness import cpu_backend_params

from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss, ops
from fdiv_kernels._validation import make_config
from fdiv_kernels.backends.common import SUMMARY_LEN
from fdiv_kernels.options import OP_INTS

CPU_BACKENDS = cpu_backend_params()  # tests/harness.py: skip marks with the backend registry's reason

# (D, what it exercises): odd D takes the scalar/tail paths only; 64 and 4096 + 8 whole vectors (CPU: 8 lanes;
# 4104 = two CPU chunks of kChunk = 4096, the second a short vector run plus nothing; Triton: several steps).
SHAPES = [(1, 3, 5), (4, 4, 4), (8, 513)]
DTYPES = {
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "mixed": (torch.float32, torch.bfloat16, torch.bfloat16),  # fp32 model_pred, bf16 reference and target
}


def _inputs(B, shape, dtypes, shared_target, seed=0):
    pred_dt, ref_dt, tgt_dt = dtypes
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2 * B, *shape, generator=g)
    ref = pred + 0.05 * torch.randn(pred.shape, generator=g)
    target = torch.randn(B if shared_target else 2 * B, *shape, generator=g)
    # a loser correlated with its winner, so that X is large against its rounding
    pred[B:] = 0.7 * pred[:B] + 0.3 * pred[B:]
    return pred.to(pred_dt), ref.to(ref_dt), target.to(tgt_dt)


def _cross64(pred, target, layout):
    """X in float64 from the stored values."""
    rows = pred.shape[0]
    p = pred.double().reshape(rows, -1)
    t = target.double().reshape(target.shape[0], -1)
    if t.shape[0] != rows:
        t = t.repeat_interleave(2, 0) if layout == "interleaved" else torch.cat([t, t])
    r = p - t
    r_w, r_l = (r[0::2], r[1::2]) if layout == "interleaved" else r.chunk(2)
    return (r_w * r_l).sum()


def _forward(backend, pred, ref, target, config, mask=None):
    args = (pred, ref, target, None, mask, None, *config.op_scalars())
    if ops.native_kernel("cpu") == backend:
        return torch.ops.fdiv_kernels.fdpo_forward(*args)
    return torch.ops.fdiv_kernels_py.fdpo_forward(*args, backend)


def _rows_to_layout(x, layout):
    """Halves-ordered rows [w; l] -> the layout's row order."""
    if layout == "halves":
        return x
    w, l = x.chunk(2)
    return torch.stack([w, l], dim=1).flatten(0, 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
@pytest.mark.parametrize("shared_target", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "D" + "x".join(map(str, s)))
def test_cross_term_against_float64(backend, layout, shared_target, dtype, shape):
    B = 3
    pred, ref, target = _inputs(B, shape, DTYPES[dtype], shared_target)
    pred = _rows_to_layout(pred, layout)
    ref = _rows_to_layout(ref, layout)
    if not shared_target:
        target = _rows_to_layout(target, layout)
    config = make_config(layout=layout, sdpo_mu=0.5)
    assert config.op_scalars()[1][OP_INTS.index("cross_term")] == 1
    summary = _forward(backend, pred, ref, target, config)[3]
    assert summary.shape == (SUMMARY_LEN,) and summary.dtype == torch.float32
    exact = _cross64(pred, target, layout)
    scale = _cross64(pred.abs(), -target.abs(), layout)  # sum |r_w| |r_l|: the rounding's scale
    assert abs(summary[3].double() - exact) <= 1e-5 * scale, (summary[3].item(), exact.item())
    # the first three entries do not depend on the flag; X is 0 without it
    plain = _forward(backend, pred, ref, target, make_config(layout=layout))[3]
    assert plain[3].item() == 0.0
    torch.testing.assert_close(summary[:3], plain[:3], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "D" + "x".join(map(str, s)))
def test_cross_term_generic_cpu_copy(dtype, shape, monkeypatch):
    """The C++ kernel's generic ISA copy (the tests above run the copy this CPU gets: AVX2 on x86-64)."""
    if ops.native_kernel("cpu") != "cpu":
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("FDIV_KERNELS_CPU_ISA", "generic")
    pred, ref, target = _inputs(2, shape, DTYPES[dtype], True)
    summary = _forward("cpu", pred, ref, target, make_config(sdpo_mu=0.5))[3]
    exact = _cross64(pred, target, "halves")
    assert abs(summary[3].double() - exact) <= 1e-5 * _cross64(pred.abs(), -target.abs(), "halves")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_term_float64(backend):
    """float64 inputs (cpu and torch backends) give X in float64."""
    if backend == "triton":
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    pred, ref, target = _inputs(2, (3, 7), (torch.float64,) * 3, False)
    summary = _forward(backend, pred, ref, target, make_config(sdpo_mu=0.0))[3]
    assert summary.dtype == torch.float64
    torch.testing.assert_close(summary[3], _cross64(pred, target, "halves"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_term_refuses_a_mask(backend):
    pred, ref, target = _inputs(2, (3, 4), DTYPES["fp32"], False)
    with pytest.raises((RuntimeError, ValueError), match="cross_term"):
        _forward(backend, pred, ref, target, make_config(sdpo_mu=0.5), mask=torch.ones_like(pred))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
@pytest.mark.parametrize("shared_target", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("err_reduction", ["mean", "sum", "mean_all"])
@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_sdpo_loss_and_grad_against_the_reference(backend, layout, shared_target, dtype, err_reduction, mu):
    """The safeguard on the forward's cross term against fdpo_loss_reference(..., sdpo_mu=mu) (float64, autograd
    gradients of the batch means: independent of summary[3]). mu = 0.9 scales the losers' gradient (lambda < 1)
    where the correlated losers give g_l . g_w > 0."""
    B, shape = 3, (4, 9)
    pred, ref, target = _inputs(B, shape, DTYPES[dtype], shared_target, seed=1)
    pred, ref = _rows_to_layout(pred, layout), _rows_to_layout(ref, layout)
    if not shared_target:
        target = _rows_to_layout(target, layout)
    kw = dict(layout=layout, err_reduction=err_reduction, sdpo_mu=mu, beta=50.0)
    leaf = pred.detach().clone().requires_grad_()
    loss, stats = fused_fdpo_loss(leaf, ref, target, backend=backend, return_stats=True, **kw)
    loss.backward()
    leaf64 = pred.detach().double().requires_grad_()
    loss64 = fdpo_loss_reference(leaf64, ref.double(), target.double(), **kw)
    loss64.backward()
    tol = 1e-4
    torch.testing.assert_close(loss.double(), loss64, rtol=tol, atol=tol)
    grad, grad64 = leaf.grad.double(), leaf64.grad
    # the gradient is returned in model_pred's dtype: one bf16 ulp (Triton's interpreter rounds it toward 0)
    rounding = 2.0**-7 if pred.dtype == torch.bfloat16 else 0.0
    assert ((grad - grad64).abs() <= tol * grad64.abs().max() + rounding * grad64.abs()).all()
    lam = stats.extra["sdpo_lambda"]
    assert 0.0 <= lam.item() <= 1.0
    if mu == 0.9:
        assert lam.item() < 1.0  # the safeguard acts on these inputs
    assert stats.summary.shape == (SUMMARY_LEN,)
