"""Behaviour specific to the Triton kernels (backend="triton"): their math helpers against float64, and 64-bit
indexing past 2^31 elements on a GPU.

Their correctness against the float64 reference, shared with every backend, is tests/test_kernels.py. Without
CUDA they run on CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there); on a GPU
machine they run on CUDA tensors. (A determinism test is not here: the interpreter runs programs in order, so it
could not fail; tests/test_gpu.py checks determinism on the GPU.)
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from harness import BETA, why_unavailable

triton = pytest.importorskip("triton", reason="backend='triton' needs the triton package (pip install triton)")
import triton.language as tl  # noqa: E402

from fdiv_kernels.backends.triton_kernels import _expm1, _log1p, _sigmoid, _softplus  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = why_unavailable("triton", DEVICE)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"backend='triton' on {DEVICE}: {_WHY}")


@triton.jit
def _helpers_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, _expm1(x), mask=valid)
    tl.store(out_ptr + n + offs, _log1p(tl.exp(-tl.abs(x))), mask=valid)
    tl.store(out_ptr + 2 * n + offs, _softplus(x), mask=valid)
    tl.store(out_ptr + 3 * n + offs, _sigmoid(x), mask=valid)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_math_helpers():
    """expm1/log1p (Kahan's tricks on plain exp/log), softplus, sigmoid against float64, tiny to overflowing."""
    magnitudes = torch.cat([torch.logspace(-30, 2, 60, dtype=torch.float64), torch.tensor([0.0, 88.0, 89.0, 200.0])])
    x = torch.cat([magnitudes, -magnitudes]).float().to(DEVICE)
    out = torch.empty(4, x.numel(), device=DEVICE)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _helpers_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    x64 = x.double()
    expected = torch.stack(
        [torch.expm1(x64), torch.log1p(torch.exp(-x64.abs())), torch.nn.functional.softplus(x64), torch.sigmoid(x64)]
    ).float()  # overflow to inf and underflow as fp32 does
    # rtol: on GPUs tl.exp is ex2.approx of x * log2(e), whose relative error grows like |x| * 2^-24.
    for name, got, want in zip(["expm1", "log1p", "softplus", "sigmoid"], out, expected):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=0.0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2^31+ elements need a GPU")
def test_int64_indexing():
    """Tensors of more than 2^31 elements: rows (and shared target rows) that start past 2^31 are right."""
    from fdiv_kernels._validation import make_config
    from fdiv_kernels.backends import triton_kernels
    from fdiv_kernels.backends.common import KernelParams

    num_pairs, row_len = 3, 2**29  # 3 * 2^30 elements per [2B, D] tensor
    if torch.cuda.mem_get_info()[0] < 40e9:
        pytest.skip("needs ~40 GB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(8)
    model_pred = torch.randn(2 * num_pairs, row_len, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref_pred = model_pred + 0.05 * torch.randn(model_pred.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    target = torch.randn(num_pairs, row_len, device="cuda", dtype=torch.bfloat16, generator=gen)  # shared
    params = KernelParams.unpack(*make_config(beta=BETA).op_scalars())
    _, _, stats, _, coef = triton_kernels.forward(model_pred, ref_pred, target, None, None, None, params)
    grad = triton_kernels.backward(torch.ones((), device="cuda"), model_pred, target, None, coef, False)
    for row in range(2 * num_pairs):
        residual = model_pred[row].float() - target[row % num_pairs].float()
        ref_residual = ref_pred[row].float() - target[row % num_pairs].float()
        model_err = residual.double().square().mean()
        ref_err = ref_residual.double().square().mean()
        torch.testing.assert_close(stats[0, row].double(), model_err, rtol=1e-5, atol=0.0)
        torch.testing.assert_close(stats[1, row].double(), ref_err, rtol=1e-5, atol=0.0)
        expected = (coef[row] * residual).to(torch.bfloat16)
        torch.testing.assert_close(grad[row], expected, rtol=2.0**-8, atol=0.0)
