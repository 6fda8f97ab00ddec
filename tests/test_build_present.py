"""The C++ extension must load: without it every cpu-backend test would only skip and the suite would stay green.

Set FDIV_KERNELS_TESTS_ALLOW_MISSING_BUILD=1 to run the suite deliberately without the build (a pure-Python
checkout); then this test skips, saying why the extension is missing (tests/README.md).
"""

import os

import pytest

import fdiv_kernels


def test_cpp_extension_loads():
    why = fdiv_kernels.load()["cpu"]  # loads it (compiling it on first use): the import does not
    if why is not None and os.environ.get("FDIV_KERNELS_TESTS_ALLOW_MISSING_BUILD", "0") not in ("", "0"):
        pytest.skip(f"FDIV_KERNELS_TESTS_ALLOW_MISSING_BUILD is set; the C++ extension is unavailable: {why}")
    assert why is None, (
        f"the C++ extension fdiv_kernels._C is unavailable, so every backend='cpu' test would skip: {why}. "
        "Build it (pip install -e . --no-build-isolation), or set FDIV_KERNELS_TESTS_ALLOW_MISSING_BUILD=1 to run "
        "the suite without it on purpose."
    )
