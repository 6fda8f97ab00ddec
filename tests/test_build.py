"""Building and loading the C++ extension (fdiv_kernels/_build.py): the cache key, the prebuilt-library check,
the lock that lets concurrent processes share one build, a damaged cached library, what backend="auto" does when
nothing can be built, and when the loading happens (never at import; under torch.compile, while tracing).

The compile tests use a tiny stand-in source (a Python module with no torch headers: ~1 s to build) or a broken
one, in a copy of the package without any prebuilt library, with their own cache folder. The real kernels are
compiled on first use by `make test` from a fresh clone, and by CI's wheel smoke test (.ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import fdiv_kernels
from fdiv_kernels import _build
from fdiv_kernels.backends import cpp

REPO = Path(__file__).resolve().parent.parent

TINY_MODULE = textwrap.dedent("""
    // A stand-in for csrc/: an empty Python module named _C, like ops.cpp's, without torch headers.
    #include <Python.h>
    extern "C" PyObject* PyInit__C(void) {
      static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
      return PyModule_Create(&def);
    }
""")


def _package_copy(tmp_path: Path, sources: dict[str, str]) -> Path:
    """tmp_path/pkg: fdiv_kernels without any prebuilt library, and csrc/ with the given files."""
    pkg = tmp_path / "pkg"
    shutil.copytree(
        REPO / "fdiv_kernels",
        pkg / "fdiv_kernels",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.build.json", "__pycache__", "_csrc", "assets"),
    )
    (pkg / "csrc").mkdir()
    for name, text in sources.items():
        (pkg / "csrc" / name).write_text(text)
    return pkg


def _env(tmp_path: Path, pkg: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FDIV_KERNELS_", "TORCH_EXTENSIONS_DIR"))}
    env.update(
        PYTHONPATH=str(pkg),
        FDIV_KERNELS_CACHE_DIR=str(tmp_path / "cache"),
        FDIV_KERNELS_BUILD_CUDA="0",
        OMP_NUM_THREADS="1",
        MAX_JOBS="1",
        **extra,
    )
    return env


def _run(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _popen(code: str, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# ------------------------------------------------------------------------------------------- pure functions
def test_cache_key_changes_with_torch_sources_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("FDIV_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FDIV_KERNELS_BUILD_CUDA", "0")
    monkeypatch.delenv("FDIV_KERNELS_CPU_NATIVE", raising=False)
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "a.cpp").write_text("int a;\n")
    base = _build.plan(str(csrc))["directory"]
    assert Path(base).parent == tmp_path / "cache"
    assert f"torch{torch.__version__}" in Path(base).name and sys.implementation.cache_tag in Path(base).name
    assert _build.plan(str(csrc))["directory"] == base  # deterministic

    (csrc / "a.h").write_text("// a header counts too\n")
    with_header = _build.plan(str(csrc))["directory"]
    assert with_header != base
    monkeypatch.setenv("FDIV_KERNELS_CPU_NATIVE", "1")
    assert _build.plan(str(csrc))["directory"] != with_header
    monkeypatch.delenv("FDIV_KERNELS_CPU_NATIVE")
    monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    assert _build.plan(str(csrc))["directory"] != with_header


def test_cache_key_includes_cuda_architectures(tmp_path, monkeypatch):
    monkeypatch.setenv("FDIV_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FDIV_KERNELS_BUILD_CUDA", "1")
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "a.cpp").write_text("int a;\n")
    (csrc / "k.cu").write_text("int k;\n")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    try:
        p80 = _build.plan(str(csrc))
    except _build.BuildError as err:  # a CPU-only torch or no nvcc: FDIV_KERNELS_BUILD_CUDA=1 says why
        assert "FDIV_KERNELS_BUILD_CUDA=1" in str(err)
        pytest.skip(str(err))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    p90 = _build.plan(str(csrc))
    assert p80["with_cuda"] and p90["with_cuda"]
    assert p80["directory"] != p90["directory"] and "cuda8_0" in p80["directory"]
    monkeypatch.setenv("FDIV_KERNELS_BUILD_CUDA", "0")
    cpu = _build.plan(str(csrc))
    assert not cpu["with_cuda"] and cpu["why_no_cuda"] == "FDIV_KERNELS_BUILD_CUDA=0"
    assert "-cpu-" in Path(cpu["directory"]).name


def test_prebuilt_library_is_checked_against_its_build_record(tmp_path, monkeypatch):
    csrc = _build.source_dir()
    if csrc is None:
        pytest.skip("no C++ sources next to the package")
    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    assert _build.prebuilt_problem(str(library)) is None  # no record (built before records existed): tried as is
    record = {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "python": sys.implementation.cache_tag,
        "sources": _build.source_hash(csrc),
    }
    record_path = Path(str(library) + _build.RECORD_SUFFIX)
    record_path.write_text(json.dumps(record))
    assert _build.prebuilt_problem(str(library)) is None
    record_path.write_text(json.dumps({**record, "torch": "2.0.0"}))
    assert _build.prebuilt_problem(str(library)) == f"built for torch 2.0.0, running torch {torch.__version__}"
    record_path.write_text(json.dumps({**record, "sources": "0" * 16}))
    assert "other sources" in _build.prebuilt_problem(str(library))
    record_path.write_text("{not json")
    assert "unreadable" in _build.prebuilt_problem(str(library))


def test_prebuilt_library_is_checked_against_its_recorded_size_and_hash(tmp_path):
    """A library cut short (full disk, killed copy) or changed after its build is refused before it is loaded."""
    csrc = _build.source_dir()
    if csrc is None:
        pytest.skip("no C++ sources next to the package")
    library = tmp_path / "_C.so"
    content = os.urandom(4096)
    library.write_bytes(content)
    _build.write_record(str(library), _build.build_record(csrc, False, None))
    assert _build.prebuilt_problem(str(library)) is None
    library.write_bytes(content[:1000])
    problem = _build.prebuilt_problem(str(library))
    assert "damaged: 1000 bytes, 4096 when it was built" in problem and "delete it" in problem
    library.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    assert "sha256 differs" in _build.prebuilt_problem(str(library))


def test_build_mode_switches(monkeypatch):
    for var in ("FDIV_KERNELS_BUILD", "FDIV_KERNELS_BUILD_CUDA"):
        monkeypatch.delenv(var, raising=False)
    assert _build.build_mode() == "jit"
    monkeypatch.setenv("FDIV_KERNELS_BUILD_CUDA", "1")  # CI's switch: ahead of time, with CUDA
    assert _build.build_mode() == "aot"
    monkeypatch.setenv("FDIV_KERNELS_BUILD", "jit")
    assert _build.build_mode() == "jit"
    monkeypatch.setenv("FDIV_KERNELS_BUILD", "sometimes")
    with pytest.raises(_build.BuildError, match="expected aot or jit"):
        _build.build_mode()


# ------------------------------------------------------------------------------------------- compiling
# The loader alone (fdiv_kernels/_build.py by path), so that nothing else in the package, which expects the real
# kernels' ops, runs against the stand-in library.
LOAD_TINY = """
    import importlib.util, os, sys
    path = os.path.join(os.environ["PYTHONPATH"], "fdiv_kernels", "_build.py")
    spec = importlib.util.spec_from_file_location("fdiv_kernels._build", path)
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    m = b.load()
    assert sys.modules["fdiv_kernels._C"] is m and m.__name__ == "fdiv_kernels._C"
    print("LOADED", b.info()["kind"], m.__file__)
