"""Build of fdiv_kernels and its C++/CUDA extension fdiv_kernels._C (metadata lives in pyproject.toml).

    pip install -e . --no-build-isolation                         # CUDA kernels iff torch has CUDA and nvcc is found
    FDIV_KERNELS_BUILD_CUDA=0 pip install -e . --no-build-isolation   # CPU kernels only (fast build)
    FDIV_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation   # CUDA kernels or an error saying why not

Environment:
    FDIV_KERNELS_BUILD_CUDA  "auto" (default) | "1" | "0"
    CUDA_HOME                CUDA toolkit; default: the folder above nvcc's bin/ (following wrapper scripts)
    TORCH_CUDA_ARCH_LIST     GPU architectures; default "8.0;9.0" (A100, H100)
    FDIV_KERNELS_CPU_NATIVE  "1": compile the CPU kernels with -march=native (the package then only runs on CPUs
                             like the build machine). Default: portable x86-64 code; the CPU kernels carry an
                             AVX2+FMA+F16C copy chosen at run time when the CPU has it.
    MAX_JOBS                 parallel compile jobs (torch's ninja build)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
CUDA_SOURCE = os.path.join("csrc", "fdpo_cuda.cu")


def _log(msg: str) -> None:
    print(f"fdiv_kernels setup: {msg}", file=sys.stderr, flush=True)


def _nvcc_real_home(nvcc: str) -> str | None:
    """The toolkit folder of an nvcc executable, following symlinks and wrapper scripts."""
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    try:  # a wrapper script (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`): nvcc itself says where it lives
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            home = os.path.dirname(m.group(1).strip())
            if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
                return home
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _nvcc_real_home(nvcc)
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _nvidia_wheel_includes(cuda_version: str) -> list[str]:
    """Headers of the nvidia-* wheels matching torch's CUDA major version (torch's CUDA headers include
    cusparse.h & co., which pip-installed torch ships there rather than in the toolkit)."""
    import importlib.util

    sub = "cu" + cuda_version.split(".")[0]
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in list(spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(base, sub, "include")
        if os.path.isdir(inc) and inc not in dirs:
            dirs.append(inc)
    return dirs


def _decide_cuda() -> tuple[bool, str]:
    """(build CUDA?, why), per FDIV_KERNELS_BUILD_CUDA; raises when "1" cannot be honoured."""
    mode = os.environ.get("FDIV_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False, "FDIV_KERNELS_BUILD_CUDA=0"
    if mode not in ("1", "true", "yes", "on", "auto", ""):
        raise RuntimeError(f"FDIV_KERNELS_BUILD_CUDA={mode!r}: expected auto, 1 or 0")
    force = mode in ("1", "true", "yes", "on")
    import torch

    problem = None
    cuda_home = _find_cuda_home()
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    elif cuda_home is None:
        problem = "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset)"
    elif not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        problem = f"CUDA_HOME={cuda_home} has no bin/nvcc"
    elif not os.path.isfile(os.path.join(ROOT, CUDA_SOURCE)):
        problem = f"{CUDA_SOURCE} is missing"
    if problem is not None:
        if force:
            raise RuntimeError(f"FDIV_KERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        return False, f"FDIV_KERNELS_BUILD_CUDA=auto and {problem}"
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    return True, (
        f"FDIV_KERNELS_BUILD_CUDA={'1' if force else 'auto'}, torch CUDA {torch.version.cuda}, "
        f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') or '8.0;9.0'}"
    )


def _extensions():
    build_cuda, why = _decide_cuda()
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    if build_cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]

    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
    if os.environ.get("FDIV_KERNELS_CPU_NATIVE", "0") not in ("", "0"):
        cxx.append("-march=native")
        cpu_note = "CPU kernels with -march=native (FDIV_KERNELS_CPU_NATIVE=1; runs only on CPUs like this one)"
    else:
        cpu_note = "portable CPU kernels (baseline + run-time AVX2/FMA/F16C copy)"
    sources = ["csrc/ops.cpp", "csrc/fdpo_cpu.cpp"]
    # The .cu file is listed as a dependency even in CPU-only builds so that an sdist always carries it.
    depends = ["csrc/fdpo_math.h"] + ([CUDA_SOURCE] if os.path.isfile(os.path.join(ROOT, CUDA_SOURCE)) else [])
    kwargs = dict(
        name="fdiv_kernels._C",
        sources=sources,
        depends=depends,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if build_cuda:
        kwargs["sources"] = sources + [CUDA_SOURCE]
        import torch

        kwargs["include_dirs"] = [CSRC] + _nvidia_wheel_includes(torch.version.cuda)
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(**kwargs)
        _log(f"fdiv_kernels._C is built WITH the CUDA kernels ({why}); {cpu_note}")
    else:
        ext = cpp_extension.CppExtension(**kwargs)
        _log(f"fdiv_kernels._C is built WITHOUT the CUDA kernels ({why}); {cpu_note}")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fdiv_kernels", "fdiv_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
