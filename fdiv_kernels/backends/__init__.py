"""Backend registry: which implementations of the kernel contract exist and whether each can run on a device.

Which one a call gets is decided in one place, the dispatch table of fdiv_kernels/ops.py: "auto" picks the fastest
available for the tensors' device (CUDA: the CUDA C++ kernels, then Triton; CPU: the C++ kernel). A backend named
explicitly that cannot run is an error that says why, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
# Order "auto" tries on CUDA tensors (ops.dispatch); chosen by benchmarks/results (see README, "Backends").
AUTO_CUDA_ORDER = ("cuda", "triton")


# Looked up once at import, so that resolving a backend under torch.compile is plain Python Dynamo can trace.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason."""
    if name == "torch":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' runs on CPU tensors; these are on {device}"
        from . import cpp

        return cpp.why_unavailable("cpu")
    if name == "cuda":
        if device.type != "cuda":
            return f"backend='cuda' runs on CUDA tensors; these are on {device}"
        from . import cpp

        return cpp.why_unavailable("cuda")
    if name == "triton":
        if not HAS_TRITON:
            return "backend='triton' needs the triton package (pip install triton)"
        if device.type == "cpu" and not triton_interpreted():
            return "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        if device.type not in ("cpu", "cuda"):
            return f"backend='triton' supports CUDA tensors (and CPU under TRITON_INTERPRET=1), not {device}"
        return None
    raise ValueError(f"unknown backend={name!r}; expected one of {list(BACKENDS)}")


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn a user's backend choice into a concrete, runnable one (or raise with the reason): the first column of
    the dispatch table, fdiv_kernels.ops.dispatch."""
    from ..ops import dispatch

    return dispatch(name, device)[0]


def get_implementation(name: str) -> ModuleType:
    """The module implementing ``forward``/``backward`` of the kernel contract for a Python backend ("torch" or
    "triton"; "cpu" and "cuda" are the C++ extension's native kernels), imported on first use, so that triton is
    only imported by calls that use it."""
    if name == "triton":
        from . import triton_kernels

        return triton_kernels
    if name == "torch":
        from . import torch_backend

        return torch_backend
    raise ValueError(f"backend {name!r} has no Python implementation")
