"""Smoke test of an installed fdiv_kernels (CI runs it from outside the repository, in a fresh venv holding only
the wheel and its dependencies): import, one fused call on each CPU backend with backward, against the reference.

Prints "smoke ok" last. The C++ kernel compiles on first use here (no prebuilt library in a wheel): not at import,
not for backend="torch", but on the first call that needs it (backend="auto").
"""

from __future__ import annotations

import os
import sys
import warnings
from importlib import metadata
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # backend="triton" on CPU tensors: before triton is imported

import torch  # noqa: E402

import fdiv_kernels  # noqa: E402
from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss  # noqa: E402

where = Path(fdiv_kernels.__file__).resolve()
assert "site-packages" in where.parts, f"imported from {where}, not from the installed wheel"
assert fdiv_kernels.__version__ == metadata.version("fdiv_kernels"), "version in two places disagrees"
assert (where.parent / "py.typed").is_file(), "py.typed missing"
assert list((where.parent / "_csrc").glob("*.cpp")), "C++ sources missing from the wheel"
assert not list(where.parent.glob("_C*.so")), "a pure-Python wheel carries a prebuilt library"
assert "fdiv_kernels._C" not in sys.modules, "the import loaded the C++ kernels"

g = torch.Generator().manual_seed(0)
pred = torch.randn(8, 4, 6, 6, generator=g)
ref = pred + 0.1 * torch.randn(8, 4, 6, 6, generator=g)
target = torch.randn(8, 4, 6, 6, generator=g)
x64 = pred.double().requires_grad_(True)
expected = fdpo_loss_reference(x64, ref.double(), target.double(), beta=50.0, divergence="js")
expected.backward()

backends = ["torch", "auto", "cpu"]  # torch first: it must run without loading the C++ kernels
try:
    import triton  # noqa: F401

    backends.append("triton")
except ImportError:
    pass
with warnings.catch_warnings():
    # auto must not fall back to the eager path here (its first call compiles the kernels: other warnings may pass)
    warnings.filterwarnings("error", "fdiv_kernels: no fused kernel", RuntimeWarning)
    for backend in backends:
        x = pred.clone().requires_grad_(True)
        loss = fused_fdpo_loss(x, ref, target, beta=50.0, divergence="js", backend=backend)
        loss.backward()
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-8)
        print(f"backend={backend}: loss {loss.item():.6f}, grad ok", flush=True)
        if backend == "torch":
            assert "fdiv_kernels._C" not in sys.modules, "backend='torch' loaded the C++ kernels"

from fdiv_kernels import _build  # noqa: E402

info = _build.info()
assert info.get("kind") == "jit", info
print(f"fdiv_kernels {fdiv_kernels.__version__} from {where.parent}; kernels: {info}", flush=True)
print("smoke ok")
sys.exit(0)
