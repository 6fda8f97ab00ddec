"""What only a GPU has, for the CUDA C++ (backend="cuda") and Triton (backend="triton") kernels: kernel paths of
GPU-sized shapes and misaligned storage, bitwise determinism, CUDA graphs, torch.compile, cuda-vs-triton agreement,
2^31 elements, the mixed-storage vector kernels, and no host synchronization. Every divergence and option against
the reference on CUDA tensors is tests/test_kernels.py's (harness.backend_params yields the cuda, triton and torch
backends on CUDA tensors on a GPU machine). Inputs, running and comparisons: tests/harness.py (make_inputs, run,
check_against_reference with GPU_TOL). Skipped on machines without CUDA; run on a GPU machine
(benchmarks/gpu_check.sh). Budget: well under 3 minutes on an H100.

Plumbing check, not a GPU test: FDIV_GPU_TESTS_ON_CPU=1 runs this file on CPU tensors, backend "cuda" mapped to
"cpu" and "triton" under Triton's interpreter, the CUDA-only tests (graphs, host sync) skipped and the 2^31 test at a
small D. It exercises the test code on a machine without a GPU; it says nothing about the GPU kernels.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
from harness import (
    BF16,
    F32,
    GPU_TOL,
    STAT_NAMES,
    as64,
    assert_close,
    check_against_reference,
    make_inputs,
    run,
    upstream_for,
    why_unavailable,
)

import fdiv_kernels
from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss

ON_CPU = os.environ.get("FDIV_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"

pytestmark = pytest.mark.skipif(
    not ON_CPU and not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA and Triton GPU kernels are validated on a GPU machine (benchmarks/gpu_check.sh)",
)
cuda_only = pytest.mark.skipif(ON_CPU, reason="FDIV_GPU_TESTS_ON_CPU=1: needs CUDA itself")

DIVERGENCES = tuple(fdiv_kernels.DIVERGENCES)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backend(name: str) -> str:
    """The backend to call (under FDIV_GPU_TESTS_ON_CPU=1, "cuda" is "cpu"). Skip with the registry's reason when it
    cannot run here. A broken loader raises: that is a failure of the suite, not a reason to skip (issue 16)."""
    name = "cpu" if ON_CPU and name == "cuda" else name
    why = why_unavailable(name, DEVICE)
    if why is not None:
        pytest.skip(f"backend={name!r} unavailable: {why}")
    return name


BACKENDS = ("cuda", "triton")


def _inputs(dims, dtype, **kw):
    """harness.make_inputs on this file's device, with the shape given as [2B, ...]."""
    return make_inputs(B=dims[0] // 2, shape=tuple(dims[1:]), dtype=dtype, device=DEVICE, **kw)


def _upstream(inputs, reduction="mean"):
    B = inputs["model_pred"].shape[0] // 2
    return upstream_for((B,) if reduction == "none" else (), B).to(DEVICE)


# ------------------------------------------------------------------------------------------------ correctness


SHAPES = {
    "odd_3x17x13": (6, 3, 17, 13),  # D = 663: scalar (unvectorized) path
    "4d": (8, 4, 32, 32),
    "5d_video": (4, 4, 5, 24, 16),  # [2B, C, T, H, W]
    "one_pair_long_row": (2, 16, 64, 128),  # B = 1, D = 131072: many chunks per pair
    "many_pairs": (600, 7, 9),  # B = 300 > threads per block: head loops; D = 63 odd
    "many_pairs_vec": (520, 64),  # B = 260, vector path, one chunk per pair
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_shapes_vs_reference(backend, dtype, shape):
    backend = _backend(backend)
    dims = SHAPES[shape]
    beta = 5000.0 if math.prod(dims[1:]) <= 16384 else float(math.prod(dims[1:]))  # keep d = O(1)
    inputs = _inputs(dims, dtype, beta=beta, seed=len(shape))
    check_against_reference(backend, inputs, _upstream(inputs), tol=GPU_TOL[dtype], divergence="js", beta=beta)


# 16-byte-misaligned storage: the CUDA kernels' scalar (unvectorized) paths.
MISALIGNED = {
    "misaligned": (dict(misaligned=True), dict(divergence="js")),
    "misaligned_mask": (dict(misaligned=True, mask="per_sample"), dict(divergence="hellinger", reduction="sum")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("option", list(MISALIGNED), ids=list(MISALIGNED))
def test_misaligned_vs_reference(backend, dtype, option):
    backend = _backend(backend)
    case_kw, loss_kw = MISALIGNED[option]
    inputs = _inputs((8, 4, 16, 16), dtype, seed=7, **case_kw)
    assert all(inputs[k].storage_offset() == 1 for k in ("model_pred", "ref_pred", "target"))
    up = _upstream(inputs, loss_kw.get("reduction", "mean"))
    check_against_reference(backend, inputs, up, tol=GPU_TOL[dtype], as_given=True, beta=5000.0, **loss_kw)


# |d| up to 1e4 (no NaN; with and without logratio_clip, against float64): tests/test_kernels.py's
# test_extreme_logratios_match_reference and test_logratio_clip_keeps_gradients_finite_and_matching, which run the
# cuda and triton backends on CUDA tensors on a GPU machine.


# --------------------------------------------------------------------------------- determinism, graphs, compile


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 16, 64, 128), (600, 7, 9), (6, 3, 17, 13)], ids=str)
def test_bitwise_deterministic(backend, shape):
    backend = _backend(backend)
    beta = float(max(5000, math.prod(shape[1:])))
    inputs = _inputs(shape, BF16, beta=beta, seed=11)
    (l0, s0, g0), (l1, s1, g1) = (run(backend, inputs, divergence="js", beta=beta) for _ in range(2))
    assert torch.equal(l0, l1)
    for name in STAT_NAMES:
        assert torch.equal(s0[name], s1[name]), name
    assert torch.equal(g0, g1)


@cuda_only
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_cuda_graph_capture_and_replay(backend, reduction):
    """Capture forward + backward of static inputs, replay on new data, compare with eager (same bits)."""
    backend = _backend(backend)
    shape = (8, 4, 64, 64)
    static = _inputs(shape, BF16, seed=21)
    x = static["model_pred"].requires_grad_()
    ref_pred, target = static["ref_pred"], static["target"]
    up = torch.rand(4 if reduction == "none" else (), device=DEVICE) + 0.5

    def step():
        loss, stats = fused_fdpo_loss(
            x, ref_pred, target, divergence="alpha", alpha=0.4, reduction=reduction, return_stats=True, backend=backend
        )
        loss.backward(up)
        return loss, stats

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (JIT compilation, allocator) outside the capture
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_stats = step()
    static_grad = x.grad

    for seed in (22, 23):
        new = _inputs(shape, BF16, seed=seed)
        with torch.no_grad():
            x.copy_(new["model_pred"])
            ref_pred.copy_(new["ref_pred"])
            target.copy_(new["target"])
        graph.replay()
        torch.cuda.synchronize()
        new_x = new["model_pred"].requires_grad_()
        eager, eager_stats = fused_fdpo_loss(
            new_x,
            new["ref_pred"],
            new["target"],
            divergence="alpha",
            alpha=0.4,
            reduction=reduction,
            return_stats=True,
            backend=backend,
        )
        eager.backward(up)
        assert torch.equal(static_loss, eager.detach()), (static_loss, eager)
        assert torch.equal(static_grad, new_x.grad)
        for name in STAT_NAMES:  # the statistics come out of the captured kernels too
            assert torch.equal(getattr(static_stats, name), getattr(eager_stats, name)), name
    del graph


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    backend = _backend(backend)
    torch._dynamo.reset()
    inputs = _inputs((8, 4, 32, 32), BF16, seed=31)

    def loss_fn(x, r, t, w):
        # a little surrounding arithmetic so the custom op sits inside a real graph
        loss = fused_fdpo_loss(x * 1.0, r, t, divergence="hellinger", pair_weight=w, backend=backend)
        return 2.0 * loss

    compiled = torch.compile(loss_fn, fullgraph=True)
    w = torch.rand(4, device=DEVICE) + 0.5
    x = inputs["model_pred"].requires_grad_()
    out = compiled(x, inputs["ref_pred"], inputs["target"], w)
    out.backward()
    g_compiled = x.grad.clone()
    x.grad = None
    eager = loss_fn(x, inputs["ref_pred"], inputs["target"], w)
    eager.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_compiled, x.grad, rtol=1e-2, atol=1e-6)
    ref = as64(inputs)
    x64 = ref["model_pred"].detach().requires_grad_()
    expect = 2.0 * fdpo_loss_reference(
        x64, ref["ref_pred"], ref["target"], divergence="hellinger", pair_weight=w.double()
    )
    expect.backward()
    assert abs(out.item() - expect.item()) < 1e-4 * max(1.0, abs(expect.item()))
    assert_close(g_compiled, x64.grad, 8e-3, "compiled grad", norm=True)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ cross-backend, size

