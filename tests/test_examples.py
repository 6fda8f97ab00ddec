"""examples/ run end to end with their quick settings (each as a user would: a fresh Python process)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("TRITON_INTERPRET", None)  # the examples do not need the Triton interpreter
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=EXAMPLES.parent,
    )


def _check(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    # Never the silent slow path: the examples must run on a fused kernel, not auto's eager fallback.
    assert "uses the eager PyTorch backend" not in res.stderr, res.stderr


def test_train_step_example():
    res = _run("train_step.py")
    _check(res)
    assert res.stdout.count("implicit_acc") == 3 and res.stdout.rstrip().endswith("done")


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers (the train extra)")
def test_diffusers_dropin_example():
    res = _run("diffusers_dropin.py")
    _check(res)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2 and all("implicit_acc" in ln and "raw_model_loss" in ln for ln in lines), res.stdout


def test_microbenchmark_example():
    res = _run("microbenchmark.py")
    _check(res)
    assert "fused_fdpo_loss:" in res.stdout and "x eager" in res.stdout, res.stdout
