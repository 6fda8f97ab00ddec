"""backend="cpu" and backend="cuda": the compiled extension ``fdiv_kernels._C`` (csrc/).

Loading it defines the native ops ``fdiv_kernels::fdpo_forward`` / ``fdpo_backward`` (csrc/ops.cpp: schemas,
autograd, meta kernels) with their CPU kernels (csrc/fdpo_cpu.cpp) and, when built with CUDA, their CUDA kernels
(csrc/fdpo_cuda.cu). This module loads it once and says which of its kernels can run; fdiv_kernels.ops calls them.
"""

from __future__ import annotations

import torch

from .. import _build

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


# Probed once, when this module is first imported (eagerly, also when the import happens under torch.compile), so
# why_unavailable is a plain dict lookup that Dynamo traces without a graph break.
_STATUS: dict[str, str | None] = {kind: _probe(kind) for kind in ("cpu", "cuda")}


def why_unavailable(kind: str) -> str | None:
    """None if the compiled ``kind`` ("cpu" or "cuda") kernels can run, else the reason."""
    if kind not in _STATUS:
        raise ValueError(f"kind must be 'cpu' or 'cuda'; got {kind!r}")
    return _STATUS[kind]