# name -> (make_inputs arguments, loss keyword arguments, [2B, ...] shape)
AGREE = {
    "plain": (dict(), dict(divergence="js"), (8, 16, 64, 64)),
    "shared_mask_interleaved": (
        dict(shared_target=True, mask="shared", layout="interleaved"),
        dict(divergence="forward_kl", layout="interleaved"),
        (8, 4, 32, 32),
    ),
    "ref_err_none": (dict(ref_err=True, pair_weight=True), dict(divergence="alpha", reduction="none"), (6, 4, 16, 16)),
    "odd": (dict(), dict(divergence="hellinger", label_smoothing=0.2), (6, 3, 17, 13)),
}


@pytest.mark.parametrize("option", list(AGREE))
def test_cuda_and_triton_agree(option):
    backends = (_backend("cuda"), _backend("triton"))
    if ON_CPU and option == "ref_err_none":  # the CPU kernel and the interpreter differ by ~4e-4 there
        pytest.skip("FDIV_GPU_TESTS_ON_CPU=1: cpu vs interpreter sum e in other orders, beta/2 amplifies it")
    case_kw, loss_kw, shape = AGREE[option]
    beta = float(max(5000, math.prod(shape[1:])))
    inputs = _inputs(shape, BF16, beta=beta, seed=41, **case_kw)
    up = _upstream(inputs, loss_kw.get("reduction", "mean"))
    (lc, sc, gc_), (lt, st, gt) = (run(b, inputs, up, beta=beta, **loss_kw) for b in backends)
    torch.testing.assert_close(lc, lt, rtol=1e-5, atol=1e-5)
    for name in ("logits", "model_err", "ref_err", "logratio", "reward"):
        torch.testing.assert_close(sc[name], st[name], rtol=1e-5, atol=1e-5, msg=name)
    # bf16 gradients: the coefficients agree to fp32 rounding, so the outputs to one bf16 rounding step
    assert_close(gc_, gt, 1e-2, "grad cuda vs triton", norm=True)


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def _check_64bit_indexing(backend: str, D: int, layout: str, device: str = DEVICE) -> None:
    """bf16 [2, D] model_pred with ref_err, against float64 sums taken in chunks: the per-sample errors, the head
    and every gradient element. layout "shared_target": one [1, D] target row for the pair; "target_and_mask":
    a [2, D] target and a [2, D] bf16 mask (0 on ~1/4 of the elements), whose second rows lie past 2^31 elements
    when D > 2^30. (Run with a small D on the CPU backend, it checks the test itself.)"""
    gen = torch.Generator(device=device).manual_seed(51)
    shared = layout == "shared_target"
    target = torch.randn(1 if shared else 2, D, generator=gen, device=device, dtype=torch.bfloat16)
    pred = torch.randn(2, D, generator=gen, device=device, dtype=torch.bfloat16)
    pred[1].mul_(1.25)  # winner and loser differ
    mask = None
    if not shared:
        mask = (torch.randint(0, 4, (2, D), generator=gen, device=device, dtype=torch.uint8) > 0).to(torch.bfloat16)

    def rows(s, e):  # (pred, target, mask) of columns [s, e) of both rows, in float64
        t = target[:, s:e].double().expand(2, -1)
        m = torch.ones_like(t) if mask is None else mask[:, s:e].double()
        return pred[:, s:e].detach().double(), t, m

    step = 2**26
    sq = torch.zeros(2, dtype=torch.float64, device=device)
    count = torch.zeros(2, dtype=torch.float64, device=device)
    for s in range(0, D, step):
        p, t, m = rows(s, s + step)
        sq += (m * (p - t) ** 2).sum(1)
        count += m.sum(1)
    e = sq / count  # the masked mean of each row (the plain mean without a mask)
    beta = 100.0  # d = O(1) while e's own fp32 rounding (~1e-5 relative over 2^30 terms) stays out of the way
    ref_err = (e + torch.tensor([2e-2, -1.5e-2], device=device, dtype=torch.float64)).float()

    x = pred.requires_grad_()
    loss, stats = fused_fdpo_loss(
        x, None, target, ref_err=ref_err, mask=mask, beta=beta, return_stats=True, backend=backend
    )
    loss.backward()

    torch.testing.assert_close(stats.model_err.double(), e, rtol=2e-5, atol=0)
    d = 0.5 * beta * (ref_err.double() - stats.model_err.double())  # from the kernel's own e: tests the head
    z = d[0] - d[1]
    torch.testing.assert_close(stats.logratio.double(), d, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(loss.double(), torch.nn.functional.softplus(-z), rtol=1e-4, atol=1e-5)
    # and against float64 end to end (e's fp32 rounding times beta/2 is the only difference)
    d64 = 0.5 * beta * (ref_err.double() - e)
    torch.testing.assert_close(loss.double(), torch.nn.functional.softplus(-(d64[0] - d64[1])), rtol=2e-3, atol=2e-3)

    # every gradient element, chunked: grad = coef * m * (pred - target), coef = dloss/de * 2 / (mask count)
    g = -torch.sigmoid(-z)
    coef = torch.stack([-g, g]) * (0.5 * beta) * 2.0 / count
    grad = x.grad
    assert grad.dtype == torch.bfloat16
    worst = 0.0
    for s in range(0, D, step):
        p, t, m = rows(s, s + step)
        expect = coef[:, None] * m * (p - t)
        got = grad[:, s : s + step].double()
        worst = max(worst, ((got - expect).abs() / (expect.abs() + 1e-30 + coef.abs().max() * 1e-3)).max().item())
        assert torch.equal(got[m == 0], torch.zeros_like(got[m == 0]))  # masked elements get exactly 0
    assert worst < 4e-3, worst  # one bf16 rounding (2^-9 relative) plus the coefficient's fp32 error


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "D, layout",
    [(2**30 + 3, "shared_target"), (2**30 + 8, "shared_target"), (2**30 + 3, "target_and_mask")],
    ids=["odd_scalar_path", "vector_path", "target_and_mask_rows_past_2_pow_31"],
)
def test_over_2_pow_31_elements(backend, D, layout):
    """More than 2^31 elements in model_pred (and, with a [2, D] target and mask, second rows that end past
    element 2^31 of their tensors): 64-bit indexing end to end."""
    backend = _backend(backend)
    if ON_CPU:  # the plumbing check: the test's own arithmetic at a small D
        if backend == "triton":
            pytest.skip("FDIV_GPU_TESTS_ON_CPU=1: Triton's interpreter truncates to bf16 (2^-8), beyond the GPU's 4e-3")
        _check_64bit_indexing(backend, D - 2**30 + 2**12, layout)
        return
    need = 16 if layout == "shared_target" else 28
    if _free_gib() < need:
        pytest.skip(f"needs ~{need} GiB free GPU memory, {_free_gib():.1f} GiB free")
    gc.collect()
    torch.cuda.empty_cache()
    try:
        _check_64bit_indexing(backend, D, layout)
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# float64 on backend="cuda" (a documented TypeError): tests/test_kernels.py's
# test_float64_is_a_documented_error_on_fp32_only_backends, on CUDA tensors on a GPU machine.


