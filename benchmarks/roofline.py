"""Roofline: the bytes each kernel must move, and the kernel time they predict at a GPU's copy bandwidth.

For every GPU shape of benchmarks/shapes.py, dtype, layout and variant (full, shared target, ref_err, a per-sample
mask, the mixed-precision storage of benchmarks/shapes.py:FP32_TENSORS) and kernel (fwd, bwd): the bytes a perfect
kernel moves (each input read once, the gradient written once; O(B) outputs left out), and the predicted kernel
time = bytes / copy bandwidth + a fixed per-call cost (launch, ramp, drain, the forward's combine). Sizes whose
kernel traffic fits in L2 are marked: the prediction is for a cold L2 (what benchmarks.run measures after its
flush); right after the forward in training, their backward reads mostly from L2.

    python -m benchmarks.roofline                                        # the table (markdown) on stdout
    python -m benchmarks.roofline --out benchmarks/results/roofline.md   # the committed table
    python -m benchmarks.roofline --compare OUT/cuda-*.json              # measured kernel time beside the prediction
                                                                         # (benchmarks/gpu_check.sh runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from .shapes import DTYPES, VARIANTS, Shape, ideal_bytes, shapes_for, storage_dtype, tensor_bytes

# Copy bandwidth (read + write bytes of dst.copy_(src), L2 flushed) in GB/s, with where the number comes from.
COPY_GBPS = {
    "h200": (4114.0, "measured: benchmarks/results/cuda-nvidia-h200-partial.md (2026-11-27), dst.copy_(src), 512 MB"),
    "h100": (3000.0, "H100 SXM 3.35 TB/s HBM3 datasheet x ~0.9 reached by a copy (static review 2026-12-07, §7)"),
}
L2_BYTES = 50 * 10**6  # H100 SXM and H200: 50 MB of L2
# Fixed per-call kernel cost in µs (static review 2026-12-07, §7): dispatch, ramp and drain (2 µs); the CUDA
# forward adds its 4-byte memset node and the last block's combine and head; Triton's forward its head launch.
FIXED_US = {("cuda", "fwd"): 5.0, ("cuda", "bwd"): 2.0, ("triton", "fwd"): 6.0, ("triton", "bwd"): 2.0}
SLOW = 1.15  # gpu_check flags a kernel more than 15 % slower than predicted

ROOF_VARIANTS = list(VARIANTS) + ["mask"]  # "mask": the full variant plus a per-sample mask in the case's dtype


def kernel_bytes(shape: Shape, dtype: torch.dtype, variant: str, kernel: str) -> int:
    if variant == "mask":
        return ideal_bytes(shape, dtype, "full", kernel) + tensor_bytes(shape, dtype)
    return ideal_bytes(shape, dtype, variant, kernel)


@dataclass
class Prediction:
    shape: Shape
    dtype: str
    variant: str
    kernel: str
    nbytes: int

    def us(self, gpu: str, backend: str = "cuda") -> float:
        return self.nbytes / (COPY_GBPS[gpu][0] * 1e3) + FIXED_US[(backend, self.kernel)]

    @property
    def l2(self) -> bool:
        return self.nbytes <= L2_BYTES


def predictions(shape_names: list[str] | None = None) -> list[Prediction]:
    out = []
    for shape in shapes_for("cuda", shape_names):
        for dtype_name, dtype in DTYPES.items():
            for variant in ROOF_VARIANTS:
                if variant.startswith("mixed") and dtype_name == "fp32":
                    continue
                for kernel in ("fwd", "bwd"):
                    out.append(
                        Prediction(shape, dtype_name, variant, kernel, kernel_bytes(shape, dtype, variant, kernel))
                    )
    return out


def _storage(dtype_name: str, variant: str) -> str:
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    dtype = DTYPES[dtype_name]
    return "/".join(names[storage_dtype(dtype, variant, t)] for t in ("model_pred", "ref_pred", "target"))


def table(preds: list[Prediction]) -> str:
    lines = [
        "| shape | dims | pred/ref/target | variant | kernel | MB moved | L2-resident | H100 µs (CUDA / Triton) "
        "| H200 µs (CUDA / Triton) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in preds:
        h100 = f"{p.us('h100'):.1f} / {p.us('h100', 'triton'):.1f}"
        h200 = f"{p.us('h200'):.1f} / {p.us('h200', 'triton'):.1f}"
        lines.append(
            f"| {p.shape.name} | {p.shape.label()} | {_storage(p.dtype, p.variant)} | {p.variant} | {p.kernel} | "
            f"{p.nbytes / 1e6:.1f} | {'yes' if p.l2 else ''} | {h100} | {h200} |"
        )
    return "\n".join(lines)


def header() -> str:
    src = "\n".join(f"- {gpu.upper()}: {gbps:.0f} GB/s ({why})" for gpu, (gbps, why) in COPY_GBPS.items())
    fixed = ", ".join(f"{b} {k} {us:g} µs" for (b, k), us in FIXED_US.items())
    return (
        "# Roofline: predicted kernel time (no GPU)\n\n`python -m benchmarks.roofline` (benchmarks/roofline.py). "
        "Predicted kernel time = bytes a perfect kernel moves / copy bandwidth + a fixed per-call cost "
        f"({fixed}). Copy bandwidths:\n{src}\n\nL2-resident: the kernel's traffic fits in the 50 MB L2 (predicted "
        "for a cold L2, as measured; in training such a backward reads mostly from L2). `benchmarks/gpu_check.sh` "
        f"prints measured kernel time beside these and flags any kernel more than {SLOW - 1:.0%} slower.\n\n"
    )


# ----------------------------------------------------------------------------------------- measured vs predicted
def gpu_of(name: str) -> str | None:
    name = name.lower()
    return "h200" if "h200" in name else "h100" if "h100" in name else None


def compare(path: str, gpu: str | None) -> int:
    """Measured kernel time (benchmarks.run's kernel_ms for fwd, and fwd+bwd - fwd for bwd) beside the prediction
    for the fused providers; returns the number of kernels more than 15 % slower than predicted."""
    data = json.loads(open(path).read())
    gpu = gpu or gpu_of(str(data["meta"].get("device_name", "")))
    if gpu is None:
        raise SystemExit(f"roofline: no copy bandwidth for {data['meta'].get('device_name')!r}; pass --gpu h100|h200")
    shapes = {s.name: s for s in shapes_for("cuda")}
    print(
        f"| shape | dtype | variant | provider | kernel | measured µs | predicted µs ({gpu}) | measured / predicted | |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    slow = 0
    for r in data["results"]:
        provider = str(r.get("provider", ""))
        if not provider.startswith("fdiv-") or r.get("kernel_ms") is None or r.get("mode") not in ("fwd", "bwd"):
            continue
        if r["shape"] not in shapes or r["variant"] not in VARIANTS:
            continue
        backend = "triton" if "triton" in provider else "cuda"
        p = Prediction(shapes[r["shape"]], r["dtype"], r["variant"], r["mode"],
                       kernel_bytes(shapes[r["shape"]], DTYPES[r["dtype"]], r["variant"], r["mode"]))  # fmt: skip
        measured, predicted = r["kernel_ms"] * 1e3, p.us(gpu, backend)
        flag = "SLOW" if measured > SLOW * predicted else ""
        slow += bool(flag)
        print(f"| {r['shape']} | {r['dtype']} | {r['variant']} | {provider} | {r['mode']} | {measured:.1f} | "
              f"{predicted:.1f} | {measured / predicted:.2f} | {flag} |")  # fmt: skip
    print(f"roofline: {slow} kernel(s) more than {SLOW - 1:.0%} slower than predicted")
    return slow


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", help="comma list of shapes (default: all GPU shapes)")
    ap.add_argument("--out", help="write the table (markdown) here")
    ap.add_argument("--compare", help="a benchmarks.run JSON: print measured kernel time beside the prediction")
    ap.add_argument("--gpu", choices=sorted(COPY_GBPS), help="copy bandwidth to use (default: from the JSON)")
    args = ap.parse_args(argv)
    if args.compare:
        return 1 if compare(args.compare, args.gpu) else 0
    text = header() + table(predictions(args.shapes.split(",") if args.shapes else None)) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
