"""Backend registry: which implementations of the kernel contract exist, and which one a call gets.

"auto" picks the fastest available for the tensors' device (CUDA: the CUDA C++ kernels, then Triton; CPU: the
C++ kernel). A backend named explicitly that cannot run is an error that says why, never a silent fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
# Order "auto" tries on CUDA tensors; chosen by benchmarks/results (see README, "Backends").
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


_resolved: dict[tuple[str, str], str] = {}


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn a user's backend choice into a concrete, runnable one (or raise with the reason); cached per device
    type, since what is built and installed does not change while the process runs."""
    concrete = _resolved.get((name, device.type))
    if concrete is None:
        concrete = _resolve(name, device)
        if not torch.compiler.is_compiling():
            _resolved[(name, device.type)] = concrete
    return concrete


def _resolve(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend={name!r}; expected one of {list(BACKENDS)}")
    if name != "auto":
        why = _why_unavailable(name, device)
        if why is not None:
            raise RuntimeError(f"backend={name!r} is unavailable: {why}")
        return name
    candidates = AUTO_CUDA_ORDER if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
    reasons = []
    for candidate in candidates:
        why = _why_unavailable(candidate, device)
        if why is None:
            return candidate
        reasons.append(why)
    _warn_fallback(device, reasons)
    return "torch"


_warned: set[str] = set()


def _warn_fallback(device: torch.device, reasons: list[str]) -> None:
    if device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(
            f"fdiv_kernels: no fused kernel for {device.type} tensors ({'; '.join(reasons) or 'unsupported device'}); "
            "backend='auto' uses the eager PyTorch backend",
            RuntimeWarning,
            stacklevel=4,
        )


# The Python implementations of the kernel contract (cpu and cuda are the C++ extension's native kernels).
_MODULES = {"torch": "torch_backend", "triton": "triton_kernels"}
_implementations: dict[str, ModuleType] = {}


def get_implementation(name: str) -> ModuleType:
    """The module implementing ``forward``/``backward`` of the kernel contract for a concrete backend (imported
    on first use, so that triton is only imported by calls that use it)."""
    module = _implementations.get(name)
    if module is None:
        module = _implementations[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module
