"""Microbenchmarks with pytest-benchmark: one benchmark per shape, dtype, variant, mode and provider.

    pytest benchmarks/ --benchmark-only        # timed (benchmarks/README.md); groups = shape, dtype, variant, mode
    pytest benchmarks/                         # quick smoke run: the quick shape, each provider timed once

Cases, providers, inputs and the byte model come from benchmarks.run / shapes.py / providers.py, so the numbers are
comparable with `python -m benchmarks.run` (which also measures first-call, memory and launch counts and writes
the roofline tables). extra_info per benchmark: bytes moved (docs/spec.md §5), GB/s and % of a copy at the median,
the copy bandwidth itself, threads, and the loss value (every provider should agree with eager).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from benchmarks.providers import PROVIDERS
from benchmarks.run import rotation_bytes
from benchmarks.shapes import DTYPES, ideal_bytes, make_inputs

# The inputs of the current case, shared by its modes and providers (one case at a time: they can be ~1 GB).
_inputs: dict = {}
# Built providers of the current case (a torch.compile'd provider compiles once per case, not once per mode).
_built: dict = {}
# Eager's loss per case, to check the others against.
_eager_loss: dict = {}


def _case_inputs(device: torch.device, shape, dtype_name: str, variant: str, quick: bool):
    key = (device.type, shape.name, dtype_name, variant)
    if key not in _inputs:
        _inputs.clear()
        _built.clear()
        dtype = DTYPES[dtype_name]
        # CPU: rotate through copies totalling 2x the last-level cache, so that small shapes come from DRAM like
        # the copy they are compared with (benchmarks.run's method).
        copies = (
            1
            if device.type == "cuda" or quick
            else max(1, math.ceil(rotation_bytes() / ideal_bytes(shape, dtype, variant, "fwd")))
        )
        _inputs[key] = make_inputs(shape, dtype, variant, device.type, copies)
    return _inputs[key]


def _provider_fn(name: str, key):
    if (name, key) not in _built:
        if PROVIDERS[name].compiled:
            torch._dynamo.reset()  # a clean compile per case, as benchmarks.run does
        _built[(name, key)] = PROVIDERS[name].build()
    return _built[(name, key)]


def test_loss(benchmark, bench_case, bench_env):
    device_type, shape, dtype_name, variant, mode, provider_name = bench_case
    device = bench_env["device"]
    provider = PROVIDERS[provider_name]
    why = provider.why_unavailable(device)
    if why is not None:
        pytest.skip(f"{provider_name}: {why}")
    sets = _case_inputs(device, shape, dtype_name, variant, bench_env["quick"])
    key = (shape.name, dtype_name, variant)
    fn = _provider_fn(provider_name, key)
    one = torch.ones((), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counter = itertools.count()

    def next_set():
        return sets[next(counter) % len(sets)]

    def fwd_bwd():
        x = next_set()
        out = torch.autograd.grad(fn(x), x.model_pred, grad_outputs=one)
        sync()
        return out

    def fwd():
        out = fn(next_set())
        sync()
        return out

    def bwd(loss, x):
        out = torch.autograd.grad(loss, x.model_pred, grad_outputs=one)
        sync()
        return out

    def bwd_setup():  # an untimed forward before each timed backward (no retained graph)
        x = next_set()
        loss = fn(x)
        sync()
        return (loss, x), {}

    # Warm-up outside the timing (a torch.compile'd provider compiles here; the first call of a backend loads it).
    fwd_bwd()
    with torch.no_grad():
        loss_value = float(fn(sets[0]))

    benchmark.group = f"{shape.name} {shape.label()} {dtype_name} {variant} {mode}"
    quick = bench_env["quick"]
    if mode == "fwd+bwd":
        benchmark.pedantic(fwd_bwd, rounds=1) if quick else benchmark(fwd_bwd)
    elif mode == "fwd":
        benchmark.pedantic(fwd, rounds=1) if quick else benchmark(fwd)
    else:
        rounds = 1 if quick else _rounds(lambda: bwd(*bwd_setup()[0]))
        benchmark.pedantic(bwd, setup=bwd_setup, rounds=rounds, warmup_rounds=0 if quick else 1)

    nbytes = ideal_bytes(shape, DTYPES[dtype_name], variant, mode)
    info = {
        "provider": provider_name,
        "shape": shape.name,
        "dims": shape.label(),
        "dtype": dtype_name,
        "variant": variant,
        "mode": mode,
        "device": device.type,
        "threads": bench_env["threads"],
        "bytes": nbytes,
        "copy_gbps": round(bench_env["copy_gbps"], 2),
        "loss": loss_value,
        "input_sets": len(sets),
    }
    if provider_name == "eager":
        _eager_loss[key] = loss_value
    if key in _eager_loss:
        info["loss_rel_diff_vs_eager"] = abs(loss_value - _eager_loss[key]) / max(abs(_eager_loss[key]), 1e-12)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        gbps = nbytes / median / 1e9
        info.update(median_ms=median * 1e3, gbps=round(gbps, 2), pct_copy=round(100 * gbps / bench_env["copy_gbps"], 1))
    benchmark.extra_info.update(info)
    assert math.isfinite(loss_value)


def _rounds(call, target_s: float = 0.6, lo: int = 5, hi: int = 50) -> int:
    """Rounds for the backward alone (pedantic: no calibration): ~target_s of timed calls within [lo, hi]."""
    import time

    t0 = time.perf_counter()
    call()
    return int(min(hi, max(lo, target_s / max(time.perf_counter() - t0, 1e-6))))
