"""Behaviour specific to the C++ CPU kernel (backend="cpu", csrc/fdpo_cpu.cpp): its ISA copies, non-temporal stores
and huge pages on large gradients, its ops' exact arithmetic, and determinism across thread counts.

Its correctness against the float64 reference, shared with every backend, is tests/test_kernels.py; inputs,
tolerances and comparisons come from tests/harness.py. A missing build fails tests/test_build_present.py.
"""

from __future__ import annotations

import pytest
import torch
from harness import (
    BETA,
    DIV_IDS,
    DIVERGENCES,
    LOW_DTYPES,
    check_against_reference,
    make_inputs,
    run,
    why_unavailable,
)

from fdiv_kernels._validation import make_config

_WHY = why_unavailable("cpu")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"backend='cpu': {_WHY}")

DTYPES = list(LOW_DTYPES)


@pytest.fixture(params=["auto", "generic"])
def isa(request, monkeypatch):
    """Run a test on the ISA copy the CPU gets (AVX2 on x86-64 machines that have it) and on the generic copy,
    checking through fdiv_kernels::cpu_isa that the intended copy is the one that runs."""
    if request.param == "generic":
        monkeypatch.setenv("FDIV_KERNELS_CPU_ISA", "generic")
    else:
        monkeypatch.delenv("FDIV_KERNELS_CPU_ISA", raising=False)
    assert torch.ops.fdiv_kernels.cpu_isa() == ("generic" if request.param == "generic" else _native_isa())
    return request.param


def _native_isa() -> str:
    """The copy this CPU should get: avx2 where /proc/cpuinfo lists avx2, fma and f16c (x86-64 Linux)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return torch.ops.fdiv_kernels.cpu_isa()  # not Linux x86-64: nothing to compare against
    return "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "generic"


def test_the_avx2_copy_runs_where_the_cpu_has_it(monkeypatch):
    monkeypatch.delenv("FDIV_KERNELS_CPU_ISA", raising=False)
    assert torch.ops.fdiv_kernels.cpu_isa() == _native_isa()
    monkeypatch.setenv("FDIV_KERNELS_CPU_ISA", "generic")
    assert torch.ops.fdiv_kernels.cpu_isa() == "generic"


def _flat(x):
    return x.reshape(x.shape[0], -1).contiguous()


# ----------------------------------------------------------------------------------------------- against reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row_len", [2**20 + 8, 2**20 + 3], ids=["aligned_rows", "odd_rows"])
@pytest.mark.parametrize("stream_stores", ["auto", "0"])
def test_large_gradient_paths_match_reference(dtype, row_len, stream_stores, isa, monkeypatch):
    """Gradients of 8-16 MB: non-temporal stores (aligned rows) and huge-page advice on the fresh output, the
    paths every real batch takes and small test shapes never reach; with streaming forced off as well."""
    if stream_stores != "auto":
        monkeypatch.setenv("FDIV_KERNELS_CPU_STREAM_STORES", stream_stores)
    # Small d_scale: at this row length the noise's own square (sigma^2 per element) already puts d near 1.
    inputs = make_inputs(B=2, shape=(row_len,), dtype=dtype, seed=7, shared_target=True, d_scale=0.1)
    _, stats, grad = check_against_reference("cpu", inputs, torch.tensor(0.7), divergence="js", beta=BETA)
    assert stats["logratio"].abs().max() < 5 and grad.abs().amax(dim=1).min() > 1e-6  # a live gradient


GENERIC_CASES = {
    "multi_chunk": (dict(B=2, shape=(3, 67, 71)), {}),
    "mask_shared": (dict(mask="shared", shared_target=True), {}),
    "interleaved_shared_mask": (
        dict(shared_target=True, mask="shared", layout="interleaved"),
        dict(layout="interleaved"),
    ),
    "ref_err": (dict(ref_err=True), {}),
    "pair_weight_none": (dict(pair_weight=True, B=4), dict(reduction="none")),
}


@pytest.mark.parametrize("case", list(GENERIC_CASES))
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES, ids=DIV_IDS)
def test_generic_isa_copy_matches_reference(case, divergence, alpha, monkeypatch):
    """tests/test_kernels.py runs the copy this CPU gets (AVX2 where it has AVX2+FMA+F16C); this, the generic one."""
    monkeypatch.setenv("FDIV_KERNELS_CPU_ISA", "generic")
    spec, kw = GENERIC_CASES[case]
    kw = {"beta": BETA, "divergence": divergence, "alpha": alpha, **kw}
    for dtype in DTYPES + [torch.float64]:
        inputs = make_inputs(dtype=dtype, seed=7, **spec)
        B = inputs["model_pred"].shape[0] // 2
        upstream = torch.rand(B) + 0.5 if kw.get("reduction") == "none" else torch.tensor(-1.3)
        check_against_reference("cpu", inputs, upstream, **kw)


# ------------------------------------------------------------------------------------------------- the C++ ops


@pytest.mark.parametrize(
    "D, stream",
    [(8 * 600 + 5, None), (8 * 700, "1"), (8 * 700, "0")],
    ids=["tail", "aligned-streaming", "aligned-plain"],
)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize(
    "shared, masked, interleaved",
    [(False, False, False), (True, True, False), (True, False, True), (False, True, True)],
)
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
        assert torch.equal(
            out.view(torch.uint8) if dtype != torch.float64 else out,
            expected.view(torch.uint8) if dtype != torch.float64 else expected,
        )


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
        rows, None, target, torch.zeros(2 * pairs), None, None, *make_config(beta=1.0, err_reduction="sum").op_scalars()
    )
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
        assert summary.shape == (4,)  # implicit_acc, mean e, mean e_ref, X: 0 without cross_term (SDPO's)
        assert summary[3].item() == 0.0
        assert {loss.dtype, logits.dtype, stats.dtype, summary.dtype, coef.dtype} == {torch.float32}
    with pytest.raises(RuntimeError, match="exactly one of ref_pred and ref_err"):
        torch.ops.fdiv_kernels.fdpo_forward(p, r, t, torch.zeros(6), None, None, *scalars)
    with pytest.raises(RuntimeError, match="target must have model_pred's shape"):
        torch.ops.fdiv_kernels.fdpo_forward(p, r, t[:, :-1], None, None, None, *scalars)


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
            results.append(_bits(run("cpu", inputs, **kw)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
