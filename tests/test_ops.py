"""The op layer: native and Python ops, opcheck, torch.compile without graph breaks, autograd wiring, the module,
the statistics out of the kernels' pair head, double backward."""

import re
from pathlib import Path

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
    if ops.native_kernel("cpu") == backend:
        return torch.ops.fdiv_kernels.fdpo_forward.default, args
    return torch.ops.fdiv_kernels_py.fdpo_forward.default, args + (backend,)


def test_native_op_serves_the_cpu_backend():
    """With the extension built, backend='cpu' is the C++ op with C++ autograd: no Python on the call path."""
    assert ops.native_kernel("cpu") == "cpu", (
        "the C++ extension failed to load; see fdiv_kernels.backends.cpp.why_unavailable('cpu')"
    )
    assert ops.dispatch("cpu", torch.device("cpu")) == ("cpu", torch.ops.fdiv_kernels.fdpo_forward.default)
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
    native = ops.native_kernel("cpu") == backend
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


# ---------------------------------------------------------------------------------------------------------------
# One declaration per language: the op's configuration layout and the ids, Python against C++ and Triton.
# ---------------------------------------------------------------------------------------------------------------

_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _cpp_enum(header: str, name: str, prefix: str = "k") -> dict[str, int]:
    """The members of ``enum name : int { ... }`` (or ``struct name { enum : int { ... } }``) in csrc/<header>,
    normalized (kLabelSmoothing -> labelsmoothing; kErrMeanAll -> meanall with prefix "kErr"), with their values
    (explicit, or counted as C++ does)."""
    pattern = rf"(?:enum {name} : int|struct {name} \{{\s*enum : int) \{{([^}}]*)\}}"
    body = re.search(pattern, (_CSRC / header).read_text()).group(1)
    members, value = {}, 0
    for item in (part.strip() for part in body.split(",") if part.strip()):
        key, _, explicit = (x.strip() for x in item.partition("="))
        value = int(explicit) if explicit else value
        members[key.removeprefix(prefix).lower()] = value
        value += 1
    return members


def _normalized(ids: dict[str, int]) -> dict[str, int]:
    return {name.replace("_", ""): i for name, i in ids.items()}


def test_op_configuration_layout_matches_the_cpp_one():
    """options.OP_FLOATS / OP_INTS (Python packs the op's fparams, iparams) against fdpo_op.h's FloatParam /
    IntParam (C++ unpacks them)."""
    from fdiv_kernels.options import OP_FLOATS, OP_INTS

    for header_enum, names in (("FloatParam", OP_FLOATS), ("IntParam", OP_INTS)):
        cpp = _cpp_enum("fdpo_op.h", header_enum)
        assert cpp.pop("count") == len(names)
        assert cpp == {name.replace("_", ""): i for i, name in enumerate(names)}


def test_ids_match_the_cpp_enums_and_the_triton_constants():
    from fdiv_kernels._validation import ERR_REDUCTIONS, LOSS_TYPES, REDUCTIONS
    from fdiv_kernels.divergences import DIVERGENCES

    pairs = [("Divergence", DIVERGENCES, "k"), ("Reduction", REDUCTIONS, "k"), ("LossType", LOSS_TYPES, "k")]
    pairs.append(("ErrReduction", ERR_REDUCTIONS, "kErr"))
    for enum, python, prefix in pairs:
        assert _cpp_enum("fdpo_math.h", enum, prefix) == _normalized(python), enum
    triton_kernels = pytest.importorskip("fdiv_kernels.backends.triton_kernels")
    constants = {
        "_REVERSE_KL": DIVERGENCES["reverse_kl"],
        "_FORWARD_KL": DIVERGENCES["forward_kl"],
        "_JS": DIVERGENCES["js"],
        "_ALPHA": DIVERGENCES["alpha"],
        "_HELLINGER": DIVERGENCES["hellinger"],
        "_NONE": REDUCTIONS["none"],
        "_MEAN": REDUCTIONS["mean"],
        "_ERR_MEAN": ERR_REDUCTIONS["mean"],
        "_ERR_SUM": ERR_REDUCTIONS["sum"],
        "_HINGE": LOSS_TYPES["hinge"],
        "_IPO": LOSS_TYPES["ipo"],
        "_DMPO": LOSS_TYPES["dmpo"],
        "_MAPO": LOSS_TYPES["mapo"],
    }
    for name, expected in constants.items():
        assert getattr(triton_kernels, name).value == expected, name


def test_python_ops_have_the_native_schema_plus_the_backend():
    """The two op families take the same arguments (one packed configuration), the Python one a backend name."""
    assert ops.native_kernel("cpu") == "cpu", "the C++ extension failed to load"

    def arguments(op):
        return [(a.name, str(a.type)) for a in op._schema.arguments]

    def returns(op):
        return [str(r.type) for r in op._schema.returns]

    for name in ("fdpo_forward", "fdpo_backward"):
        native = getattr(torch.ops.fdiv_kernels, name).default
        python = getattr(torch.ops.fdiv_kernels_py, name).default
        assert arguments(python) == arguments(native) + [("backend", "str")]
        assert returns(python) == returns(native)


def test_both_op_families_refuse_double_backward_with_one_message():
    pred, ref, target = _inputs()
    messages = []
    for backend in ("cpu", "torch"):  # the C++ autograd and the Python one
        p = pred.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fused_fdpo_loss(p, ref, target, backend=backend), p, create_graph=True)
        with pytest.raises(RuntimeError) as err:
            grad.square().sum().backward()
        messages.append(str(err.value))
    assert all(ops.DOUBLE_BACKWARD_ERROR in m for m in messages), messages


def test_import_dispatches_and_registers_nothing():
    """The dispatch table fills on first use: importing the package neither resolves a backend nor registers the
    Triton kernels as the native op's CUDA kernel (ops.py)."""
    import subprocess
    import sys

    code = (
        "import fdiv_kernels\n"
        "from fdiv_kernels import ops\n"
        "assert not ops._TABLE and not ops._NATIVE_KERNEL and not ops._libraries, (ops._TABLE, ops._NATIVE_KERNEL)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docs_table_of_heads_is_generated_from_the_heads_table():
    from fdiv_kernels.options import heads_table

    page = (_CSRC.parent / "docs" / "api.md").read_text(encoding="utf-8")
    between = page.split("<!-- heads:begin -->\n", 1)[1].split("\n<!-- heads:end -->", 1)[0]
    assert between == heads_table(), (
        "docs/api.md's table of heads differs from fdiv_kernels.options.HEADS: paste the output of "
        "python -c 'from fdiv_kernels.options import heads_table; print(heads_table())' between its heads markers"
    )