"""


def test_concurrent_processes_share_one_build_then_reuse_it(tmp_path):
    pkg = _package_copy(tmp_path, {"tiny.cpp": TINY_MODULE})
    env = _env(tmp_path, pkg)
    procs = [_popen(LOAD_TINY, env, tmp_path) for _ in range(2)]  # two ranks starting together
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "LOADED jit" in out
    libraries = {out.split()[-1] for out, _ in outs}
    assert len(libraries) == 1 and str(tmp_path / "cache") in libraries.pop()
    stderr = "".join(err for _, err in outs)
    assert stderr.count("fdiv_kernels: compiling the C++ CPU kernels") == 1, stderr  # one build, one message
    assert "done (" in stderr

    again = _run(LOAD_TINY, env, tmp_path)  # a later process: from the cache, silently
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr and "LOADED jit" in again.stdout


DAMAGED_CACHE = """
    import sys, torch
    import fdiv_kernels
    print("IMPORTED", flush=True)
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    ref, target = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    fdiv_kernels.fused_fdpo_loss(pred, ref, target, beta=10.0, backend="torch").backward()
    assert "fdiv_kernels._C" not in sys.modules
    print("TORCH BACKEND RAN", flush=True)
    from fdiv_kernels import _build  # the loader itself: the stand-in library defines none of the ops
    _build.load()
    print("LIBRARY", _build.info()["path"])
