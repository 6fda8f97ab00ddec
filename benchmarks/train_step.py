"""End-to-end f-DPO training step: step time and peak memory of five ways to get the reference.

    OMP_NUM_THREADS=1 python -m benchmarks.train_step --quick     # smoke test, tiny UNet on CPU (about a minute)
    python -m benchmarks.train_step                                # tiny UNet, on CUDA if there is one, else CPU
    python -m benchmarks.train_step --model sd15 --batch-size 4    # SD1.5-size UNet (random weights, 64x64 latents)
    python -m benchmarks.train_step --model sd15-narrow --batch-size 2   # SD1.5's blocks at 1/5 width, 32x32 (CPU)
    python -m benchmarks.train_step --model sdxl --batch-size 2 --dtype bf16   # SDXL-size UNet (128x128 latents)

Modes (each in its own process, so that each peak is its own):
  eager-copy   the diffusers DPO scripts' loss (F.mse_loss per sample, logsigmoid) with a frozen reference copy
  fused-copy   fused_fdpo_loss with the same frozen reference copy
  fused-lora   fused_fdpo_loss, LoRA adapters (rank --lora-rank) trained, the reference is the adapters-off model
  fused-cached fused_fdpo_loss with cached reference errors (no reference forward at all)
  fused-lora-cached  LoRA adapters trained, cached reference errors: no reference forward and no copy

One step: the trained model's forward on [winners; losers] (shared noise and timestep per pair), the reference
(forward under no_grad, or the cached errors), the loss, backward, AdamW step, zero_grad. Inputs are latents,
timesteps and text embeddings made up once (the VAE and text encoder are outside the step, as with cached
latents). Time: median (and 20/80 % quantiles) of --steps steps after --warmup steps. Memory: CUDA
max_memory_allocated over the timed steps; CPU: the process's peak RSS (ru_maxrss) above its RSS once the
inputs exist and before the models are built, which counts the models, optimizer state, activations and
allocator slack. Writes benchmarks/results/train-step-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .run import _slug, cpu_name  # results named as benchmarks.run names its own

REPO = Path(__file__).resolve().parent.parent
MODES = ("eager-copy", "fused-copy", "fused-lora", "fused-cached", "fused-lora-cached")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# UNet configs: the embedded default's size, and SD1.5 / SDXL sizes (diffusers' configs of those models).
MODELS = {
    "tiny": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    # SD1.5's block structure (3 cross-attention down blocks, 2 layers each, 768-wide text) at a width a CPU
    # trains in about a second per step: 35 M parameters instead of 860 M.
    "sd15-narrow": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sdxl": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
TEXT_TOKENS = 77


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def diffusers_dpo_loss(model_pred, ref_pred, target, beta: float):
    """The loss of diffusers' train_diffusion_dpo.py (SD1.5), as written there (beta_dpo = beta)."""
    import torch.nn.functional as F

    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=list(range(1, 4)))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=list(range(1, 4)))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean()


