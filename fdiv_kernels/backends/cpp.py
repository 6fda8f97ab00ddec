"""backend="cpu" and backend="cuda": the compiled extension ``fdiv_kernels._C`` (csrc/).

Loading it defines the native ops ``fdiv_kernels::fdpo_forward`` / ``fdpo_backward`` (csrc/ops.cpp: schemas,
autograd, meta kernels) with their CPU kernels (csrc/fdpo_cpu.cpp) and, when built with CUDA, their CUDA kernels
(csrc/fdpo_cuda.cu). This module loads it once and says which of its kernels can run; fdiv_kernels.ops calls them.

Nothing is loaded at import: loading may compile the extension (one to three minutes with an empty cache), so it
happens on the first call that asks why_unavailable (the first call that needs the compiled kernels, or
fdiv_kernels.load()). Under torch.compile that call runs for real while Dynamo traces (eager_under_compile), so a
compiled first call loads the extension before the traced code looks up its ops.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

_F = TypeVar("_F", bound=Callable)


def eager_under_compile(fn: _F) -> _F:
    """Mark ``fn`` so that Dynamo runs it for real while tracing and takes its result as a constant, instead of
    tracing into it (file locks, a compiler, dlopen: graph breaks, an error under fullgraph=True). This is
    ``torch.compiler.assume_constant_result``, whose whole effect is this attribute; it is set here directly
    because calling that function imports torch._dynamo, which would add a second to ``import fdiv_kernels``
    (tests/test_build.py checks that the two agree). Only for functions whose result never changes once computed.
    """
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


_BUILD_HINT = (
    "delete it to compile on first use, or rebuild ahead of time with "
    "`FDIV_KERNELS_BUILD=aot pip install -e . --no-build-isolation`"
)
_load_error: str | None = None
_loaded = False


def _load() -> str | None:
    """Load fdiv_kernels._C once (prebuilt, or compiled on first use: fdiv_kernels/_build.py); None on success,
    else why it is unavailable."""
    global _loaded, _load_error
    if not _loaded:
        _loaded = True
        # Imported here, not with this module: the package's import then leaves it alone, and
        # `python -m fdiv_kernels._build` runs it without runpy's warning about a module imported twice.
        from .. import _build

        try:
            _build.load()  # imports fdiv_kernels._C, which registers the ops
        except _build.BuildError as err:
            _load_error = str(err)
        except (ImportError, OSError) as err:  # built, but against another torch/python (undefined symbol, ABI...)
            _load_error = f"the C++ extension fdiv_kernels._C failed to load ({err}): rebuild it ({_BUILD_HINT})"
    return _load_error


def _probe(kind: str) -> str | None:
    err = _load()
    if err is not None:
        return err
    if kind == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fdiv_kernels::fdpo_forward", "CUDA"):
            from .. import _build

            why = _build.info().get("why_no_cuda") or "built without CUDA kernels"
            return (
                f"fdiv_kernels._C has no CUDA kernels ({why}); a CUDA build of torch with nvcc compiles them on first "
                "use, or ahead of time with `FDIV_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation`"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    elif not torch._C._dispatch_has_kernel_for_dispatch_key("fdiv_kernels::fdpo_forward", "CPU"):
        return f"fdiv_kernels._C has no CPU kernel registered (a broken build?): {_BUILD_HINT}"
    return None


# Probed once, on the first why_unavailable call; unchanged after that while the process runs.
_STATUS: dict[str, str | None] = {}


@eager_under_compile
def why_unavailable(kind: str) -> str | None:
    """None if the compiled ``kind`` ("cpu" or "cuda") kernels can run, else the reason. The first call loads the
    extension (compiling it if nothing is cached)."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda'; got {kind!r}")
    if not _STATUS:
        _STATUS.update({k: _probe(k) for k in ("cpu", "cuda")})
    return _STATUS[kind]
