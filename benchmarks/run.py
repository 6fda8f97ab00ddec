"""Run the microbenchmarks and write benchmarks/results/<device-tag>.{json,csv,md,png}.

    python -m benchmarks.run --device cpu            # full CPU sweep at 2 threads (~10 min)
    python -m benchmarks.run --device cuda           # full GPU sweep (< 4 min on an H100)
    python -m benchmarks.run --device cpu --quick    # smoke test (< 1 min)
    python -m benchmarks.run --shapes flux,video --dtypes bf16 --providers eager,fdiv-cpu --modes fwd+bwd

Method (also written into each JSON's "method"):
- Time: median and 20/80 % quantiles of per-call times, warm-up calls excluded. GPU: triton.testing.do_bench's
  method (CUDA events around each call, L2 flushed before it). CPU: time.perf_counter around each call, inputs
  rotated through copies totalling twice the last-level cache (256 MB to 1 GiB) so that they come from DRAM, like
  the copy they are compared with.
  bwd alone: a fresh, untimed forward before each timed backward (no retained graph).
- First call: the first fwd+bwd call of a provider on a shape (no warm-up); for torch.compile it is the compile
  time, reported separately as compile_s.
- Effective bandwidth: the bytes of spec §5 (docs/spec.md) (benchmarks/shapes.py:ideal_bytes) over the median time, and
  that as a percentage of a device-to-device copy (read + write bytes) measured at the start of the same run.
- Peak extra memory during one fwd+bwd, above the inputs, the gradient included. CUDA: max_memory_allocated.
  CPU: the torch CPU allocator's running total as torch.profiler(profile_memory=True) tracks it (allocations
  outside the torch allocator, e.g. OpenMP or compiler scratch, are not seen).
- GPU launches: kernels + memcpy + memset seen by torch.profiler in one forward and in one backward. Backward is
  torch.autograd.grad with a preallocated upstream gradient, so autograd's ones_like seed is not counted.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from .providers import COMPILE_PEER, DEFAULT_PROVIDERS, PROVIDERS, QUICK_EXTRA, Provider
from .shapes import (
    DTYPES,
    FP32_TENSORS,
    MODES,
    VARIANTS,
    Inputs,
    Shape,
    ideal_bytes,
    make_inputs,
    shapes_for,
    tensor_bytes,
)

REPO = Path(__file__).resolve().parent.parent
CSV_FIELDS = [
    "shape",
    "dims",
    "dtype",
    "variant",
    "provider",
    "mode",
    "status",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "min_ms",
    "reps",
    "bytes",
    "gbps",
    "pct_copy",
    "kernel_ms",
    "kernel_pct_copy",
    "host_ms",
    "x_eager",
    "x_compile_diffusers",
    "x_compile_ref",
    "peak_extra_mb",
    "peak_extra_tensors",
    "launches",
    "launches_fwd",
    "launches_bwd",
    "first_call_ms",
    "compile_s",
    "rotation_sets",
    "loss",
    "reason",
]


# ----------------------------------------------------------------------------------------------------- timing
class Timer:
    """Per-call times with warm-up excluded; ``setup(i)`` (untimed) runs before each timed ``call(i, state)``.

    The untimed setup is how the backward is timed alone: a fresh forward before every backward, so the graph is
    never retained (torch.compile's donated buffers forbid retain_graph, and trainers never retain it).
    GPU: the method of triton.testing.do_bench (CUDA events around each call, L2 flushed by zeroing a 256 MB
    buffer before it), written out because do_bench cannot leave a setup step out of the timing.
    CPU: perf_counter around each call; input sets rotate so small shapes are not served from cache.
    """

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        # Repeat until ~target_s of timed calls, within [min_reps, max_reps] (huge shapes get the minimum).
        if self.cuda:
            self.target_s, self.min_reps, self.max_reps = (0.01, 5, 100) if quick else (0.04, 10, 500)
            self._l2 = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
        else:
            self.target_s, self.min_reps, self.max_reps = (0.05, 3, 10) if quick else (0.6, 5, 50)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def flush_l2(self):
        self._l2.zero_()

    def once(self, call) -> float:
        """Seconds for one call, synchronized."""
        self.sync()
        t0 = time.perf_counter()
        call()
        self.sync()
        return time.perf_counter() - t0

    def measure(self, call, setup=None, n_sets: int = 1) -> dict:
        """Median and 20/80 % quantiles in ms of call(i, setup(i)) over input sets i (always 0 on GPU)."""
        set_of = (lambda i: 0) if self.cuda else (lambda i: i % n_sets)
        state = setup(0) if setup else None
        estimate = self.once(lambda: call(0, state))  # warm-up, not recorded
        reps = int(min(self.max_reps, max(self.min_reps, self.target_s / max(estimate, 1e-6))))
        times = []
        if self.cuda:
            for _ in range(2):  # a little more warm-up: clocks, allocator
                call(0, setup(0) if setup else None)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for start, end in events:
                state = setup(0) if setup else None
                self.flush_l2()
                start.record()
                call(0, state)
                end.record()
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in events]
        else:
            for i in range(1, reps + 1):  # set 0 was just warmed up: start with the next one
                state = setup(set_of(i)) if setup else None
                t0 = time.perf_counter()
                call(set_of(i), state)
                times.append((time.perf_counter() - t0) * 1e3)
            del state
        q20, med, q80 = (_quantile(times, q) for q in (0.2, 0.5, 0.8))
        # min_ms is extra information: on a shared machine it is the figure least touched by other processes.
        return {"median_ms": float(med), "q20_ms": float(q20), "q80_ms": float(q80), "min_ms": min(times), "reps": reps}


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), without needing numpy on the GPU box."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_copy(device: torch.device, timer: Timer, quick: bool) -> dict:
    """Device-to-device copy bandwidth (read + write bytes / time) on a buffer far beyond the caches."""
    # GPU: 512 MB >> 50 MB L2. CPU: 1 GiB; the VM reports a 480 MiB (host-wide, shared) L3.
    size = (256 if quick else 512 if device.type == "cuda" else 1024) * 2**20
    src = torch.ones(size // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    out = {"buffer_mb": size / 2**20}
    if device.type == "cuda":
        t = timer.measure(lambda i, _: dst.copy_(src))["median_ms"] / 1e3
        out["torch_copy_gbps"] = 2 * size / t / 1e9
        out["gbps"] = out["torch_copy_gbps"]
        out["how"] = "dst.copy_(src), median of CUDA-event-timed calls, L2 flushed before each"
        return out
    reps = 3 if quick else 9
    times = [timer.once(lambda: dst.copy_(src)) for _ in range(reps)]
    out["torch_copy_gbps"] = 2 * size / _quantile(times, 0.5) / 1e9
    try:
        import numpy as np

        src_np, dst_np = src.numpy(), dst.numpy()
        times = [timer.once(lambda: np.copyto(dst_np, src_np)) for _ in range(reps)]
        out["numpy_copy_gbps"] = 2 * size / _quantile(times, 0.5) / 1e9
    except ImportError:
        pass
    # The better of the two is the bar: % of copy is then a conservative figure.
    out["gbps"] = max(out["torch_copy_gbps"], out.get("numpy_copy_gbps", 0.0))
    out["how"] = (
        f"max of torch dst.copy_(src) ({torch.get_num_threads()} threads) and numpy.copyto (1 thread), median of {reps}"
    )
    return out


def rotation_bytes() -> int:
    """CPU working set that the rotated input copies must fill: 2x the last-level cache, within [256 MB, 1 GiB].

    Below that, a shape's inputs stay in cache between calls and the 'bandwidth' beats the DRAM copy (this VM
    reports a 480 MiB L3, host-wide and shared; flux fp32 rotated through 256 MB ran at 180 % of copy).
    """
    llc = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):  # Linux; elsewhere 256 MB
        try:
            text = size.read_text().strip().upper()
            llc = max(llc, int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1))
        except (OSError, ValueError):
            pass
    return int(min(2**30, max(256 * 2**20, 2 * llc)))


# ----------------------------------------------------------------------------------------------------- memory
def peak_extra_bytes(device: torch.device, step) -> int:
    """Peak bytes allocated above the starting point while step() runs (its result kept alive until the end)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        keep = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del keep
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        keep = step()
    del keep
    # The trace's "[memory]" events carry the CPU allocator's running total ("Total Allocated") after each
    # allocation/free. (prof.events() attributes in-op allocations to the ops, so it cannot be replayed simply.)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    mem = sorted(
        (e["ts"], e["args"].get("Ev Idx", 0), e["args"])
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    )
    if not mem:
        return 0
    first = mem[0][2]
    base = first["Total Allocated"] - first["Bytes"]  # the total just before profiling saw anything
    return max(0, max(a["Total Allocated"] for _, _, a in mem) - base)


