"""Benchmark shapes, dtypes and input variants of spec §5 (docs/spec.md), the byte model, and input generation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int  # 2B: winners then losers
    sample: tuple[int, ...]  # S, the per-sample dims
    note: str

    @property
    def numel(self) -> int:
        return self.rows * math.prod(self.sample)

    def label(self) -> str:
        return f"{self.rows}x" + "x".join(map(str, self.sample))


# spec §5 (docs/spec.md). Latent shapes are those the trainers feed the loss (batch of 2B = winners + losers).
_COMMON = [
    Shape("sd15", 16, (4, 64, 64), "SD1.5 latents 64x64 (launch-bound on GPU)"),
    Shape("sdxl", 16, (4, 128, 128), "SDXL latents 128x128"),
    Shape("flux", 8, (16, 128, 128), "SD3/Flux latents, 16 channels, 128x128"),
    Shape("video", 4, (16, 21, 60, 104), "video latents C,T,H,W (Wan-style 480p, 81 frames)"),
    Shape("pixel", 16, (3, 256, 256), "pixel-space 256x256 RGB"),
]
# The bandwidth-bound shape: on GPU >= 256 MB per bf16 tensor (spec §5). On CPU a quarter of that (64 MB bf16,
# 128 MB fp32 per tensor): already far beyond the caches, and it keeps eager's fp32 temporaries and the run time
# of a full CPU sweep (2 threads, shared machine) reasonable.
_LARGE = {
    "cuda": Shape("large", 8, (16, 1024, 1024), "bandwidth-bound: 134M elements, 256 MB per bf16 tensor"),
    "cpu": Shape("large", 8, (16, 512, 512), "bandwidth-bound (CPU size): 33.5M elements, 64 MB per bf16 tensor"),
}
SHAPE_NAMES = [s.name for s in _COMMON] + ["large"]
QUICK_SHAPE = Shape("quick", 8, (4, 32, 32), "smoke test only")


def shapes_for(device_type: str, names: list[str] | None = None) -> list[Shape]:
    table = {s.name: s for s in _COMMON + [_LARGE.get(device_type, _LARGE["cpu"])]}
    table["quick"] = QUICK_SHAPE
    names = names or SHAPE_NAMES
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {sorted(table)}")
    return [table[n] for n in names]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# An input variant: whether the target is shared by the pair ([B, ...]) and whether cached reference errors
# ([2B] fp32) replace ref_pred.
VARIANTS = {
    "full": (False, False),
    "shared": (True, False),
    "ref_err": (False, True),
    "ref_err+shared": (True, True),
    "mixed": (False, False),
    "mixed_ref16": (False, False),
}
# Mixed-precision variants (Accelerate's AMP, docs/dropin.md): these tensors are stored in fp32 beside a target (and
# reference) in the case's 16-bit dtype: "mixed" = fp32 model_pred and ref_pred with a 16-bit target, "mixed_ref16"
# = fp32 model_pred with a 16-bit reference and target. Not run for fp32 cases (nothing to mix).
FP32_TENSORS = {"mixed": ("model_pred", "ref_pred"), "mixed_ref16": ("model_pred",)}


def storage_dtype(dtype: torch.dtype, variant: str, tensor: str) -> torch.dtype:
    """The dtype `tensor` ("model_pred", "ref_pred", "target") is stored in for a case of `dtype` and `variant`."""
    return torch.float32 if tensor in FP32_TENSORS.get(variant, ()) else dtype


MODES = ("fwd", "bwd", "fwd+bwd")


def ideal_bytes(shape: Shape, dtype: torch.dtype, variant: str, mode: str) -> int:
    """Bytes a perfect implementation must move (spec §5 (docs/spec.md)), counted exactly.

    In units of one full [2B, D] tensor: forward reads pred (1), ref_pred (1, or 2B fp32 errors with ref_err)
    and target (1, or 0.5 shared); backward reads pred (1) and target (1 or 0.5) and writes the gradient (1).
    So fwd+bwd = 6 passes, 5.5 with a shared target, 5 with ref_err (spec §5's "4 with ref_err" holds only with
    ref_err *and* a shared target: 1.5 + 2.5). The O(B) outputs (loss, stats, coefficients) are left out.
    """
    shared, ref_err = VARIANTS[variant]
    pred, ref, tgt = (
        tensor_bytes(shape, storage_dtype(dtype, variant, t)) for t in ("model_pred", "ref_pred", "target")
    )
    tgt = tgt // 2 if shared else tgt
    fwd = pred + tgt + (shape.rows * 4 if ref_err else ref)
    bwd = pred + tgt + pred  # the gradient is in model_pred's dtype
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def tensor_bytes(shape: Shape, dtype: torch.dtype) -> int:
    return shape.numel * torch.finfo(dtype).bits // 8


class Inputs(NamedTuple):
    model_pred: torch.Tensor  # leaf, requires grad
    ref_pred: torch.Tensor | None
    target: torch.Tensor  # [2B, *S] or shared [B, *S]
    ref_err: torch.Tensor | None  # [2B] fp32


def make_inputs(shape: Shape, dtype: torch.dtype, variant: str, device: str, copies: int = 1, seed: int = 0):
    """``copies`` independent input sets (same values, distinct memory) to rotate through between timed calls.

    Values look like fine-tuning near the reference (pred ~ target, ref ~ pred), so the loss is finite and the
    sigmoid unsaturated, and nothing is denormal (denormals would slow CPU code for reasons unrelated to the loss).
    """
    shared, use_ref_err = VARIANTS[variant]
    gen = torch.Generator(device=device).manual_seed(seed)
    dims = (shape.rows, *shape.sample)
    noise = torch.randn(dims, generator=gen, device=device)
    if shared:
        # Shared noise as the trainers build it: one [B] half, repeated for the losers.
        b = shape.rows // 2
        noise[b:] = noise[:b]
    pred = noise + 0.1 * torch.randn(dims, generator=gen, device=device)
    ref = pred + 0.01 * torch.randn(dims, generator=gen, device=device)
    ref_err = ((ref - noise) ** 2).flatten(1).mean(1) if use_ref_err else None
    target = noise[: shape.rows // 2] if shared else noise
    base = Inputs(
        pred.to(storage_dtype(dtype, variant, "model_pred")),
        None if use_ref_err else ref.to(storage_dtype(dtype, variant, "ref_pred")),
        target.to(storage_dtype(dtype, variant, "target")).contiguous(),
        ref_err,
    )
    del noise, pred, ref
    sets = []
    for _ in range(copies):
        sets.append(
            Inputs(
                base.model_pred.clone().requires_grad_(True),
                None if base.ref_pred is None else base.ref_pred.clone(),
                base.target.clone(),
                None if base.ref_err is None else base.ref_err.clone(),
            )
        )
    return sets