"""


def test_damaged_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A truncated library in the cache killed `import fdiv_kernels` with SIGBUS (returncode -7) before its size
    and hash were recorded and checked: now the import does not touch it, backend="torch" runs, and the first
    load says which file is damaged (one line) and rebuilds it under the build lock."""
    pkg = _package_copy(tmp_path, {"tiny.cpp": TINY_MODULE})
    env = _env(tmp_path, pkg)
    built = _run(LOAD_TINY, env, tmp_path)
    assert built.returncode == 0, built.stderr
    library = Path(built.stdout.split()[-1])
    content = library.read_bytes()
    library.write_bytes(content[: len(content) // 2])  # a copy cut short

    res = _run(DAMAGED_CACHE, env, tmp_path)
    assert res.returncode == 0, f"returncode {res.returncode}: {res.stderr}"
    assert "IMPORTED" in res.stdout and "TORCH BACKEND RAN" in res.stdout
    damaged = [ln for ln in res.stderr.splitlines() if " is damaged (" in ln]
    assert len(damaged) == 1 and str(library) in damaged[0], res.stderr
    assert f"{len(content) // 2} bytes, {len(content)} when it was built" in damaged[0]
    assert "rebuilding" in damaged[0] and "compiling the C++ CPU kernels" in res.stderr
    assert f"LIBRARY {library}" in res.stdout and library.stat().st_size == len(content)

    again = _run(LOAD_TINY, env, tmp_path)  # rebuilt and recorded: loaded silently
    assert again.returncode == 0 and "damaged" not in again.stderr and "compiling" not in again.stderr


def test_mismatched_prebuilt_library_is_ignored_with_a_warning(tmp_path):
    pkg = _package_copy(tmp_path, {"tiny.cpp": TINY_MODULE})
    # A "prebuilt" library that would crash the import if it were tried: its record says another torch.
    bogus = pkg / "fdiv_kernels" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    bogus.write_bytes(b"not a library")
    Path(str(bogus) + _build.RECORD_SUFFIX).write_text(json.dumps({"torch": "1.0.0", "sources": "x"}))
    res = _run(LOAD_TINY, _env(tmp_path, pkg), tmp_path)
    assert res.returncode == 0, res.stderr
    assert "LOADED jit" in res.stdout
    assert "ignoring the prebuilt" in res.stderr and "built for torch 1.0.0" in res.stderr
    assert "compiling the C++ CPU kernels" in res.stderr


AUTO_FALLBACK = """
    import warnings, torch
    from fdiv_kernels import fdpo_loss_reference, fused_fdpo_loss
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    ref, target = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = fused_fdpo_loss(pred, ref, target, beta=10.0, divergence="js")
    loss.backward()
    expected = fdpo_loss_reference(pred.detach().double(), ref.double(), target.double(), beta=10.0, divergence="js")
    assert torch.allclose(loss.double(), expected, rtol=1e-5), (loss, expected)
    for w in caught:
        print("WARNING", w.category.__name__, str(w.message).replace(chr(10), " "))
    try:
        fused_fdpo_loss(pred, ref, target, backend="cpu")
        print("CPU BACKEND RAN")
    except RuntimeError as err:
        print("CPU BACKEND ERROR", str(err).replace(chr(10), " "))
"""


@pytest.mark.parametrize("case", ["compile_fails", "jit_disabled"])
def test_auto_warns_and_uses_torch_when_the_kernels_cannot_be_built(tmp_path, case):
    """Never a silently slower path: auto says why (a compile error, or compiling turned off) and that it falls
    back; backend="cpu" raises with the same reason."""
    pkg = _package_copy(tmp_path, {"broken.cpp": "#error deliberately broken source\n"})
    extra = {"FDIV_KERNELS_JIT": "0"} if case == "jit_disabled" else {}
    res = _run(AUTO_FALLBACK, _env(tmp_path, pkg, **extra), tmp_path)
    assert res.returncode == 0, res.stderr
    warnings_ = [ln for ln in res.stdout.splitlines() if ln.startswith("WARNING RuntimeWarning")]
    cpu_error = [ln for ln in res.stdout.splitlines() if ln.startswith("CPU BACKEND ERROR")]
    assert len(cpu_error) == 1, res.stdout
    if case == "compile_fails":
        why = "deliberately broken source"
        assert "fdiv_kernels: compiling the C++ CPU kernels" in res.stderr and " failed" in res.stderr
        assert (tmp_path / "cache").is_dir() and list((tmp_path / "cache").glob("*/build.log"))
    else:
        why = "FDIV_KERNELS_JIT=0"
        assert "compiling" not in res.stderr
    assert any(why in w for w in warnings_), res.stdout  # the warning names the reason ...
    assert any("torch" in w.split(why)[-1] or "PyTorch" in w for w in warnings_), res.stdout  # ... and the fallback
    assert why in cpu_error[0]


def test_cuda_compile_failure_keeps_the_cpu_kernels(tmp_path, monkeypatch):
    """FDIV_KERNELS_BUILD_CUDA=auto: CUDA is opportunistic, so a .cu that fails to compile costs backend='cuda'
    (with a warning naming why), not the CPU kernels; a later run does not pay for the failing compile again."""
    monkeypatch.setenv("FDIV_KERNELS_BUILD_CUDA", "auto")
    monkeypatch.delenv("FDIV_KERNELS_JIT", raising=False)
    cuda_dir, cpu_dir = tmp_path / "cuda", tmp_path / "cpu"
    cuda_dir.mkdir()

    def fake_plan(csrc, why_not_cuda=None):
        if why_not_cuda is None:
            return {"with_cuda": True, "why_no_cuda": None, "directory": str(cuda_dir)}
        return {"with_cuda": False, "why_no_cuda": why_not_cuda, "directory": str(cpu_dir)}

    def fake_jit_load(p):
        if p["with_cuda"]:
            (cuda_dir / "failed.txt").write_text("nvcc: error: unsupported GPU architecture\n")
            raise _build.BuildError("nvcc: error: unsupported GPU architecture")
        return p["why_no_cuda"]

    monkeypatch.setattr(_build, "plan", fake_plan)
    monkeypatch.setattr(_build, "_jit_load", fake_jit_load)
    with pytest.warns(RuntimeWarning, match="CUDA kernels failed to compile.*unsupported GPU architecture"):
        why = _build.jit_load(str(tmp_path))
    assert why.startswith("the CUDA kernels failed to compile")

    calls = []
    monkeypatch.setattr(_build, "_jit_load", lambda p: calls.append(p["with_cuda"]) or p["why_no_cuda"])
    with pytest.warns(RuntimeWarning, match="earlier run"):
        why = _build.jit_load(str(tmp_path))
    assert calls == [False] and "delete" in why  # straight to the CPU build, and how to retry

    monkeypatch.setenv("FDIV_KERNELS_BUILD_CUDA", "1")  # required CUDA: a failure is an error
    monkeypatch.setattr(_build, "_jit_load", fake_jit_load)
    with pytest.raises(_build.BuildError, match="unsupported GPU architecture"):
        _build.jit_load(str(tmp_path))


# ------------------------------------------------------------------------------------------- when loading happens
IMPORT_ONLY = """
    import sys, torch
    import fdiv_kernels
    from fdiv_kernels.backends import cpp
    loaded = [m for m in ("fdiv_kernels._C", "fdiv_kernels._build", "torch.utils.cpp_extension") if m in sys.modules]
    print("LOADED MODULES", loaded, "PROBED", cpp._STATUS)
"""


def test_import_builds_nothing(tmp_path):
    """`import fdiv_kernels` with an empty cache neither compiles (one to three minutes) nor loads nor probes the
    extension: the first call that needs the kernels does (before, the import did)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FDIV_KERNELS_", "TORCH_EXTENSIONS_DIR"))}
    env.update(PYTHONPATH=str(REPO), FDIV_KERNELS_CACHE_DIR=str(tmp_path / "cache"))
    res = _run(IMPORT_ONLY, env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "LOADED MODULES [] PROBED {}" in res.stdout, res.stdout + res.stderr
    assert not (tmp_path / "cache").exists() and "compiling" not in res.stderr


@pytest.fixture
def built_kernels() -> dict:
    """The real kernels built (or found) in this process's cache, for subprocesses that load them from there."""
    why = fdiv_kernels.load()["cpu"]
    if why is not None:
        pytest.skip(f"the C++ extension is unavailable (tests/test_build_present.py says why): {why}")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


COMPILED_FIRST = """
    import sys, torch
    from fdiv_kernels import fused_fdpo_loss
    graphs = []
    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward
    def step(p, ref, target):
        return fused_fdpo_loss(p, ref, target, beta=10.0, divergence="js", backend=BACKEND)
    g = torch.Generator().manual_seed(0)
    pred, ref, target = (torch.randn(4, 3, 5, generator=g) for _ in range(3))
    p_compiled, p_eager = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    assert "fdiv_kernels._C" not in sys.modules
    loss = torch.compile(step, backend=capture, fullgraph=True)(p_compiled, ref, target)  # the first call
    loss.backward()
    assert "fdiv_kernels._C" in sys.modules
    assert any("fdiv_kernels.fdpo_forward.default" in graph for graph in graphs), graphs  # the native op
    expected = step(p_eager, ref, target)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(p_compiled.grad, p_eager.grad)
    print("COMPILED FIRST CALL OK")
"""


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_compiled_first_call_loads_the_kernels_while_tracing(tmp_path, built_kernels, backend):
    """A process whose first call is torch.compile(fullgraph=True) loads the extension while Dynamo traces
    (cpp.eager_under_compile) and traces the native op, with no graph break."""
    res = _run(f"BACKEND = {backend!r}\n" + textwrap.dedent(COMPILED_FIRST), built_kernels, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "COMPILED FIRST CALL OK" in res.stdout


def test_eager_under_compile_is_assume_constant_result():
    """cpp.eager_under_compile sets what torch.compiler.assume_constant_result sets (without importing Dynamo)."""

    def marked_by_torch():
        pass

    def marked_here():
        pass

    torch.compiler.assume_constant_result(marked_by_torch)
    cpp.eager_under_compile(marked_here)
    assert marked_here.__dict__ == marked_by_torch.__dict__ != {}


def test_build_module_runs_without_a_runpy_warning(tmp_path, built_kernels):
    """`python -m fdiv_kernels._build` (make kernels): the package's import no longer imports _build first, which
    made runpy warn about a module found in sys.modules before it ran."""
    res = subprocess.run(
        [sys.executable, "-m", "fdiv_kernels._build"],
        env=built_kernels,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr
    assert "fdiv_kernels: C++ kernels ready for torch" in res.stdout
