"""A microbenchmark: the fused loss against the loss as trainers write it today, forward + backward.

The eager baseline is diffusers' SDXL Diffusion-DPO loss (`.float()` casts, per-sample MSE, chunk(2),
-logsigmoid); the fused call computes the same value in one pass over memory forward and one backward. Timed with
torch.utils.benchmark (CPU: at the current thread count; GPU: synchronized), with the effective bandwidth of the
fused call (6 passes over one [2B, D] tensor: pred, ref and target read forward; pred and target read and the
gradient written backward).

    python examples/microbenchmark.py                          # SDXL-sized latents [16, 4, 128, 128], bf16
    python examples/microbenchmark.py --shape 8,16,128,128 --dtype fp32
    python examples/microbenchmark.py --quick                  # a small shape, short timing (CI)

The full suite (every shape, dtype, mode and provider, torch.compile included) is `pytest benchmarks/
--benchmark-only` or `python -m benchmarks.run` in the repository (benchmarks/README.md).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from fdiv_kernels import fused_fdpo_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_diffusers_loss(model_pred, ref_pred, target, beta):
    """The loss block of diffusers' train_diffusion_dpo_sdxl.py."""
    dims = list(range(1, model_pred.ndim))
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dims)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside_term).mean()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="16,4,128,128", help="2B,C,H,W (winners then losers)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per provider")
    ap.add_argument("--quick", action="store_true", help="[8, 4, 32, 32], 0.05 s per provider (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.min_run_time = "8,4,32,32", 0.05
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = tuple(int(s) for s in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    beta = 5000.0

    gen = torch.Generator(device=device).manual_seed(0)
    target = torch.randn(dims, generator=gen, device=device)
    model_pred = (target + 0.1 * torch.randn(dims, generator=gen, device=device)).to(dtype).requires_grad_(True)
    ref_pred = (model_pred.detach().float() + 0.01 * torch.randn(dims, generator=gen, device=device)).to(dtype)
    target = target.to(dtype)

    providers = {
        "eager (diffusers)": lambda: eager_diffusers_loss(model_pred, ref_pred, target, beta),
        "fused_fdpo_loss": lambda: fused_fdpo_loss(model_pred, ref_pred, target, beta=beta),
    }
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {}
    for name, loss_fn in providers.items():

        def step(loss_fn=loss_fn):
            model_pred.grad = None
            loss_fn().backward()
            sync()

        step()  # warm-up (the first fused call also loads or compiles the kernels)
        timer = benchmark.Timer(
            stmt="step()",
            globals={"step": step},
            label="f-DPO loss fwd+bwd",
            sub_label=f"{list(dims)} {args.dtype}",
            description=name,
            num_threads=torch.get_num_threads(),
        )
        results[name] = timer.blocked_autorange(min_run_time=args.min_run_time)
        print(
            f"{name:>18}: {loss_fn().detach().item():.6f} loss, {results[name].median * 1e3:8.3f} ms (median)",
            flush=True,
        )

    fused = results["fused_fdpo_loss"].median
    nbytes = 6 * model_pred.numel() * model_pred.element_size()
    print(
        f"fused_fdpo_loss: {results['eager (diffusers)'].median / fused:.2f}x eager, "
        f"{nbytes / fused / 1e9:.1f} GB/s effective ({device}, {torch.get_num_threads()} threads)"
    )
    benchmark.Compare(list(results.values())).print()


if __name__ == "__main__":
    main()
