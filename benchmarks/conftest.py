"""pytest-benchmark set-up of the microbenchmarks (benchmarks/test_microbench.py).

    pytest benchmarks/ --benchmark-only                      # the sweep of `python -m benchmarks.run`, timed
    pytest benchmarks/ --benchmark-only -k "flux and bf16"   # filter by id (shape, dtype, variant, mode, provider)
    pytest benchmarks/ --benchmark-only --bench-shapes sd15,flux --bench-providers eager,fdiv-cpu
    pytest benchmarks/                                       # quick: each provider once on a small shape

The cases, providers and inputs are those of benchmarks.run (benchmarks/shapes.py, benchmarks/providers.py):
the --bench-* options take the same values as its --shapes, --dtypes, ... options.
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("fdiv_kernels benchmarks", "cases (same values as python -m benchmarks.run)")
    group.addoption(
        "--bench-device", choices=["cpu", "cuda"], default=None, help="default: cuda when a GPU is visible, else cpu"
    )
    group.addoption("--bench-threads", type=int, default=2, help="CPU threads (torch.set_num_threads); default 2")
    for name, what in (
        ("shapes", "sd15,sdxl,flux,video,pixel,large"),
        ("dtypes", "bf16,fp16,fp32"),
        ("variants", "full,shared,ref_err,ref_err+shared"),
        ("providers", "eager,fdiv-cpu,..."),
        ("modes", "fwd,bwd,fwd+bwd"),
    ):
        group.addoption(f"--bench-{name}", default=None, help=f"comma list of {what} (default: as benchmarks.run)")
    group.addoption(
        "--bench-variant-dtypes",
        default="bf16",
        help="dtypes that also run the non-'full' variants (comma list, or 'all'); default bf16",
    )


def _quick(config) -> bool:
    """Without --benchmark-only, `pytest benchmarks/` is a smoke test: the quick shape, one timed call each."""
    return not config.getoption("benchmark_only")


def bench_settings(config):
    """(run_args, device, cases, providers, modes) as benchmarks.run would choose them from these options."""
    from benchmarks.providers import DEFAULT_PROVIDERS, PROVIDERS, QUICK_EXTRA
    from benchmarks.run import _csv_list, build_cases, parse_args
    from benchmarks.shapes import MODES

    argv = []
    device = config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    argv += ["--device", device, "--threads", str(config.getoption("bench_threads"))]
    argv += ["--variant-dtypes", config.getoption("bench_variant_dtypes")]
    for name in ("shapes", "dtypes", "variants", "providers", "modes"):
        value = config.getoption(f"bench_{name}")
        if value:
            argv += [f"--{name}", value]
    if _quick(config):
        argv.append("--quick")
    args = parse_args(argv)
    cases, _ = build_cases(args, device)
    providers = _csv_list(args.providers, PROVIDERS, "provider") or (
        DEFAULT_PROVIDERS[device] + (QUICK_EXTRA[device] if args.quick else [])
    )
    modes = _csv_list(args.modes, MODES, "mode") or list(MODES)
    return args, device, cases, providers, modes


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    _, device, cases, providers, modes = bench_settings(metafunc.config)
    params, ids = [], []
    for shape, dtype, variant in cases:  # case order = benchmarks.run's priority order; providers innermost
        for mode in modes:
            for provider in providers:
                params.append((device, shape, dtype, variant, mode, provider))
                ids.append(f"{shape.name}-{dtype}-{variant}-{mode}-{provider}")
    metafunc.parametrize("bench_case", params, ids=ids)


@pytest.fixture(scope="session")
def bench_env(request):
    """Session-wide: thread count, and the copy bandwidth that '% of copy' is measured against."""
    from benchmarks.run import Timer, measure_copy

    args, device, _, _, _ = bench_settings(request.config)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device visible to torch")
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    # Many static shapes per compiled function: lift dynamo's recompile limit so nothing silently runs eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    copy = measure_copy(dev, Timer(dev, args.quick), args.quick)
    return {"device": dev, "quick": args.quick, "copy_gbps": copy["gbps"], "threads": torch.get_num_threads()}