def count_launches(call) -> tuple[int, list[str]]:
    """GPU activities (kernels, memcpy, memset) torch.profiler sees while call() runs."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        keep = call()
        torch.cuda.synchronize()
    del keep
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(names), names


def kernel_ms(call, flush, reps: int = 10) -> float:
    """Device time per call of what call() launches (kernels, memcpy, memset: torch.profiler's GPU activity),
    with L2 flushed before each call like the wall-time measurement. The flush's own device time is measured
    alone and subtracted. Host time is excluded: this is what the call costs inside a CUDA graph, or where the host
    runs ahead of the GPU in a busy training step."""
    from torch.profiler import ProfilerActivity, profile

    def device_us(fn) -> float:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        return sum(
            getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        )

    call()  # warm
    flush_us = device_us(flush)
    both_us = device_us(lambda: (flush(), call()))
    return max(both_us - flush_us, 0.0) / reps / 1e3


# ----------------------------------------------------------------------------------------------------- metadata
def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)|\bcpu\b|@.*$", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> str | None:
    """git's answer, or None where there is no git or no repository (e.g. a copied tree on a GPU machine)."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def collect_meta(device: torch.device, args) -> dict:
    import fdiv_kernels

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "fdiv_kernels": getattr(fdiv_kernels, "__version__", None),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": None
        if (changed := _git("status", "--porcelain", "--untracked-files=no")) is None
        else bool(changed),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        # Other processes on the cores make 2-thread timings erratic (OpenMP waits for descheduled threads).
        "loadavg_start": _loadavg(),
        "quick": args.quick,
        "compile_peer": COMPILE_PEER[device.type],
        "method": {
            "time": "median, 20/80% quantiles, warm-up excluded; "
            + (
                "CUDA events per call, L2 flushed before each (triton.testing.do_bench's method)"
                if device.type == "cuda"
                else f"perf_counter per call, inputs rotated through {rotation_bytes() / 2**20:.0f} MB of copies"
            ),
            "first_call": "first fwd+bwd call of a provider on a shape, no warm-up (torch.compile: compile time)",
            "bandwidth": "spec §5 (docs/spec.md) bytes (benchmarks/shapes.py:ideal_bytes) / median time",
            "memory": "torch.cuda.max_memory_allocated above the inputs, gradient included"
            if device.type == "cuda"
            else "torch CPU allocator running total via torch.profiler(profile_memory=True), above the inputs, "
            "gradient included; allocations outside the torch allocator are not seen",
            "launches": "kernels+memcpy+memset per forward / backward in torch.profiler (GPU only)",
            "backward": "torch.autograd.grad(loss, model_pred, grad_outputs=preallocated 1); bwd mode times it "
            "alone after an untimed forward",
            "loss": "reverse_kl, beta=5000, mean reductions",
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
        meta["gpu_sms"] = props.multi_processor_count
    return meta


# ----------------------------------------------------------------------------------------------------- one case
def _err(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:400]


def _error_row(err: BaseException) -> dict:
    """status "error" with the message, and the innermost frames for whoever reads a one-shot GPU run's JSON."""
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exc()
    return {"status": "error", "reason": _err(err), "traceback": traceback.format_exc(limit=-4)[-2000:]}


def run_provider(
    provider: Provider,
    sets: list[Inputs],
    shape: Shape,
    dtype,
    variant: str,
    modes,
    device,
    timer: Timer,
    copy_gbps: float,
) -> list[dict]:
    """All modes of one provider on one case; errors become rows with status "error"."""
    base = {"provider": provider.name, "rotation_sets": len(sets)}
    one = torch.ones((), device=device)  # upstream gradient, preallocated (not a timed kernel)
    rows = []
    fn = None
    try:
        if provider.compiled:
            torch._dynamo.reset()  # a clean compile per case: honest compile time, no guard pile-up
        fn = provider.build()

        def fwd_bwd(i):
            x = sets[i]
            return torch.autograd.grad(fn(x), x.model_pred, grad_outputs=one)

        first = timer.once(lambda: fwd_bwd(0))
        extra = {"first_call_ms": first * 1e3, "compile_s": first if provider.compiled else None}
        with torch.no_grad():  # the value, to check that every provider computes the same loss
            extra["loss"] = float(fn(sets[0]))
        try:
            peak = peak_extra_bytes(device, lambda: fwd_bwd(0))
            extra["peak_extra_mb"] = peak / 2**20
            extra["peak_extra_tensors"] = peak / tensor_bytes(shape, dtype)
        except Exception as err:
            extra["memory_error"] = _err(err)
        launches = {}
        if device.type == "cuda":
            try:
                launches["fwd"], names_f = count_launches(lambda: fn(sets[0]))
                loss = fn(sets[0])
                launches["bwd"], names_b = count_launches(
                    lambda: torch.autograd.grad(loss, sets[0].model_pred, grad_outputs=one)
                )
                launches["fwd+bwd"] = launches["fwd"] + launches["bwd"]
                extra["launches_fwd"], extra["launches_bwd"] = launches["fwd"], launches["bwd"]
                extra["kernels_fwd"] = names_f[:8]
                extra["kernels_bwd"] = names_b[:8]
                del loss
            except Exception as err:
                extra["launches_error"] = _err(err)

        for mode in modes:
            row = {**base, **extra, "mode": mode, "launches": launches.get(mode)}
            try:
                if mode == "fwd":  # grad enabled, as in training; the graph is dropped with the output
                    timing = timer.measure(lambda i, _: fn(sets[i]), n_sets=len(sets))
                elif mode == "fwd+bwd":
                    timing = timer.measure(lambda i, _: fwd_bwd(i), n_sets=len(sets))
                else:  # a fresh, untimed forward before each timed backward
                    timing = timer.measure(
                        lambda i, loss: torch.autograd.grad(loss, sets[i].model_pred, grad_outputs=one),
                        setup=lambda i: fn(sets[i]),
                        n_sets=len(sets),
                    )
                row.update(timing)
                nbytes = ideal_bytes(shape, dtype, variant, mode)
                gbps = nbytes / (row["median_ms"] / 1e3) / 1e9
                row.update(status="ok", bytes=nbytes, gbps=gbps, pct_copy=100 * gbps / copy_gbps)
                if device.type == "cuda" and mode in ("fwd", "fwd+bwd"):
                    try:
                        call = (lambda: fn(sets[0])) if mode == "fwd" else (lambda: fwd_bwd(0))
                        k_ms = kernel_ms(call, timer.flush_l2)
                        row.update(
                            kernel_ms=k_ms,
                            kernel_pct_copy=100 * nbytes / (k_ms / 1e3) / 1e9 / copy_gbps,
                            host_ms=max(row["median_ms"] - k_ms, 0.0),
                        )
                    except Exception as err:
                        row["kernel_error"] = _err(err)
            except Exception as err:
                row.update(_error_row(err))
                _free(device)
            rows.append(row)
        by_mode = {r["mode"]: r for r in rows if r.get("kernel_ms") is not None}
        bwd = next((r for r in rows if r["mode"] == "bwd" and r.get("status") == "ok"), None)
        if bwd is not None and "fwd" in by_mode and "fwd+bwd" in by_mode:  # the backward's kernels alone
            k_ms = max(by_mode["fwd+bwd"]["kernel_ms"] - by_mode["fwd"]["kernel_ms"], 1e-6)
            bwd.update(
                kernel_ms=k_ms,
                kernel_pct_copy=100 * bwd["bytes"] / (k_ms / 1e3) / 1e9 / copy_gbps,
                host_ms=max(bwd["median_ms"] - k_ms, 0.0),
            )
    except Exception as err:
        error = _error_row(err)
        rows = [{**base, "mode": m, **error} for m in modes]
    fn = None  # drop the provider (and its compiled graphs) before the next case
    _free(device)
    return rows


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_speedups(rows: list[dict]) -> None:
    """x_<baseline> = baseline median / this median, same case and mode."""
    by_key = {(r["provider"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for peer, col in (
            ("eager", "x_eager"),
            ("compile-diffusers", "x_compile_diffusers"),
            ("compile-ref", "x_compile_ref"),
        ):
            other = by_key.get((peer, r["mode"]))
            r[col] = other["median_ms"] / r["median_ms"] if other else None


# ----------------------------------------------------------------------------------------------------- main
def _csv_list(text: str | None, choices, what: str) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in choices]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(choices)}")
    return items


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    ap.add_argument("--quick", action="store_true", help="one small shape, bf16, few repeats: a smoke test")
    ap.add_argument("--shapes", help="comma list: sd15,sdxl,flux,video,pixel,large (quick: the smoke shape)")
    ap.add_argument("--dtypes", help="comma list of bf16,fp16,fp32 (default: all)")
    ap.add_argument("--variants", help="comma list of " + ",".join(VARIANTS) + " (default: full,shared,ref_err,mixed)")
    ap.add_argument(
        "--variant-dtypes",
        default="bf16",
        help="dtypes that also run the non-'full' variants (comma list, or 'all'); default bf16",
    )
    ap.add_argument("--providers", help="comma list of " + ",".join(PROVIDERS) + " (default: per device)")
    ap.add_argument("--modes", help="comma list of " + ",".join(MODES) + " (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads); default 2")
    ap.add_argument("--tag", help="results file stem (default: <device>-<model>, '-quick'/'-partial' if filtered)")
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="stop starting new cases after this many seconds (default: 200 on cuda, none on cpu)",
    )
    ap.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="keep the on-disk Inductor/Triton caches (default except with --quick: a fresh, empty "
        "cache for this run, so that compile_s is a first compile as a user sees it)",
    )
    ap.add_argument("--no-report", action="store_true", help="skip the markdown table and plot")
    return ap.parse_args(argv)


def build_cases(args, device_type: str):
    filtered = any(v is not None for v in (args.shapes, args.dtypes, args.variants, args.providers, args.modes))
    defaults = ("quick", "bf16", "full") if args.quick else (None, "bf16,fp16,fp32", "full,shared,ref_err,mixed")
    shape_names, dtypes, variants = (
        given or default for given, default in zip((args.shapes, args.dtypes, args.variants), defaults)
    )
    shapes = shapes_for(device_type, shape_names.split(",") if shape_names else None)
    dtypes = _csv_list(dtypes, DTYPES, "dtype")
    variants = _csv_list(variants, VARIANTS, "variant")
    variant_dtypes = dtypes if args.variant_dtypes == "all" else _csv_list(args.variant_dtypes, DTYPES, "dtype")
    # Case order = priority (a time budget cuts from the end): every shape in the full variant per dtype, then
    # the shared-target and ref_err variants.
    cases = [(s, d, "full") for d in dtypes for s in shapes] if "full" in variants else []
    cases += [
        (s, d, v)
        for v in variants
        if v != "full"
        for d in dtypes
        if d in variant_dtypes and not (v in FP32_TENSORS and d == "fp32")  # an fp32 case has nothing to mix
        for s in shapes
    ]
    return cases, filtered


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    compile_cache = _choose_compile_cache(args)
    # Many static shapes per compiled function: lift dynamo's recompile limit so nothing silently runs eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)

    cases, filtered = build_cases(args, device.type)
    providers = _csv_list(args.providers, PROVIDERS, "provider") or (
        DEFAULT_PROVIDERS[device.type] + (QUICK_EXTRA[device.type] if args.quick else [])
    )
    modes = _csv_list(args.modes, MODES, "mode") or list(MODES)
    budget = args.time_budget_s if args.time_budget_s is not None else (200.0 if device.type == "cuda" else 0.0)

    # Availability first (this may load/compile an extension): outside the timed budget.
    unavailable = {p: PROVIDERS[p].why_unavailable(device) for p in providers}
    for p, why in unavailable.items():
        print(f"provider {p}: {'available' if why is None else 'unavailable: ' + why}", flush=True)

    meta = collect_meta(device, args)
    meta["compile_cache"] = compile_cache
    tag = args.tag or (
        f"{device.type}-{_slug(meta['device_name'])}" + ("-quick" if args.quick else "-partial" if filtered else "")
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(device, args.quick)
    meta["copy"] = measure_copy(device, timer, args.quick)
    copy_gbps = meta["copy"]["gbps"]
    print(
        f"{meta['device_name']} | torch {meta['torch']} | triton {meta['triton']} | {meta['threads']} threads | "
        f"copy {copy_gbps:.1f} GB/s | load average {meta['loadavg_start']}",
        flush=True,
    )
    if device.type == "cpu" and (meta["loadavg_start"] or 0) > 0.5:
        print("warning: other processes are using the CPU; timings will be noisy (see loadavg in the JSON)", flush=True)

    results: list[dict] = []
    start = time.perf_counter()
    for shape, dtype_name, variant in cases:
        dtype = DTYPES[dtype_name]
        case = {"shape": shape.name, "dims": shape.label(), "dtype": dtype_name, "variant": variant}
        if budget and time.perf_counter() - start > budget:
            reason = f"not started: time budget {budget:g} s (--time-budget-s)"
            results += [
                {**case, "provider": p, "mode": m, "status": "skipped", "reason": reason}
                for p in providers
                for m in modes
            ]
            print(f"{shape.name:>6} {dtype_name:>4} {variant:<8} skipped: {reason}", flush=True)
            continue
        rows = []
        try:
            set_bytes = ideal_bytes(shape, dtype, variant, "fwd")
            copies = 1 if device.type == "cuda" else max(1, math.ceil(rotation_bytes() / set_bytes))
            sets = make_inputs(shape, dtype, variant, args.device, copies)
        except Exception as err:  # e.g. out of memory for the inputs themselves
            rows = [
                {"provider": p, "mode": m, "status": "error", "reason": "inputs: " + _err(err)}
                for p in providers
                for m in modes
            ]
            sets = []
        for p in providers if sets else []:
            if unavailable[p] is not None:
                rows += [{"provider": p, "mode": m, "status": "unavailable", "reason": unavailable[p]} for m in modes]
                continue
            rows += run_provider(PROVIDERS[p], sets, shape, dtype, variant, modes, device, timer, copy_gbps)
        del sets
        _free(device)
        add_speedups(rows)
        rows = [{**case, **r} for r in rows]
        results += rows
        _print_case(case, rows)
        _write(out_dir, tag, meta, results, time.perf_counter() - start)  # partial results survive a kill

    json_path = _write(out_dir, tag, meta, results, time.perf_counter() - start)
    print(f"wrote {json_path} and {json_path.with_suffix('.csv')} in {time.perf_counter() - start:.0f} s", flush=True)
    if not args.no_report:
        _write_report(json_path)
    return json_path


def _choose_compile_cache(args) -> str:
    """A fresh, empty Inductor/Triton cache for this run unless --warm-compile-cache or --quick; says which."""
    if args.warm_compile_cache or args.quick:  # a smoke test needs no cold compile (~30 s on 2 cores)
        return "warm: the existing on-disk Inductor/Triton caches"
    # Earlier runs' cached graphs and kernels would turn compile_s into a cache lookup. Inductor and Triton
    # read these variables when they first compile, which happens after this point.
    fresh = tempfile.mkdtemp(prefix="fdiv-bench-compile-cache-")
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
    os.environ["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")
    return "cold: a fresh, empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR for this run"


def _write_report(json_path: Path) -> None:
    """The device's markdown report from the results JSON; a failure is printed, not raised (the JSON is kept)."""
    try:
        from .report import write_device_report

        for path in write_device_report(json_path):
            print(f"wrote {path}", flush=True)
    except Exception as err:
        print(f"report failed: {_err(err)}", flush=True)


def _print_case(case: dict, rows: list[dict]) -> None:
    """One line per provider: its fwd+bwd result (or its last mode's), or why it did not run."""
    head = f"{case['shape']:>6} {case['dtype']:>4} {case['variant']:<8}"
    by_provider: dict[str, dict] = {}
    for r in rows:
        shown = by_provider.get(r["provider"])
        if shown is None or shown.get("status") == "ok" and shown["mode"] != "fwd+bwd":
            by_provider[r["provider"]] = r
    for p, r in by_provider.items():
        if r.get("status") != "ok":
            print(f"{head} {p:<18} {r.get('status')}: {r.get('reason', '')[:110]}", flush=True)
            continue
        xe = r.get("x_eager")
        print(
            f"{head} {p:<18} {r['mode']:<7} {r['median_ms']:9.3f} ms  {r['gbps']:7.1f} GB/s "
            f"{r['pct_copy']:5.1f}% copy  x_eager {'-' if xe is None else f'{xe:.2f}'}  "
            f"first {r.get('first_call_ms', float('nan')):.0f} ms  "
            f"peak+ {r.get('peak_extra_mb', float('nan')):.1f} MB"
            + (f"  launches {r['launches']}" if r.get("launches") is not None else ""),
            flush=True,
        )


def _write(out_dir: Path, tag: str, meta: dict, results: list[dict], elapsed: float) -> Path:
    meta = {**meta, "elapsed_s": round(elapsed, 1), "tag": tag, "loadavg_end": _loadavg()}
    path = out_dir / f"{tag}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    tmp.replace(path)
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        # Run-wide facts repeated per row, so that the CSV stands alone.
        run_cols = {
            "device": meta["device_name"],
            "threads": meta["threads"],
            "torch": meta["torch"],
            "triton": meta["triton"],
            "date": meta["date"],
            "copy_gbps": f"{meta['copy']['gbps']:.4g}",
        }
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + list(run_cols), extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({**{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}, **run_cols})
    return path


if __name__ == "__main__":
    main()
