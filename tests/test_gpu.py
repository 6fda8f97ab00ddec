"""GPU tests of the CUDA C++ (backend="cuda") and Triton (backend="triton") kernels.

Everything is checked against ``fdpo_loss_reference`` evaluated in float64 on copies of the same (rounded) inputs,
so the only differences are the kernels' fp32 arithmetic and the output dtype's rounding. Skipped on machines
without CUDA; run on a GPU machine (benchmarks/gpu_check.sh). Budget: well under 3 minutes on an H100.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from harness import STAT_NAMES, TOL, why_unavailable

import fdiv_kernels
from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA and Triton GPU kernels are validated on a GPU machine (benchmarks/gpu_check.sh)",
)

DIVERGENCES = tuple(fdiv_kernels.DIVERGENCES)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backend(name: str) -> str:
    """Skip with the registry's reason when a GPU backend cannot run here. A broken loader raises: that is a
    failure of the suite, not a reason to skip (issue 16)."""
    why = why_unavailable(name, "cuda")
    if why is not None:
        pytest.skip(f"backend={name!r} unavailable: {why}")
    return name


BACKENDS = ("cuda", "triton")


# ----------------------------------------------------------------------------------------------------- inputs


def make_case(
    shape,
    dtype,
    *,
    beta=5000.0,
    shared_target=False,
    mask=None,  # None, "full" ([2B, ...]) or "shared" ([B, ...])
    ref="pred",  # "pred" or "err"
    interleaved=False,
    pair_weight=False,
    misaligned=False,
    seed=0,
):
    """Fresh random inputs (never zeros) with e_ref - e small enough that d = beta/2 (e_ref - e) is O(1).

    ref_pred = model_pred + sigma * noise with sigma = sqrt(D) / beta gives d with a standard deviation near 1.
    Returns (kwargs for fused_fdpo_loss, kwargs for the float64 reference); both hold model_pred as a leaf that
    requires grad.
    """
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows, sample = shape[0], tuple(shape[1:])
    pairs, D = rows // 2, math.prod(sample)

    def randn(*s):
        return torch.randn(*s, generator=gen, device="cuda", dtype=torch.float32)

    def rand(*s):
        return torch.rand(*s, generator=gen, device="cuda", dtype=torch.float32)

    def per_sample(x):  # [B, ...] -> [2B, ...] in the layout's row order
        return x.repeat_interleave(2, dim=0) if interleaved else torch.cat([x, x])

    target = randn(pairs if shared_target else rows, *sample)
    t_full = per_sample(target) if shared_target else target
    pred = t_full + randn(rows, *sample)
    sigma = math.sqrt(D) / beta
    ref_pred = pred + sigma * randn(rows, *sample)

    def place(x):  # cast to dtype; optionally at an odd element offset (16-byte-misaligned storage)
        x = x.to(dtype)
        if not misaligned:
            return x.contiguous()
        buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
        buf[1:].copy_(x.reshape(-1))
        return buf[1:].view(x.shape)

    pred_d, ref_d, target_d = place(pred), place(ref_pred), place(target)
    kw = dict(target=target_d, beta=beta, layout="interleaved" if interleaved else "halves")
    if ref == "pred":
        kw["ref_pred"] = ref_d
    else:
        # Cached reference errors near the model's own (exact, from the rounded inputs) so d stays O(1).
        t64 = (per_sample(target_d) if shared_target else target_d).double().reshape(rows, -1)
        e = ((pred_d.double().reshape(rows, -1) - t64) ** 2).mean(1)
        kw["ref_err"] = (e + (2.0 / beta) * randn(rows).double()).float()
    if mask is not None:
        m = rand(pairs if mask == "shared" else rows, *sample)
        m = torch.where(m < 0.2, torch.zeros_like(m), m)  # some exact zeros, the rest in [0.2, 1)
        kw["mask"] = place(m)
    if pair_weight:
        kw["pair_weight"] = rand(pairs) + 0.5

    fused = dict(kw, model_pred=pred_d.detach().requires_grad_())
    ref64 = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref64["model_pred"] = pred_d.detach().double().requires_grad_()
    return fused, ref64


def _call(fn, kw, **opts):
    kw = dict(kw)
    model_pred = kw.pop("model_pred")
    ref_pred = kw.pop("ref_pred", None)
    target = kw.pop("target")
    return fn(model_pred, ref_pred, target, **kw, **opts)


def _upstream(loss, seed=1):
    """A non-unit upstream gradient: random per pair for reduction='none', 0.37 for a scalar loss."""
    if loss.dim() == 0:
        return torch.full_like(loss, 0.37)
    gen = torch.Generator(device=loss.device).manual_seed(seed)
    return torch.rand(loss.shape, generator=gen, device=loss.device, dtype=loss.dtype) + 0.25


def _rel_err(actual, expected):
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, *, rtol, atol, what=""):
    assert not torch.isnan(actual).any(), f"{what}: NaN in the kernel's output"
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    bad = ~both_inf & ((a - e).abs() > atol + rtol * e.abs())
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off (rtol={rtol}, atol={atol}); first at {idx}: "
            f"{a[tuple(idx)].item()!r} vs {e[tuple(idx)].item()!r}"
        )


# Tolerances. d (and everything downstream of it) is accurate to ~1e-6 on the ref_pred path (direct form), but on
# the ref_err path d = beta/2 * (ref_err - e) inherits e's fp32 rounding times beta/2 (about 1e-3 at beta 5000).
# The gradient: the output dtype's rounding (harness.TOL, here norm-wise), at least 1e-4 (3e-3 on the ref_err path).


def check_against_reference(backend, fused_kw, ref_kw, dtype, *, ref_err_path=False, **opts):
    loss, stats = _call(fused_fdpo_loss, fused_kw, return_stats=True, backend=backend, **opts)
    loss64, stats64 = _call(fdpo_loss_reference, ref_kw, return_stats=True, **opts)
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    d_atol = 2e-3 if ref_err_path else 2e-5
    assert_close(loss, loss64, rtol=1e-4, atol=d_atol, what="loss")
    assert_close(stats.model_err, stats64.model_err, rtol=1e-5, atol=1e-7, what="model_err")
    assert_close(stats.ref_err, stats64.ref_err, rtol=1e-5, atol=1e-7, what="ref_err")
    for name in ("logratio", "reward", "logits", "implicit_acc", "raw_model_loss", "raw_ref_loss"):
        tol = d_atol if name in ("logratio", "reward", "logits") else 1e-6
        assert_close(getattr(stats, name), getattr(stats64, name), rtol=1e-4, atol=tol, what=name)

    up = _upstream(loss)
    loss.backward(up)
    loss64.backward(up.double())
    grad, grad64 = fused_kw["model_pred"].grad, ref_kw["model_pred"].grad
    assert grad.dtype == dtype and grad.shape == grad64.shape
    assert not torch.isnan(grad).any(), "NaN in the gradient"
    tol = max(TOL[dtype].grad, 3e-3 if ref_err_path else 1e-4)
    err = _rel_err(grad, grad64)
    assert err < tol, f"gradient relative error {err:.3g} >= {tol}"
    return loss, stats, grad


# ------------------------------------------------------------------------------------------------ correctness


# Every divergence and option against the reference on CUDA tensors: tests/test_kernels.py (harness.backend_params
# yields the cuda, triton and torch backends on CUDA tensors on a GPU machine). Here: what only a GPU has.


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
    _backend(backend)
    dims = SHAPES[shape]
    beta = 5000.0 if math.prod(dims[1:]) <= 16384 else float(math.prod(dims[1:]))  # keep d = O(1)
    fused, ref = make_case(dims, dtype, beta=beta, seed=len(shape))
    check_against_reference(backend, fused, ref, dtype, divergence="js")  # make_case set beta


# 16-byte-misaligned storage: the CUDA kernels' scalar (unvectorized) paths.
MISALIGNED = {
    "misaligned": (dict(misaligned=True), dict(divergence="js")),
    "misaligned_mask": (dict(misaligned=True, mask="full"), dict(divergence="hellinger", reduction="sum")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("option", list(MISALIGNED), ids=list(MISALIGNED))
def test_misaligned_vs_reference(backend, dtype, option):
    _backend(backend)
    case_kw, loss_kw = MISALIGNED[option]
    fused, ref = make_case((8, 4, 16, 16), dtype, beta=5000.0, seed=7, **case_kw)
    check_against_reference(backend, fused, ref, dtype, **loss_kw)


# (d_w, d_l) per pair: |d| up to 1e4, both signs, saturated and moderate pairs. Rows whose soft clip would leave
# them in the ill-conditioned band (|d|/c roughly 9..20: fp32 rounds c*tanh(d/c) to exactly c, float64 does not,
# and exp(c) amplifies the difference) are avoided on purpose: there fp32 and float64 legitimately disagree.
EXTREME_PAIRS = ((-1e4, 3.0), (2.5, -8e3), (9e3, 1e4), (-6e3, -1e4), (-40.0, 35.0), (0.5, -0.25))


def make_extreme_case(beta=5000.0, seed=5):
    """ref_err chosen so that d = beta/2 (ref_err - e) hits EXTREME_PAIRS (halves layout)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pairs = len(EXTREME_PAIRS)
    shape = (2 * pairs, 4, 16, 16)
    target = torch.randn(shape, generator=gen, device="cuda")
    pred = target + torch.randn(shape, generator=gen, device="cuda")
    e = ((pred.double() - target.double()) ** 2).reshape(2 * pairs, -1).mean(1)
    d = torch.tensor([w for w, _ in EXTREME_PAIRS] + [l for _, l in EXTREME_PAIRS], dtype=torch.float64, device="cuda")
    ref_err = (e + 2.0 * d / beta).float()
    fused = dict(model_pred=pred.detach().requires_grad_(), target=target, ref_err=ref_err, beta=beta)
    ref64 = dict(
        model_pred=pred.detach().double().requires_grad_(), target=target.double(), ref_err=ref_err.double(), beta=beta
    )
    return fused, ref64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logratios(backend, divergence):
    """|d| up to 1e4: no NaN anywhere; with logratio_clip the loss AND gradient match float64 (and are finite).
    The unclipped overflow cases are compared value by value (infs by position and sign) in tests/test_kernels.py,
    which runs the CUDA backends on a GPU machine."""
    _backend(backend)
    fused, ref = make_extreme_case()
    loss, stats = _call(fused_fdpo_loss, fused, divergence=divergence, return_stats=True, backend=backend)
    assert stats.logratio.abs().max() > 9e3
    loss.backward()
    for name, t in (
        ("loss", loss),
        ("logits", stats.logits),
        ("reward", stats.reward),
        ("grad", fused["model_pred"].grad),
    ):
        assert not torch.isnan(t).any(), f"NaN in {name} without clip ({divergence})"
    if divergence in ("reverse_kl", "js"):  # nothing overflows: the unclipped values must match float64 too
        fused["model_pred"].grad = None
        check_against_reference(backend, fused, ref, torch.float32, ref_err_path=True, divergence=divergence)
        fused, ref = make_extreme_case()
    fused["model_pred"].grad = None
    _, _, grad = check_against_reference(
        backend, fused, ref, torch.float32, ref_err_path=True, divergence=divergence, logratio_clip=30.0
    )
    assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------- determinism, graphs, compile


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 16, 64, 128), (600, 7, 9), (6, 3, 17, 13)], ids=str)
def test_bitwise_deterministic(backend, shape):
    _backend(backend)
    fused, _ = make_case(shape, torch.bfloat16, beta=float(max(5000, math.prod(shape[1:]))), seed=11)
    outs = []
    for _ in range(2):
        fused["model_pred"].grad = None
        loss, stats = _call(fused_fdpo_loss, fused, divergence="js", return_stats=True, backend=backend)
        loss.backward()
        outs.append((loss.detach().clone(), stats.as_dict(), fused["model_pred"].grad.clone()))
    (l0, s0, g0), (l1, s1, g1) = outs
    assert torch.equal(l0, l1)
    for name in STAT_NAMES:
        assert torch.equal(s0[name], s1[name]), name
    assert torch.equal(g0, g1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_cuda_graph_capture_and_replay(backend, reduction):
    """Capture forward + backward of static inputs, replay on new data, compare with eager (same bits)."""
    _backend(backend)
    shape = (8, 4, 64, 64)
    fused, _ = make_case(shape, torch.bfloat16, seed=21)
    x = fused["model_pred"]
    ref_pred, target = fused["ref_pred"], fused["target"]
    up = torch.rand(4 if reduction == "none" else (), device="cuda") + 0.5

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
        new, _ = make_case(shape, torch.bfloat16, seed=seed)
        with torch.no_grad():
            x.copy_(new["model_pred"])
            ref_pred.copy_(new["ref_pred"])
            target.copy_(new["target"])
        graph.replay()
        torch.cuda.synchronize()
        eager, eager_stats = fused_fdpo_loss(
            new["model_pred"],
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
        assert torch.equal(static_grad, new["model_pred"].grad)
        for name in STAT_NAMES:  # the statistics come out of the captured kernels too
            assert torch.equal(getattr(static_stats, name), getattr(eager_stats, name)), name
    del graph


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    _backend(backend)
    torch._dynamo.reset()
    fused, ref = make_case((8, 4, 32, 32), torch.bfloat16, seed=31)

    def loss_fn(x, r, t, w):
        # a little surrounding arithmetic so the custom op sits inside a real graph
        loss = fused_fdpo_loss(x * 1.0, r, t, divergence="hellinger", pair_weight=w, backend=backend)
        return 2.0 * loss

    compiled = torch.compile(loss_fn, fullgraph=True)
    w = torch.rand(4, device="cuda") + 0.5
    x = fused["model_pred"]
    out = compiled(x, fused["ref_pred"], fused["target"], w)
    out.backward()
    g_compiled = x.grad.clone()
    x.grad = None
    eager = loss_fn(x, fused["ref_pred"], fused["target"], w)
    eager.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_compiled, x.grad, rtol=1e-2, atol=1e-6)
    x64 = ref["model_pred"]
    expect = 2.0 * fdpo_loss_reference(
        x64, ref["ref_pred"], ref["target"], divergence="hellinger", pair_weight=w.double()
    )
    expect.backward()
    assert abs(out.item() - expect.item()) < 1e-4 * max(1.0, abs(expect.item()))
    assert _rel_err(g_compiled, x64.grad) < 8e-3
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ cross-backend, size


@pytest.mark.parametrize("option", ["plain", "shared_mask_interleaved", "ref_err_none", "odd"])
def test_cuda_and_triton_agree(option):
    _backend("cuda")
    _backend("triton")
    case_kw, loss_kw, shape = {
        "plain": (dict(), dict(divergence="js"), (8, 16, 64, 64)),
        "shared_mask_interleaved": (
            dict(shared_target=True, mask="shared", interleaved=True),
            dict(divergence="forward_kl"),  # make_case sets layout="interleaved"
            (8, 4, 32, 32),
        ),
        "ref_err_none": (dict(ref="err", pair_weight=True), dict(divergence="alpha", reduction="none"), (6, 4, 16, 16)),
        "odd": (dict(), dict(divergence="hellinger", label_smoothing=0.2), (6, 3, 17, 13)),
    }[option]
    beta = float(max(5000, math.prod(shape[1:])))
    results = []
    for backend in ("cuda", "triton"):
        fused, _ = make_case(shape, torch.bfloat16, beta=beta, seed=41, **case_kw)
        fused["beta"] = beta
        loss, stats = _call(fused_fdpo_loss, fused, return_stats=True, backend=backend, **loss_kw)
        loss.backward(_upstream(loss))
        results.append((loss.detach(), stats, fused["model_pred"].grad))
    (lc, sc, gc_), (lt, st, gt) = results
    torch.testing.assert_close(lc, lt, rtol=1e-5, atol=1e-5)
    for name in ("logits", "model_err", "ref_err", "logratio", "reward"):
        torch.testing.assert_close(getattr(sc, name), getattr(st, name), rtol=1e-5, atol=1e-5, msg=name)
    # bf16 gradients: the coefficients agree to fp32 rounding, so the outputs to one bf16 rounding step
    assert _rel_err(gc_, gt) < 1e-2


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def _check_64bit_indexing(backend: str, D: int, layout: str, device: str = "cuda") -> None:
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
    _backend(backend)
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


def test_cuda_backend_rejects_float64():
    _backend("cuda")
    fused, _ = make_case((4, 8, 8), torch.float32, seed=61)
    with pytest.raises(TypeError, match="float64"):
        fused_fdpo_loss(
            fused["model_pred"].double(), fused["ref_pred"].double(), fused["target"].double(), backend="cuda"
        )


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
    _backend(backend)
    ref_dtype, low = mix
    gen = torch.Generator(device="cuda").manual_seed(11)
    b = shape[0] // 2
    pred = torch.randn(shape, generator=gen, device="cuda")
    ref = (pred + 0.05 * torch.randn(shape, generator=gen, device="cuda")).to(ref_dtype)
    target = torch.randn(shape, generator=gen, device="cuda")
    if form == "ref+shared":
        target = target[:b].contiguous()
    target = target.to(low)
    mask = torch.rand(shape, generator=gen, device="cuda").to(low) if "mask" in form else None
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
    _backend(backend)
    gen = torch.Generator(device="cuda").manual_seed(3)
    pred64 = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64)
    values = [
        pred64,
        pred64 + 0.05 * torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64),
        torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64),
        torch.rand(shape, generator=gen, device="cuda", dtype=torch.float64),
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
    _backend(backend)
    kwargs, ref_kwargs = make_case((8, 4, 16, 16), torch.float32, beta=400.0, mask="full")
    loss = fused_fdpo_loss(**kwargs, divergence="hellinger", backend=backend, **case)
    loss.backward()
    exact = fdpo_loss_reference(**ref_kwargs, divergence="hellinger", **case)
    exact.backward()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)
    g, e = kwargs["model_pred"].grad.double(), ref_kwargs["model_pred"].grad
    torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_and_double_backward_refused(backend):
    """Forward, statistics and backward never synchronize with the host; a second derivative is refused."""
    _backend(backend)
    kwargs, _ = make_case((8, 4, 16, 16), torch.bfloat16, beta=400.0, shared_target=True)
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
