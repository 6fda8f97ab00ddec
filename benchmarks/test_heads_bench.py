"""Microbenchmarks of the preference heads (issue 23): MaPO, Diffusion-SDPO and Diffusion-KTO fwd+bwd, each as its
authors write it (eager), torch.compile of that, and the fused passes (benchmarks/heads.py).

    pytest benchmarks/test_heads_bench.py --benchmark-only --bench-threads 1 --benchmark-json out.json
    python -m benchmarks.report --heads out.json     # results/heads-<tag>.md and the README's heads table
    pytest benchmarks/test_heads_bench.py            # smoke: the quick shape in bf16, each provider once

Cases: the sd15 (16x4x64x64) and sdxl (16x4x128x128) shapes of shapes.py, bf16 and fp32, the "full" variant; groups
are head + shape + dtype, so each pytest-benchmark table compares one head's three providers. Inputs and CPU
rotation are test_microbench's. Head "dpo" is plain Diffusion-DPO (eager, compile-diffusers, fdiv-cpu) for
context. extra_info: the loss, its relative difference from the head's eager provider and from the float64 value of
fdiv_kernels.reference,
the bytes a fused implementation must move (5 tensor passes for MaPO, which reads no reference; 6 for the others)
and the GB/s and % of copy at the median.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from benchmarks.heads import HEAD_PROVIDERS, HEADS, reference_loss_f64
from benchmarks.shapes import DTYPES, ideal_bytes, shapes_for, tensor_bytes
from benchmarks.test_microbench import _case_inputs

SHAPES = ("sd15", "sdxl")
HEAD_DTYPES = ("bf16", "fp32")
IMPLS = ("eager", "compile", "fdiv-cpu")

_built: dict = {}
_eager_loss: dict = {}
_f64_loss: dict = {}


def pytest_generate_tests(metafunc):
    if "head_case" not in metafunc.fixturenames:
        return
    quick = not metafunc.config.getoption("benchmark_only")
    shapes = shapes_for("cpu", ["quick"] if quick else list(SHAPES))
    dtypes = ("bf16",) if quick else HEAD_DTYPES
    params, ids = [], []
    for head, shape, dtype, impl in itertools.product(HEADS, shapes, dtypes, IMPLS):
        params.append((head, shape, dtype, f"{head}-{impl}"))
        ids.append(f"{head}-{shape.name}-{dtype}-{impl}")
    metafunc.parametrize("head_case", params, ids=ids)


def head_bytes(head: str, shape, dtype: torch.dtype) -> int:
    """fwd+bwd bytes of the fused passes: the full variant's 6 tensor passes; MaPO reads no reference (5)."""
    full = ideal_bytes(shape, dtype, "full", "fwd+bwd")
    return full - tensor_bytes(shape, dtype) if head == "mapo" else full


def test_head(benchmark, head_case, bench_env):
    head, shape, dtype_name, provider_name = head_case
    device = bench_env["device"]
    if device.type != "cpu":
        pytest.skip("the head benchmarks are CPU rows (fdiv-cpu)")
    provider = HEAD_PROVIDERS[provider_name]
    sets = _case_inputs(device, shape, dtype_name, "full", bench_env["quick"])
    key = (head, shape.name, dtype_name)
    if (provider_name, key) not in _built:
        if provider.compiled:
            torch._dynamo.reset()  # a clean compile per case
        _built[(provider_name, key)] = provider.build()
    fn = _built[(provider_name, key)]
    one = torch.ones((), device=device)
    counter = itertools.count()

    def fwd_bwd():
        x = sets[next(counter) % len(sets)]
        return torch.autograd.grad(fn(x), x.model_pred, grad_outputs=one)

    fwd_bwd()  # warm-up: a compiled provider compiles here
    loss_value = float(fn(sets[0]).detach())  # grad enabled: SDPO's eager lambda differentiates inside
    benchmark.group = f"{head} {shape.name} {shape.label()} {dtype_name} fwd+bwd"
    benchmark.pedantic(fwd_bwd, rounds=1) if bench_env["quick"] else benchmark(fwd_bwd)

    nbytes = head_bytes(head, shape, DTYPES[dtype_name])
    info = {
        "head": head,
        "provider": provider_name,
        "impl": provider.impl,
        "shape": shape.name,
        "dims": shape.label(),
        "dtype": dtype_name,
        "mode": "fwd+bwd",
        "threads": bench_env["threads"],
        "bytes": nbytes,
        "copy_gbps": round(bench_env["copy_gbps"], 2),
        "loss": loss_value,
        "input_sets": len(sets),
        "torch": torch.__version__,
        "loadavg_1m": os.getloadavg()[0],
    }
    if key not in _f64_loss:
        _f64_loss[key] = reference_loss_f64(head, sets[0])
    info["loss_f64"] = _f64_loss[key]
    info["loss_rel_diff_vs_f64"] = abs(loss_value - _f64_loss[key]) / max(abs(_f64_loss[key]), 1e-12)
    if provider.impl == "eager":
        _eager_loss[key] = loss_value
    if key in _eager_loss:
        info["loss_rel_diff_vs_eager"] = abs(loss_value - _eager_loss[key]) / max(abs(_eager_loss[key]), 1e-12)
    median = getattr(getattr(getattr(benchmark, "stats", None), "stats", None), "median", None)
    if median:
        gbps = nbytes / median / 1e9
        info.update(median_ms=median * 1e3, gbps=round(gbps, 2), pct_copy=round(100 * gbps / bench_env["copy_gbps"], 1))
    benchmark.extra_info.update(info)
    assert math.isfinite(loss_value)
