"""Build and load the C++/CUDA extension ``fdiv_kernels._C`` (backend="cpu" and backend="cuda").

Where the extension comes from, in order:

1. **Prebuilt** (ahead of time): ``fdiv_kernels/_C*.so`` next to this file, made by
   ``FDIV_KERNELS_BUILD=aot pip install [-e] . --no-build-isolation`` (or ``FDIV_KERNELS_BUILD_CUDA=1 ...``,
   which CI uses). It is used when the record written beside it at build time (``<so>.build.json``) says it was
   built against the running torch from the current sources; otherwise it is ignored with a one-line warning.
2. **Compiled on first use** (the default for ``pip install .``): the sources shipped with the package
   (``fdiv_kernels/_csrc``, or ``csrc/`` of a source checkout) are compiled with ninja through
   ``torch.utils.cpp_extension.load`` against the running torch, once, into a cache folder keyed by torch version,
   Python ABI, source hash, flags and GPU architectures (``$FDIV_KERNELS_CACHE_DIR``, else
   ``$TORCH_EXTENSIONS_DIR/fdiv_kernels``, else ``~/.cache/fdiv_kernels``). A one-line message says so while it
   compiles, and a file lock makes concurrent processes (``accelerate launch`` ranks) wait for one build.

Both records hold the library's size and sha256, checked before it is loaded: a damaged library (a copy cut short
by a full disk or a killed process) would otherwise crash the process with SIGBUS. A damaged cached library is
deleted and rebuilt under the lock, with a one-line message naming it; a damaged prebuilt one is ignored as above.

If both fail, :func:`load` raises :class:`BuildError` saying why; ``backend="auto"`` then warns and uses the eager
PyTorch backend, and ``backend="cpu"``/``"cuda"`` raise with that reason.

Run-time switches: ``FDIV_KERNELS_BUILD_CUDA`` = ``auto`` (default: CUDA kernels when torch has CUDA, a GPU is
visible and nvcc is found) | ``1`` (build them or fail, even without a GPU) | ``0`` (CPU kernels only);
``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs); ``FDIV_KERNELS_CPU_NATIVE=1`` (``-march=native``);
``FDIV_KERNELS_JIT=0`` (never compile at run time); ``MAX_JOBS`` (parallel compile jobs).

``python -m fdiv_kernels._build`` builds (if needed) and prints where the kernels come from, e.g. to prebuild the
cache in a container image. setup.py loads this file by path for the ahead-of-time build, so the module imports
nothing outside the standard library at module level (torch is imported inside the functions that need it).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from types import ModuleType

MODULE = "fdiv_kernels._C"
PKG_DIR = os.path.dirname(os.path.abspath(__file__))
RECORD_SUFFIX = ".build.json"
# Bumped when the way this file builds changes, so that old cache entries are not reused (2: the records hold the
# library's size and sha256).
BUILDER_VERSION = 2

CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
DEFAULT_ARCH_LIST = "8.0;9.0"  # ahead-of-time builds and JIT builds without a visible GPU: A100, H100
SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.h", "*.cuh")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class BuildError(RuntimeError):
    """The extension is neither prebuilt for this torch nor compilable here; the message says why."""


# ------------------------------------------------------------------------------------------- sources and flags
def source_dir() -> str | None:
    """The C++/CUDA sources: shipped in the package (wheels) or csrc/ of a source checkout (editable installs)."""
    for d in (os.path.join(PKG_DIR, "_csrc"), os.path.join(os.path.dirname(PKG_DIR), "csrc")):
        if glob.glob(os.path.join(d, "*.cpp")):
            return d
    return None


def sources(csrc: str, with_cuda: bool) -> list[str]:
    """The translation units: every csrc/*.cpp, and every csrc/*.cu with CUDA."""
    found = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    if with_cuda:
        found += sorted(glob.glob(os.path.join(csrc, "*.cu")))
    return found


def source_files(csrc: str) -> list[str]:
    """Every file the build reads from csrc/ (translation units and headers)."""
    return sorted({f for pattern in SOURCE_PATTERNS for f in glob.glob(os.path.join(csrc, pattern))})


def source_hash(csrc: str) -> str:
    """Hash of the names and contents of every source file (the same for csrc/ and the shipped _csrc/)."""
    h = hashlib.sha256()
    for path in source_files(csrc):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def cpu_native() -> bool:
    return _env("FDIV_KERNELS_CPU_NATIVE", "0") not in ("",) + _FALSE


def cxx_flags() -> list[str]:
    return CXX_FLAGS + (["-march=native"] if cpu_native() else [])


def cuda_mode() -> str:
    """FDIV_KERNELS_BUILD_CUDA normalized to "auto", "1" or "0"."""
    mode = _env("FDIV_KERNELS_BUILD_CUDA", "auto")
    if mode in _FALSE:
        return "0"
    if mode in _TRUE:
        return "1"
    if mode in ("auto", ""):
        return "auto"
    raise BuildError(f"FDIV_KERNELS_BUILD_CUDA={mode!r}: expected auto, 1 or 0")


def build_mode() -> str:
    """What `pip install` does: "aot" (compile fdiv_kernels._C now, against the torch of the build environment) or
    "jit" (ship the sources; compile on first use against the torch that runs). FDIV_KERNELS_BUILD=aot|jit;
    unset: "aot" when FDIV_KERNELS_BUILD_CUDA=1 (the switch CI and earlier instructions use), else "jit"."""
    mode = _env("FDIV_KERNELS_BUILD")
    if mode in ("aot", "jit"):
        return mode
    if mode:
        raise BuildError(f"FDIV_KERNELS_BUILD={mode!r}: expected aot or jit")
    return "aot" if cuda_mode() == "1" else "jit"


def _nvcc_real_home(nvcc: str) -> str | None:
    """The toolkit folder of an nvcc executable, following symlinks and wrapper scripts."""
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    try:  # a wrapper script (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`): nvcc itself says where it lives
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            home = os.path.dirname(m.group(1).strip())
            if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
                return home
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else the toolkit above nvcc's bin/ (following wrappers), else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _nvcc_real_home(nvcc)
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def nvidia_wheel_includes(cuda_version: str | None) -> list[str]:
    """Headers of the nvidia-* wheels matching torch's CUDA major version (torch's CUDA headers include
    cusparse.h & co., which pip-installed torch ships there, e.g. site-packages/nvidia/cu13/include)."""
    if cuda_version is None:  # a CPU-only torch: no CUDA headers to add
        return []
    sub = "cu" + cuda_version.split(".")[0]
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in list(spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(base, sub, "include")
        if os.path.isdir(inc) and inc not in dirs:
            dirs.append(inc)
    return dirs


def build_record(csrc: str, with_cuda: bool, arch_list: str | None) -> dict:
    """What a build was made from; stored beside the library, checked before a prebuilt library is used."""
    import torch

    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "sources": source_hash(csrc),
        "cuda": with_cuda,
        "cuda_arch_list": arch_list if with_cuda else None,
        "cpu_native": cpu_native(),
        "builder": BUILDER_VERSION,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def library_fingerprint(library: str) -> dict:
    """The library's size and sha256, stored in its build record and compared before it is loaded."""
    h = hashlib.sha256()
    with open(library, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"library_size": os.path.getsize(library), "library_sha256": h.hexdigest()}


def library_damage(library: str, record: dict) -> str | None:
    """None if the library is the one its build record describes (or the record predates fingerprints), else how it
    differs. Loading a truncated library maps pages past its end, and touching them kills the process (SIGBUS)."""
    if "library_size" not in record:
        return None
    try:
        size = os.path.getsize(library)
        if size != record["library_size"]:
            return f"{size} bytes, {record['library_size']} when it was built"
        if library_fingerprint(library)["library_sha256"] != record.get("library_sha256"):
            return "its sha256 differs from the one recorded when it was built"
    except OSError as err:
        return f"unreadable: {err}"
    return None


def _write_json(path: str, data: dict) -> None:
    """Write path atomically (readers see the old file or the new one, never a part)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_record(library: str, record: dict) -> str:
    """Store record, with the library's fingerprint, beside an ahead-of-time library as <library>.build.json."""
    path = library + RECORD_SUFFIX
    _write_json(path, {**record, **library_fingerprint(library)})
    return path


# ------------------------------------------------------------------------------------------- loading
_info: dict = {}


def info() -> dict:
    """Where the loaded extension came from: {"kind": "prebuilt"|"jit", "path", "cuda", "why_no_cuda"}, or {}."""
    return dict(_info)


def _say(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load() -> ModuleType:
    """Import ``fdiv_kernels._C`` (registering its ops), prebuilt or compiled on first use; see the module doc.

    Raises BuildError with the reason when neither works. Safe to call repeatedly (returns the loaded module).
    """
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        problem = prebuilt_problem(prebuilt)
        if problem is None:
            try:
                module = _import_library(prebuilt)
                record = _read_json(prebuilt + RECORD_SUFFIX) or {}
                _info.update(
                    kind="prebuilt",
                    path=prebuilt,
                    cuda=record.get("cuda"),
                    why_no_cuda=None if record.get("cuda") else "built ahead of time without CUDA",
                )
                return module
            except (ImportError, OSError) as err:
                problem = f"it fails to load: {err}"
        _warn(
            f"fdiv_kernels: ignoring the prebuilt {prebuilt} ({problem}); "
            "compiling the kernels for the running torch instead"
        )
    return jit_load()


def _prebuilt_library() -> str | None:
    """Path of an ahead-of-time _C library for this Python next to this file (fdiv_kernels/_C.<abi>.so), or None.

    Looked up in this package's folder only, not through the import system: an editable install's finder could
    otherwise hand over another checkout's library."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(PKG_DIR, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def prebuilt_problem(library: str) -> str | None:
    """None if the prebuilt library may be used with the running torch and sources, else why not.

    A library without a record (built before records existed) is tried as it is.
    """
    import torch

    path = library + RECORD_SUFFIX
    if not os.path.isfile(path):
        return None
    record = _read_json(path)
    if record is None:
        return f"its build record {os.path.basename(path)} is unreadable"
    damage = library_damage(library, record)
    if damage is not None:
        return (
            f"it is damaged: {damage}; delete it, or rebuild it with "
            "`FDIV_KERNELS_BUILD=aot pip install -e . --no-build-isolation`"
        )
    if record.get("torch") != torch.__version__:
        return f"built for torch {record.get('torch')}, running torch {torch.__version__}"
    git = getattr(torch.version, "git_version", None)
    if record.get("torch_git") and git and record["torch_git"] != git:
        return f"built for another torch {torch.__version__} build (git {record['torch_git'][:10]}, running {git[:10]})"
    if record.get("python") not in (None, sys.implementation.cache_tag):
        return f"built for {record.get('python')}, running {sys.implementation.cache_tag}"
    csrc = source_dir()
    if csrc is not None and record.get("sources") not in (None, source_hash(csrc)):
        return f"built from other sources than {csrc} (edited since it was built?)"
    return None


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def cache_root() -> str:
    if os.environ.get("FDIV_KERNELS_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["FDIV_KERNELS_CACHE_DIR"]))
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.path.join(os.path.abspath(os.path.expanduser(os.environ["TORCH_EXTENSIONS_DIR"])), "fdiv_kernels")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fdiv_kernels")


def _visible_arch_list() -> str:
    """The visible GPUs' architectures as TORCH_CUDA_ARCH_LIST (PTX of the newest), else the default list."""
    import torch

    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if not caps:
        return DEFAULT_ARCH_LIST
    return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"


def plan(csrc: str, why_not_cuda: str | None = None) -> dict:
    """What a JIT build here would compile: CUDA or not (and why not), architectures, flags, the cache key.
    ``why_not_cuda`` forces a CPU-only build, for that reason."""
    import torch

    mode = cuda_mode()
    why_no_cuda = None
    cuda_home = None
    if why_not_cuda is not None:
        why_no_cuda = why_not_cuda
    elif mode == "0":
        why_no_cuda = "FDIV_KERNELS_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU-only build"
    elif mode == "auto" and not torch.cuda.is_available():
        why_no_cuda = "no CUDA device is visible"
    elif not glob.glob(os.path.join(csrc, "*.cu")):
        why_no_cuda = f"no .cu sources in {csrc}"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            why_no_cuda = "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset)"
        elif not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
            why_no_cuda = f"CUDA_HOME={cuda_home} has no bin/nvcc"
    with_cuda = why_no_cuda is None
    if mode == "1" and not with_cuda:
        raise BuildError(f"FDIV_KERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why_no_cuda}")
    arch_list = None
    includes = [csrc]
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or (
            _visible_arch_list() if torch.cuda.is_available() else DEFAULT_ARCH_LIST
        )
        includes += nvidia_wheel_includes(torch.version.cuda)
    config = {
        "builder": BUILDER_VERSION,
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "python": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "sources": source_hash(csrc),
        "cxx": cxx_flags(),
        "ld": LD_FLAGS,
        "nvcc": NVCC_FLAGS if with_cuda else None,
        "arch": arch_list,
        # -march=native code runs only on CPUs like the build machine: key it by the CPU model.
        "cpu": _cpu_model() if cpu_native() else None,
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    device = "cuda" + re.sub(r"[^0-9a-zA-Z]+", "_", arch_list) if arch_list is not None else "cpu"
    name = re.sub(r"[^0-9A-Za-z.+_-]", "_", f"torch{torch.__version__}-{sys.implementation.cache_tag}-{device}")
    return {
        "csrc": csrc,
        "with_cuda": with_cuda,
        "why_no_cuda": why_no_cuda,
        "cuda_home": cuda_home,
        "arch_list": arch_list,
        "include_dirs": includes,
        "directory": os.path.join(cache_root(), f"{name}-{digest}"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _locked(directory: str):
    """An exclusive advisory lock on directory/build.lock, released by the OS if the holder dies."""
    os.makedirs(directory, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock in cpp_extension.load still serializes the build
        yield
        return
    with open(os.path.join(directory, "build.lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(f"fdiv_kernels: another process is compiling the kernels; waiting for it ({directory})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _import_library(path: str) -> ModuleType:
    """Import a compiled library as fdiv_kernels._C, exactly as `import fdiv_kernels._C` would (its PyInit__C
    runs and its static initializers register the ops)."""
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(MODULE, None)
        raise
    package = sys.modules.get("fdiv_kernels")
    if package is not None:
        package._C = module  # type: ignore[attr-defined]  # the extension, set on the package when loaded
    return module


def jit_load(csrc: str | None = None) -> ModuleType:
    """The extension compiled on first use for the running torch (cached), imported as fdiv_kernels._C."""
    if _env("FDIV_KERNELS_JIT", "1") in _FALSE:
        raise BuildError(
            "the C++ extension is not built and FDIV_KERNELS_JIT=0 turns off compiling it on first use (build it "
            "ahead of time: FDIV_KERNELS_BUILD=aot pip install --no-build-isolation .)"
        )
    csrc = csrc or source_dir()
    if csrc is None:
        raise BuildError(
            f"no C++ sources found (neither {os.path.join(PKG_DIR, '_csrc')} nor a source checkout's "
            "csrc/): a broken install?"
        )
    p = plan(csrc)
    failed = os.path.join(p["directory"], "failed.txt")
    if (
        p["with_cuda"]
        and cuda_mode() == "auto"
        and os.path.isfile(failed)
        and _cached_library(os.path.join(p["directory"], "build.json")) is None
    ):
        # An earlier process could not compile the CUDA kernels here: do not pay minutes to fail again each run.
        with open(failed) as f:
            why = f"the CUDA kernels failed to compile in an earlier run ({f.read().strip()}; delete {failed} to retry)"
        _warn(f"fdiv_kernels: {why}; using the CPU kernels alone (backend='cuda' is unavailable)")
        return _jit_load(plan(csrc, why_not_cuda=why))
    try:
        return _jit_load(p)
    except BuildError as err:
        if not p["with_cuda"] or cuda_mode() == "1":
            raise
        # CUDA was only opportunistic (FDIV_KERNELS_BUILD_CUDA=auto): keep the CPU kernels, say why CUDA is missing.
        why = f"the CUDA kernels failed to compile: {err}"
        _warn(f"fdiv_kernels: {why}; building the CPU kernels alone (backend='cuda' is unavailable)")
        return _jit_load(plan(csrc, why_not_cuda=why))


def _jit_load(p: dict) -> ModuleType:
    directory = p["directory"]
    record_path = os.path.join(directory, "build.json")
    failed_path = os.path.join(directory, "failed.txt")
    library = _cached_library(record_path)
    if library is None:
        asked = time.time()
        try:
            with _locked(directory):
                library = _cached_library(record_path)
                if library is None:
                    # A build that failed while this process waited for the lock (another rank's): same answer.
                    if os.path.isfile(failed_path) and os.path.getmtime(failed_path) >= asked - 1:
                        with open(failed_path) as f:
                            raise BuildError(f.read().strip())
                    _remove_damaged(record_path)
                    library = _compile(p, record_path, failed_path)
        except OSError as err:  # e.g. a read-only cache folder
            damaged = _damaged_library(record_path)
            also = f"; the cached {damaged[0]} is damaged ({damaged[1]}): delete it" if damaged else ""
            raise BuildError(
                f"cannot build in {directory}: {err} (set FDIV_KERNELS_CACHE_DIR to a writable folder){also}"
            ) from err
    module = _import_library(library)
    _info.update(kind="jit", path=library, cuda=p["with_cuda"], why_no_cuda=p["why_no_cuda"])
    return module


def _recorded_library(record_path: str) -> tuple[str, dict] | None:
    """The library a finished JIT build recorded in build.json (path and record), if that file exists."""
    record = _read_json(record_path) or {}
    if not record.get("library"):
        return None
    path = os.path.join(os.path.dirname(record_path), record["library"])
    return (path, record) if os.path.isfile(path) else None


def _cached_library(record_path: str) -> str | None:
    """The cached library of a finished build, if it is intact; checked before loading, not after a crash."""
    found = _recorded_library(record_path)
    return found[0] if found and library_damage(*found) is None else None


def _damaged_library(record_path: str) -> tuple[str, str] | None:
    """(path, how it is damaged) for a cached library that differs from its build record, else None."""
    found = _recorded_library(record_path)
    damage = library_damage(*found) if found else None
    return (found[0], damage) if found and damage else None


def _remove_damaged(record_path: str) -> None:
    """Delete a damaged cached library and its record (under the build lock), so that the build relinks it: its
    objects are usually intact, and ninja would take a damaged library that is newer than them as up to date."""
    damaged = _damaged_library(record_path)
    if damaged:
        _say(f"fdiv_kernels: the cached {damaged[0]} is damaged ({damaged[1]}); deleting it and rebuilding it")
        for path in (damaged[0], record_path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _ensure_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv used without activating it has the ninja wheel's binary off PATH."""
    if shutil.which("ninja"):
        return
    candidates = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package (a dependency of fdiv_kernels)

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _first_error(text: str) -> str:
    """The first compiler diagnostic of a failed build (`file:line:col: error: ...`), else its first error line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"(fatal )?error( [A-Z]+\d+)?:", r"\berror\b"):
        for ln in lines:
            if re.search(pattern, ln, re.IGNORECASE) and not ln.startswith(
                ("FAILED", "ninja: build stopped", "Error building extension")
            ):
                return ln[:300]
    return (lines[0] if lines else "no output")[:300]


def _import_cpp_extension():
    """torch.utils.cpp_extension, without the warning it logs at import on machines without a GPU ("No CUDA
    runtime is found, using CUDA_HOME=...": true, and irrelevant to a CPU build)."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _compile(p: dict, record_path: str, failed_path: str) -> str:
    import torch

    cpp_extension = _import_cpp_extension()

    directory = p["directory"]
    what = "C++ CPU and CUDA kernels" if p["with_cuda"] else "C++ CPU kernels"
    about = "a few minutes" if p["with_cuda"] else "about a minute"
    _say(
        f"fdiv_kernels: compiling the {what} for torch {torch.__version__} on first use ({about}, once per torch "
        f"version; cache {directory}) ...",
        end="",
    )
    t0 = time.perf_counter()
    saved = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME")}
    _ensure_ninja_on_path()
    try:
        if p["with_cuda"]:
            os.environ["TORCH_CUDA_ARCH_LIST"] = p["arch_list"]
            os.environ["CUDA_HOME"] = p["cuda_home"]
            cpp_extension.CUDA_HOME = p["cuda_home"]  # read at import of cpp_extension, before CUDA_HOME was set
        with contextlib.suppress(OSError):
            os.remove(failed_path)
        library = cpp_extension.load(
            name="_C",
            sources=sources(p["csrc"], p["with_cuda"]),
            extra_cflags=cxx_flags(),
            extra_cuda_cflags=NVCC_FLAGS,
            extra_ldflags=LD_FLAGS,
            extra_include_paths=p["include_dirs"],
            build_directory=directory,
            with_cuda=p["with_cuda"],
            is_python_module=False,  # registers the ops (dlopen); _import_library makes the module object
            verbose=False,
        )
    except Exception as err:
        log = os.path.join(directory, "build.log")
        text = f"{type(err).__name__}: {err}"
        with contextlib.suppress(OSError), open(log, "w") as f:
            f.write(text + "\n")
        _say(" failed")
        message = (
            f"compiling the {what} for torch {torch.__version__} failed ({_first_error(str(err))}; full log: {log})"
        )
        with contextlib.suppress(OSError), open(failed_path, "w") as f:
            f.write(message + "\n")
        raise BuildError(message) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    record = build_record(p["csrc"], p["with_cuda"], p["arch_list"])
    record["library"] = os.path.basename(library)
    record["why_no_cuda"] = p["why_no_cuda"]
    record.update(library_fingerprint(library))
    _write_json(record_path, record)  # the "done" marker: written last
    _say(f" done ({time.perf_counter() - t0:.0f} s)")
    return library


def main(argv: list[str] | None = None) -> int:
    """python -m fdiv_kernels._build: build the kernels now if needed and say where they come from."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fdiv_kernels._build", description=main.__doc__)
    ap.parse_args(argv)
    import torch

    import fdiv_kernels._build as b  # the package's copy (this file may be running as __main__)

    try:
        b.load()
    except BuildError as err:
        print(f"fdiv_kernels: the C++ kernels are unavailable: {err}", file=sys.stderr)
        return 1
    i = b.info()
    if i.get("cuda") is None:
        cuda = "CUDA kernels unknown (a prebuilt library without a build record)"
    else:
        cuda = "with CUDA kernels" if i["cuda"] else f"CPU only ({i.get('why_no_cuda') or 'built without CUDA'})"
    print(f"fdiv_kernels: C++ kernels ready for torch {torch.__version__}, {cuda}: {i.get('kind')} {i.get('path')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