def run_one(args) -> dict:
    """One mode in this process: build, warm up, time; the result as a dict."""
    from contextlib import nullcontext

    # Imported before the baseline RSS below (as _make_models's import would be after it): peak_mb counts the step.
    from diffusers import UNet2DConditionModel  # noqa: F401

    from fdiv_kernels import fused_fdpo_loss
    from fdiv_kernels.train.lora import adapters_disabled

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    config = MODELS[args.model]
    torch.manual_seed(0)
    noisy, timesteps, text, target, added = _make_inputs(config, args.batch_size, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss, base_cuda = _rss_bytes(), torch.cuda.memory_allocated() if device.type == "cuda" else 0

    unet, ref = _make_models(args, config, device, dtype)
    cached = args.mode in ("fused-cached", "fused-lora-cached")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def forward(model):
        return model(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample

    def step():
        with autocast():
            model_pred = forward(unet)
            if cached:
                reference = {"ref_err": ref_err}
            else:
                with torch.no_grad(), adapters_disabled(unet) if ref is None else nullcontext(ref) as r:
                    reference = {"ref_pred": forward(r).to(model_pred.dtype)}
            if args.mode == "eager-copy":
                loss = diffusers_dpo_loss(model_pred, reference["ref_pred"], target, args.beta)
            else:
                loss = fused_fdpo_loss(model_pred, target=target.to(model_pred.dtype), beta=args.beta, **reference)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    ref_err = None
    if cached:  # the starting (adapters-off) model's per-sample errors, [winners; losers] in fp32, as cached
        with torch.no_grad(), autocast():
            ref_err = (forward(unet).float() - target.float()).square().flatten(1).mean(1)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    result = {
        "mode": args.mode,
        "loss": loss.item(),
        "median_ms": statistics.median(times) * 1e3,
        "q20_ms": q[0] * 1e3,
        "q80_ms": q[3] * 1e3,
        "steps": args.steps,
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "reference_copy": ref is not None,
    }
    if device.type == "cuda":
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        result["peak_kind"] = "cuda max_memory_allocated above the inputs"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_mb"] = (peak - base_rss) / 2**20
        result["peak_kind"] = "peak RSS above the RSS once the inputs exist"
    return result


def _make_inputs(config: dict, b: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """Inputs: b pairs -> 2b rows, winners then losers sharing noise and timestep. (noisy, timesteps, text, target,
    added_cond_kwargs or None)."""
    side = config["sample_size"]
    noisy = torch.randn(2 * b, 4, side, side, device=device, dtype=dtype)
    timesteps = torch.randint(0, 1000, (b,), device=device).repeat(2)
    text = torch.randn(2 * b, TEXT_TOKENS, config["cross_attention_dim"], device=device, dtype=dtype)
    target = torch.randn(2 * b, 4, side, side, device=device, dtype=dtype)
    added = None
    if config.get("addition_embed_type") == "text_time":
        added = {
            "text_embeds": torch.randn(2 * b, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor(
                [[side * 8, side * 8, 0, 0, side * 8, side * 8]] * 2 * b, device=device, dtype=dtype
            ),
        }
    return noisy, timesteps, text, target, added


def _make_models(args, config: dict, device: torch.device, dtype: torch.dtype) -> tuple:
    """(the trained UNet in train mode, its frozen reference copy or None) as args.mode wants them."""
    from diffusers import UNet2DConditionModel

    from fdiv_kernels.train.lora import add_lora

    unet = UNet2DConditionModel(**config)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ref = None
    if args.mode in ("eager-copy", "fused-copy"):
        ref = UNet2DConditionModel(**config).requires_grad_(False).eval()
        ref.load_state_dict(unet.state_dict())
        ref.to(device, dtype)
    if args.mode in ("fused-lora", "fused-lora-cached"):
        unet.to(device, dtype)
        add_lora(unet, args.lora_rank, seed=0)  # base frozen in dtype, adapters trainable in fp32
    else:
        unet.to(device)  # trained weights in fp32, autocast below (Accelerate's mixed precision)
    unet.train()
    return unet, ref


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=list(MODELS), default="tiny")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    p.add_argument("--batch-size", type=int, default=None, help="preference pairs per step (default 8; --quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick 1)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--beta", type=float, default=5000.0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--rounds", type=int, default=1, help="run the modes in rotation this many times (median)")
    p.add_argument("--quick", action="store_true", help="smoke test: few small steps")
    p.add_argument("--tag", default=None, help="results name (default: the device's name, -quick with --quick)")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--one", choices=MODES, default=None, help=argparse.SUPPRESS)  # internal: run one mode here
    return p


def _check(args, parser) -> None:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        parser.error(f"--modes: unknown mode(s) {bad or args.modes!r}; expected some of {', '.join(MODES)}")
    args.modes = modes
    for name, default, quick in (("batch_size", 8, 2), ("steps", 20, 3), ("warmup", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    for name, low in (("batch_size", 1), ("steps", 1), ("warmup", 0), ("lora_rank", 1), ("rounds", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}; got {getattr(args, name)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: expected cpu, or cuda on a machine with a CUDA GPU")
    if args.dtype != "fp32" and args.device == "cpu" and args.dtype == "fp16":
        parser.error("--dtype fp16 needs --device cuda (CPU autocast takes bf16)")


def _markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        f"# Training step: {meta['model']} UNet, {meta['batch_size']} pairs, {meta['dtype']}, {meta['device_name']}",
        "",
        f"{meta['date']}, torch {meta['torch']}, {meta['threads']} thread(s)"
        + (", quick (smoke test: few steps, small batch; not a measurement to quote)" if meta["quick"] else "")
        + (
            f", {meta['rounds']} rounds of the modes in rotation (medians over rounds)"
            if meta.get("rounds", 1) > 1
            else ""
        )
        + f". Command: `{meta['command']}`",
        "",
        "| mode | step ms (median) | 20-80 % ms | peak memory MB | trainable M params | x eager-copy time |"
        " x eager-copy memory |",
        "|---|---|---|---|---|---|---|",
    ]
    eager = next((r for r in results if r["mode"] == "eager-copy" and "median_ms" in r), None)
    for r in results:
        if "median_ms" not in r:
            lines.append(f"| {r['mode']} | failed: {r.get('error', '?')} | | | | | |")
            continue
        rel_t = f"{r['median_ms'] / eager['median_ms']:.2f}" if eager else ""
        rel_m = f"{r['peak_mb'] / eager['peak_mb']:.2f}" if eager and eager["peak_mb"] > 0 else ""
        lines.append(
            f"| {r['mode']} | {r['median_ms']:.1f} | {r['q20_ms']:.1f}-{r['q80_ms']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['trainable_params_m']:.3f} | {rel_t} | {rel_m} |"
        )
    lines += ["", f"Peak memory: {results[0].get('peak_kind', '')}. See benchmarks/train_step.py for the method.", ""]
    return "\n".join(lines)


def _run_mode(args, mode: str, passthrough: list[str]) -> dict:
    """One mode in a fresh process (so that its peak memory is its own)."""
    cmd = [sys.executable, "-m", "benchmarks.train_step", *passthrough, "--one", mode, "--device", args.device]
    for flag in ("batch_size", "steps", "warmup"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        return {"mode": mode, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _over_rounds(mode: str, runs: list[dict]) -> dict:
    """A mode's rounds as one result: median step time (and of the quantiles), the largest peak."""
    good = [r for r in runs if "error" not in r]
    if len(good) < len(runs):
        return next(r for r in runs if "error" in r)
    result = dict(good[0])
    for key in ("median_ms", "q20_ms", "q80_ms"):
        result[key] = statistics.median(r[key] for r in good)
    result["peak_mb"] = max(r["peak_mb"] for r in good)
    result["round_medians_ms"] = [r["median_ms"] for r in good]
    return result


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    if args.one:
        args.mode = args.one
        print(json.dumps(run_one(args)))
        return 0
    passthrough = [a for a in (sys.argv[1:] if argv is None else argv)]
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    # Modes in rotation, --rounds times: each round's processes see the same machine state, so a drift in the
    # machine's speed (shared cores) moves every mode alike; each mode's figure is the median over its rounds.
    for round_ in range(args.rounds):
        for mode in args.modes:
            runs[mode].append(_run_mode(args, mode, passthrough))
            r = runs[mode][-1]
            if "error" in r:
                print(f"{mode}: failed: {r['error']}", file=sys.stderr)
            else:
                print(
                    f"round {round_ + 1}: {mode}: {r['median_ms']:.1f} ms/step, peak {r['peak_mb']:.0f} MB", flush=True
                )
    results = [_over_rounds(mode, runs[mode]) for mode in args.modes]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    meta = {
        "model": args.model,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": device_name,
        "quick": args.quick,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "lora_rank": args.lora_rank,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.train_step " + " ".join(passthrough),
        "loadavg": os.getloadavg(),
    }
    tag = args.tag or f"{args.device}-{_slug(device_name)}-{args.model}" + ("-quick" if args.quick else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"train-step-{tag}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    path.with_suffix(".md").write_text(_markdown(meta, results))
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
