"""Host overhead per call: microseconds per forward and per forward+backward on a tiny shape, where the kernels'
own work is negligible and what remains is what every training step pays on the host (argument checks,
dispatch, autograd bookkeeping, Python).

    python -m benchmarks.host                    # CPU, writes benchmarks/results/host-cpu-<model>.{json,md}
    python -m benchmarks.host --device cuda      # GPU: host time of the launches (no sync inside the timed loop)

Providers: every available fdiv backend (with and without ``return_stats``), the loss as diffusers' SDXL script
writes it (``eager``), ``torch.compile`` of it, and native ``F.mse_loss`` forward+backward as the floor any op
pays. Method: rounds of ``--calls`` back-to-back calls per provider, providers interleaved round by round (so
drift hits all alike), the median over rounds of (round time / calls). fwd+bwd calls ``loss.backward()`` and
clears the gradient, the same for every provider. On CUDA the device is synchronized only around each round, so
the figure is the host's cost of issuing the work (the kernels of a tiny shape finish long before).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from fdiv_kernels import fused_fdpo_loss
from fdiv_kernels.backends import _why_unavailable

from .providers import BETA, diffusers_style_loss
from .run import _slug, collect_meta, cpu_name

REPO = Path(__file__).resolve().parent.parent
SHAPE = (2, 4, 8, 8)  # B = 1 pair: [2B, C, H, W]


def _providers(device: torch.device):
    """name -> (forward-only callable or None, fwd+bwd callable), each taking (pred, ref, target)."""

    def fwd_bwd(forward):
        def step(p, r, t):
            forward(p, r, t).backward()
            p.grad = None

        return step

    out = {}
    out["mse_loss (floor)"] = (lambda p, r, t: F.mse_loss(p, t), fwd_bwd(lambda p, r, t: F.mse_loss(p, t)))
    out["eager"] = (diffusers_style_loss, fwd_bwd(diffusers_style_loss))
    compiled = torch.compile(diffusers_style_loss, dynamic=False)
    out["compile-diffusers"] = (compiled, fwd_bwd(compiled))
    for backend in ("cpu", "cuda", "triton", "torch"):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is a correctness tool
        if _why_unavailable(backend, device) is not None:
            continue
        for stats in (False, True):

            def loss(p, r, t, _b=backend, _s=stats):
                out_ = fused_fdpo_loss(p, r, t, beta=BETA, backend=_b, return_stats=_s)
                return out_[0] if _s else out_

            out[f"fdiv-{backend}" + (" +stats" if stats else "")] = (loss, fwd_bwd(loss))
    return out


def measure(device: torch.device, calls: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(SHAPE, generator=g).to(device).requires_grad_()
    ref = pred.detach() + 0.01 * torch.randn(SHAPE, generator=g).to(device)
    target = torch.randn(SHAPE, generator=g).to(device)
    providers = _providers(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cases = []
    for name, (fwd, step) in providers.items():
        if fwd is not None:
            cases.append((name, "fwd", lambda f=fwd: f(pred.detach(), ref, target)))
        cases.append((name, "fwd+bwd", lambda s=step: s(pred, ref, target)))
    times = {(name, mode): [] for name, mode, _ in cases}
    for _, _, call in cases:  # warm-up (and the compile) outside the timing
        for _ in range(20):
            call()
    sync()
    for _ in range(rounds):
        for name, mode, call in cases:
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                call()
            sync()
            times[(name, mode)].append((time.perf_counter() - start) / calls * 1e6)
    rows = []
    for (name, mode), ts in times.items():
        rows.append(
            {
                "provider": name,
                "mode": mode,
                "median_us": round(statistics.median(ts), 2),
                "min_us": round(min(ts), 2),
                "max_us": round(max(ts), 2),
            }
        )
    floor = next(r["median_us"] for r in rows if r["provider"] == "mse_loss (floor)" and r["mode"] == "fwd+bwd")
    eager = {r["mode"]: r["median_us"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        r["x_mse_loss"] = round(r["median_us"] / floor, 2) if r["mode"] == "fwd+bwd" else None
        r["x_eager"] = round(r["median_us"] / eager[r["mode"]], 2)
    return {"shape": list(SHAPE), "dtype": "float32", "calls_per_round": calls, "rounds": rounds, "rows": rows}


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Host overhead per call: {meta.get('device_name', meta.get('device'))}, "
        f"{meta.get('threads', '?')} threads, {meta['date'][:10]}",
        "",
        f"Shape `{result['shape']}` fp32 (B = 1 pair), median over {result['rounds']} rounds of "
        f"{result['calls_per_round']} calls (min-max in brackets). `x mse_loss` = fwd+bwd time over native "
        "`F.mse_loss` forward+backward, the floor any op pays; `x eager` = over the diffusers-style loss. "
        "Generated by `python -m benchmarks.host`."
        + (
            f" **Measured while other processes shared the cores (load average {meta['loadavg_start']} at the start): "
            "noisy; compare ratios within the run.**"
            if (meta.get("loadavg_start") or 0) > 1.5
            else ""
        ),
        "",
        "| provider | mode | us per call | x mse_loss | x eager |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['provider']} | {r['mode']} | {r['median_us']} [{r['min_us']}-{r['max_us']}] | "
            f"{r['x_mse_loss'] if r['x_mse_loss'] is not None else ''} | {r['x_eager']} |"
        )
    return "\n".join(lines) + "\n"


def rewrite_markdown(json_path: Path) -> Path:
    """Regenerate the .md beside a result .json (after a change to the table's format)."""
    md = json_path.with_suffix(".md")
    md.write_text(to_markdown(json.loads(json_path.read_text())))
    return md


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=500, help="calls per round (default 500)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per provider and mode (default 15)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    ap.add_argument("--tag", help="file stem (default: host-<device>-<model>)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = measure(device, args.calls, args.rounds)
    args.quick = False
    meta = collect_meta(device, args)
    meta["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["command"] = "python -m benchmarks.host " + " ".join(argv if argv is not None else sys.argv[1:])
    meta["method"] = {"time": __doc__.split("\n\n")[2].replace("\n", " ")}
    result["meta"] = meta
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    stem = args.tag or f"host-{device.type}-{_slug(name)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = to_markdown(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return out / f"{stem}.json"


if __name__ == "__main__":
    main()