# ------------------------------------------------------------------------------ mixed dtypes, loss types, host sync
# The mixed-precision storage mixes with their own vectorized CUDA kernels (fdpo::mixed_storage_switch): fp32
# model_pred, reference in fp32 or in the target's 16-bit dtype, mask in the target's dtype; with ref_pred or cached
# ref_err, with and without a mask, per-row or shared target. D = 4096 takes the 8-wide vector kernels; D = 3 * 17 *
# 13 (not a multiple of 8) the generic one; both against the same inputs cast to fp32 first.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mix",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],  # fmt: skip
    ids=["ref32-bf16", "ref32-fp16", "ref16-bf16", "ref16-fp16"],
)
@pytest.mark.parametrize("form", ["ref", "ref+mask", "ref_err", "ref_err+mask", "ref+shared"])
@pytest.mark.parametrize("shape", [(8, 4, 32, 32), (6, 3, 17, 13)], ids=["vector", "odd"])
def test_mixed_vector_kernels_equal_casting_to_fp32_first(backend, mix, form, shape):
    backend = _backend(backend)
    ref_dtype, low = mix
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    b = shape[0] // 2
    pred = torch.randn(shape, generator=gen, device=DEVICE)
    ref = (pred + 0.05 * torch.randn(shape, generator=gen, device=DEVICE)).to(ref_dtype)
    target = torch.randn(shape, generator=gen, device=DEVICE)
    if form == "ref+shared":
        target = target[:b].contiguous()
    target = target.to(low)
    mask = torch.rand(shape, generator=gen, device=DEVICE).to(low) if "mask" in form else None
    ref_err = None
    if form.startswith("ref_err"):
        full_t = target.float() if target.shape[0] == shape[0] else target.float().repeat(2, *[1] * (len(shape) - 1))
        ref_err = ((ref.float() - full_t) ** 2).flatten(1).mean(1)
        ref = None

    def call(p, r, t, m):
        p = p.detach().clone().requires_grad_()
        loss, stats = fused_fdpo_loss(
            p, r, t, ref_err=ref_err, mask=m, beta=400.0, divergence="js", return_stats=True, backend=backend
        )
        loss.backward()
        return loss, stats, p.grad

    mixed = call(pred, ref, target, mask)
    cast = call(pred, None if ref is None else ref.float(), target.float(), None if mask is None else mask.float())
    # The harness's forward tolerance (2e-5): the two runs sum in different orders (8- vs 4-wide vectors, other
    # chunks), and beta = 400 scales the statistics' last-bit differences into the coefficient; a wrong kernel
    # is off by O(1).
    torch.testing.assert_close(mixed[0], cast[0], rtol=2e-5, atol=1e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(mixed[1], name), getattr(cast[1], name), rtol=2e-5, atol=1e-6)
    assert mixed[2].dtype == torch.float32
    torch.testing.assert_close(mixed[2], cast[2], rtol=2e-5, atol=1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.bfloat16, torch.bfloat16, None),
        (torch.float32, torch.float32, torch.float16, None),
        (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16, torch.float32, torch.float16),
    ],
    ids=lambda d: "-".join(str(x).split(".")[-1] for x in d),
)
@pytest.mark.parametrize("shape", [(8, 4, 32, 32), (6, 3, 17, 13)], ids=["vector", "odd"])
def test_mixed_dtypes_equal_casting_to_fp32_first(backend, dtypes, shape):
    """Accelerate's mixed precision: each input in its own dtype, read without copies, as if cast to fp32 first."""
    backend = _backend(backend)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    pred64 = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float64)
    values = [
        pred64,
        pred64 + 0.05 * torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float64),
        torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float64),
        torch.rand(shape, generator=gen, device=DEVICE, dtype=torch.float64),
    ]
    pred, ref, target, mask = [None if t is None else v.to(t) for v, t in zip(values, dtypes)]

    def call(p, r, t, m):
        p = p.detach().clone().requires_grad_()
        loss, stats = fused_fdpo_loss(p, r, t, mask=m, beta=400.0, divergence="js", return_stats=True, backend=backend)
        loss.backward()
        return loss, stats, p.grad

    mixed = call(pred, ref, target, mask)
    cast = call(pred.float(), ref.float(), target.float(), None if mask is None else mask.float())
    torch.testing.assert_close(mixed[0], cast[0], rtol=1e-6, atol=1e-7)
    for name in STAT_NAMES:
        torch.testing.assert_close(getattr(mixed[1], name), getattr(cast[1], name), rtol=1e-6, atol=1e-7)
    assert mixed[2].dtype == pred.dtype
    torch.testing.assert_close(
        mixed[2].float(), cast[2].to(pred.dtype).float(), rtol=torch.finfo(pred.dtype).eps, atol=1e-30
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        dict(loss_type="hinge"),
        dict(loss_type="ipo", ipo_tau=0.05),
        dict(loss_type="dmpo", dmpo_alpha=0.01),
        dict(err_reduction="mean_all"),
    ],
    ids=["hinge", "ipo", "dmpo", "mean_all"],
)
def test_loss_types_vs_reference(backend, case):
    backend = _backend(backend)
    inputs = _inputs((8, 4, 16, 16), F32, beta=400.0, mask="per_sample")
    kw = dict(beta=400.0, divergence="hellinger", **case)
    loss, _, grad = run(backend, inputs, **kw)
    exact, _, e = run("reference", as64(inputs), **kw)
    assert_close(loss.double(), exact, 1e-5, "loss", elementwise=True, atol=1e-6)
    assert_close(grad.double(), e, 1e-4, "grad", elementwise=True, atol=1e-5 * e.abs().max().item())


@cuda_only
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_and_double_backward_refused(backend):
    """Forward, statistics and backward never synchronize with the host; a second derivative is refused."""
    backend = _backend(backend)
    kwargs = dict(_inputs((8, 4, 16, 16), BF16, beta=400.0, shared_target=True), beta=400.0)
    kwargs["model_pred"].requires_grad_()
    fused_fdpo_loss(**kwargs, backend=backend).backward()  # warm-up: first-call allocations, compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = fused_fdpo_loss(**kwargs, divergence="js", return_stats=True, backend=backend)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    p = kwargs["model_pred"]
    (grad,) = torch.autograd.grad(fused_fdpo_loss(**kwargs, backend=backend), p, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through fused_fdpo_loss is not supported"):
        grad.float().square().sum().backward()
