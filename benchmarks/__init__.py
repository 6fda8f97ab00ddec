"""Microbenchmarks of fdiv_kernels against the eager diffusers-style loss and torch.compile.

Run ``python -m benchmarks.run --device cpu|cuda`` (see README, "Benchmarks"); ``python -m benchmarks.report``
regenerates the markdown tables and plots from the JSON results in ``benchmarks/results/``.
"""
