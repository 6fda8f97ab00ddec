"""The op layer: native and Python ops, opcheck, torch.compile without graph breaks, autograd wiring, the module,
the statistics out of the kernels' pair head, double backward."""

import pytest
import torch
from harness import cpu_backend_params

from fdiv_kernels import FDPOLoss, FDPOStats, fdpo_loss_reference, fused_fdpo_loss, ops
from fdiv_kernels._validation import make_config

CPU_BACKENDS = cpu_backend_params()  # tests/harness.py: skip marks with the backend registry's reason


def _inputs(B=2, shape=(3, 5, 7), dtype=torch.float32, seed=0, shared_target=False):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2 * B, *shape, generator=g).to(dtype)
    ref = (pred.float() + 0.02 * torch.randn(pred.shape, generator=g)).to(dtype)
    target = torch.randn(B if shared_target else 2 * B, *shape, generator=g).to(dtype)
    return pred, ref, target


def _op_and_args(backend, reduction=1, mask=False, ref_err=False, strict_ties=False):
    """The op fused_fdpo_loss calls for ``backend`` on CPU tensors, and its arguments (N-D tensors)."""
    pred, ref, target = _inputs(shared_target=True)
    rows = pred.shape[0]
    m = torch.rand(rows, *pred.shape[1:]) if mask else None
    ref_e = torch.rand(rows) if ref_err else None
    config = make_config(
        beta=400.0,
        divergence="js",
        label_smoothing=0.1,
        reduction={0: "none", 1: "mean", 2: "sum"}[reduction],
        implicit_acc_ties="strict" if strict_ties else "half",
    )
    args = (
        pred.requires_grad_(),
        None if ref_err else ref,
        target,
        ref_e,
        m,
        torch.rand(rows // 2) + 0.5,
        *config.op_scalars(),
    )
    if ops.NATIVE_KERNEL["cpu"] == backend:
        return torch.ops.fdiv_kernels.fdpo_forward.default, args
    return torch.ops.fdiv_kernels_py.fdpo_forward.default, args + (backend,)


def test_native_op_serves_the_cpu_backend():
    """With the extension built, backend='cpu' is the C++ op with C++ autograd: no Python on the call path."""
    assert ops.NATIVE, "the C++ extension failed to load; see fdiv_kernels.backends.cpp.why_unavailable('cpu')"
    assert ops.forward_op("cpu", "cpu") is torch.ops.fdiv_kernels.fdpo_forward.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fdiv_kernels::fdpo_forward", "Autograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fdiv_kernels::fdpo_forward", "Meta")
    pred, ref, target = _inputs()
    loss = fused_fdpo_loss(pred.requires_grad_(), ref, target, backend="cpu")
    assert type(loss.grad_fn).__name__ == "CppFunction"  # torch::autograd::Function node (csrc/ops.cpp)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction, mask, ref_err", [(1, False, False), (0, True, False), (2, False, True)])
def test_opcheck_forward(backend, reduction, mask, ref_err):
    op, args = _op_and_args(backend, reduction, mask, ref_err)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_backward(backend):
    pred, _, target = _inputs()
    coef = torch.randn(pred.shape[0])
    native = ops.NATIVE_KERNEL["cpu"] == backend
    op = torch.ops.fdiv_kernels.fdpo_backward.default if native else torch.ops.fdiv_kernels_py.fdpo_backward.default
    for grad_loss in (torch.tensor(0.7), torch.rand(pred.shape[0] // 2)):
        args = (grad_loss, pred, target, None, coef, False) + (() if native else (backend,))
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    pred, ref, target = _inputs(B=3, shape=(4, 6, 5), shared_target=True)

    def step(p):
        loss, stats = fused_fdpo_loss(p, ref, target, divergence="js", return_stats=True, backend=backend)
        return loss * 2.0, stats.implicit_acc, stats.raw_model_loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    p_eager, p_compiled = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    eager = step(p_eager)
    result = compiled(p_compiled)
    eager[0].backward()
    result[0].backward()
    for c, e in zip(result, eager):
        torch.testing.assert_close(c, e)
    torch.testing.assert_close(p_compiled.grad, p_eager.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_flows_into_model_pred_only_through_any_view(backend):
    pred, ref, target = _inputs(B=2, shape=(4, 6, 5))
    base = pred.permute(0, 2, 3, 1).contiguous().requires_grad_()  # a non-contiguous view of the same values
    view = base.permute(0, 3, 1, 2)
    assert not view.is_contiguous()
    loss = fused_fdpo_loss(view, ref, target, divergence="hellinger", backend=backend)
    loss.backward()
    p64 = pred.double().requires_grad_()
    fdpo_loss_reference(p64, ref.double(), target.double(), divergence="hellinger").backward()
    torch.testing.assert_close(base.grad.permute(0, 3, 1, 2), p64.grad.float(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_raises_a_clear_error(backend):
    """The fused backward is first-order only: a loss on the gradient must fail loudly, never silently wrong."""
    pred, ref, target = _inputs()
    pred.requires_grad_()
    loss = fused_fdpo_loss(pred, ref, target, divergence="js", backend=backend)
    (grad,) = torch.autograd.grad(loss, pred, create_graph=True)
    assert grad.requires_grad  # part of the graph, so a second backward reaches the error
    with pytest.raises(RuntimeError, match="double backward through fused_fdpo_loss is not supported"):
        grad.square().sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ties", ["half", "strict"])
@pytest.mark.parametrize("ref_err", [False, True])
def test_statistics_match_an_independent_computation(backend, ties, ref_err):
    """The kernels' summary (implicit_acc, raw losses) against FDPOStats.from_tensors on their per-sample outputs,
    with exact ties (policy == reference on some pairs) so that both tie rules matter."""
    B = 5
    pred, ref, target = _inputs(B=B, shape=(3, 4, 5), dtype=torch.float64 if backend != "triton" else torch.float32)
    ref[[0, 2, B, B + 2]] = pred[[0, 2, B, B + 2]]  # pairs 0 and 2: z == 0 exactly
    kwargs = dict(divergence="js", implicit_acc_ties=ties, return_stats=True, backend=backend, beta=500.0)
    if ref_err:
        _, exact = fdpo_loss_reference(
            pred.double(), ref.double(), target.double(), divergence="js", beta=500.0, return_stats=True
        )
        _, stats = fused_fdpo_loss(pred, None, target, ref_err=exact.ref_err.to(pred.dtype), **kwargs)
    else:
        _, stats = fused_fdpo_loss(pred, ref, target, **kwargs)
    independent = FDPOStats.from_tensors(
        stats.logits, stats.model_err, stats.ref_err, stats.logratio, stats.reward, ties
    )
    if not ref_err:
        assert (stats.logits[[0, 2]] == 0).all()
        expected_acc = ((stats.logits > 0).sum() + (0.5 if ties == "half" else 0.0) * 2) / B
        assert stats.implicit_acc.item() == pytest.approx(expected_acc.item())
    for name in ("implicit_acc", "raw_model_loss", "raw_ref_loss"):
        torch.testing.assert_close(getattr(stats, name), getattr(independent, name), rtol=1e-6, atol=0)
        assert not getattr(stats, name).requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stats_are_detached_and_complete(backend):
    pred, ref, target = _inputs(B=3)
    pred.requires_grad_()
    loss, stats = fused_fdpo_loss(pred, ref, target, return_stats=True, backend=backend)
    assert isinstance(stats, FDPOStats)
    for name, value in stats.as_dict().items():
        assert not value.requires_grad, name
    assert stats.logits.shape == (3,) and stats.model_err.shape == (6,) and stats.implicit_acc.shape == ()
    assert loss.requires_grad


def test_module_is_the_functional_loss():
    pred, ref, target = _inputs()
    module = FDPOLoss(divergence="alpha", alpha=0.3, beta=1000.0, backend="torch")
    assert "divergence='alpha'" in repr(module) and "alpha=0.3" in repr(module)
    torch.testing.assert_close(
        module(pred, ref, target),
        fused_fdpo_loss(pred, ref, target, divergence="alpha", alpha=0.3, beta=1000.0, backend="torch"),
    )
    loss, stats = FDPOLoss(return_stats=True)(pred, None, target, ref_err=torch.rand(4))
    assert isinstance(stats, FDPOStats) and loss.shape == ()


def test_module_validates_its_configuration_once_at_construction():
    with pytest.raises(TypeError, match="betta"):
        FDPOLoss(beta=1.0, betta=1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        FDPOLoss(beta=-1.0)
    with pytest.raises(ValueError, match="unknown backend='cuda2'"):
        FDPOLoss(backend="cuda2")
    module = FDPOLoss(beta=250.0, divergence="js")
    assert module.config.beta == 250.0 and module.config.divergence.name == "js"


def test_config_cache_keeps_types_apart():
    """The cache of validated configs must not let a bool pass as the number it hashes like (True == 1)."""
    pred, ref, target = _inputs()
    fused_fdpo_loss(pred, ref, target, beta=1.0)
    with pytest.raises(TypeError, match="beta must be a real number; got bool"):
        fused_fdpo_loss(pred, ref, target, beta=True)
    with pytest.raises(TypeError, match="a tensor would need a host sync"):
        fused_fdpo_loss(pred, ref, target, beta=torch.tensor(1.0))


def test_numpy_scalars_are_accepted_alike():
    import numpy as np

    pred, ref, target = _inputs()
    expected = fused_fdpo_loss(pred, ref, target, beta=500.0, gamma=2.0)
    for cast in (np.float32, np.float64, np.int64):
        torch.testing.assert_close(fused_fdpo_loss(pred, ref, target, beta=cast(500), gamma=cast(2)), expected)


@pytest.mark.parametrize("beta, convention", [(1e308, "full"), (1e39, "half"), (7e38, "half")])
def test_beta_beyond_float32_is_an_error_naming_beta(beta, convention):
    pred, ref, target = _inputs()
    with pytest.raises(ValueError, match=r"beta=.*beyond float32's range"):
        fused_fdpo_loss(pred, ref, target, beta=beta, beta_convention=convention)
