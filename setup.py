"""Build of fdiv_kernels (metadata lives in pyproject.toml; build and load logic in fdiv_kernels/_build.py).

Default ("jit"): a pure-Python package that ships the C++/CUDA sources (csrc/ -> fdiv_kernels/_csrc); the
kernels compile on first use against the torch that runs, and are cached. Needs no torch to build:

    pip install .            # or: pip install -e .

Ahead of time ("aot"): compile the extension fdiv_kernels._C now, against the torch of the build environment, so
torch must already be installed and build isolation off:

    FDIV_KERNELS_BUILD=aot pip install -e . --no-build-isolation        # CUDA kernels iff torch has CUDA + nvcc
    FDIV_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation     # aot, CUDA kernels or an error (CI)
    FDIV_KERNELS_BUILD=aot FDIV_KERNELS_BUILD_CUDA=0 pip install -e . --no-build-isolation   # CPU kernels only

The build writes <library>.build.json beside the library (torch version, source hash...); at run time a prebuilt
library is used only when that record matches the running torch and the sources, else the kernels are compiled
on first use with a warning.

Environment (aot):
    FDIV_KERNELS_BUILD       "jit" (default) | "aot"  (FDIV_KERNELS_BUILD_CUDA=1 alone implies "aot")
    FDIV_KERNELS_BUILD_CUDA  "auto" (default) | "1" | "0"
    CUDA_HOME                CUDA toolkit; default: the folder above nvcc's bin/ (following wrapper scripts)
    TORCH_CUDA_ARCH_LIST     GPU architectures; default "8.0;9.0" (A100, H100)
    FDIV_KERNELS_CPU_NATIVE  "1": compile the CPU kernels with -march=native (the package then only runs on CPUs
                             like the build machine). Default: portable x86-64 code; the CPU kernels carry an
                             AVX2+FMA+F16C copy chosen at run time when the CPU has it.
    MAX_JOBS                 parallel compile jobs (torch's ninja build)
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_build_helpers():
    """fdiv_kernels/_build.py by path: importing the package would import torch, which a jit build lacks."""
    spec = importlib.util.spec_from_file_location(
        "_fdiv_kernels_build", os.path.join(ROOT, "fdiv_kernels", "_build.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_build_helpers()


def _log(msg: str) -> None:
    print(f"fdiv_kernels setup: {msg}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package as fdiv_kernels/_csrc, for compiling on first use from a wheel.
    (An editable install compiles from csrc/ itself.)"""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = os.path.join(self.build_lib, "fdiv_kernels", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for path in B.source_files(CSRC):
            self.copy_file(path, os.path.join(dest, os.path.basename(path)))


def _decide_cuda(torch) -> tuple[bool, str]:
    """(build CUDA?, why), per FDIV_KERNELS_BUILD_CUDA; raises when "1" cannot be honoured."""
    mode = B.cuda_mode()
    if mode == "0":
        return False, "FDIV_KERNELS_BUILD_CUDA=0"
    force = mode == "1"
    problem = None
    cuda_home = B.find_cuda_home()
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    elif cuda_home is None:
        problem = "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset)"
    elif not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        problem = f"CUDA_HOME={cuda_home} has no bin/nvcc"
    elif not glob.glob(os.path.join(CSRC, "*.cu")):
        problem = "csrc/ has no .cu file"
    if problem is not None:
        if force:
            raise RuntimeError(f"FDIV_KERNELS_BUILD_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        return False, f"FDIV_KERNELS_BUILD_CUDA=auto and {problem}"
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    return True, (
        f"FDIV_KERNELS_BUILD_CUDA={'1' if force else 'auto'}, torch CUDA {torch.version.cuda}, "
        f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') or B.DEFAULT_ARCH_LIST}"
    )


def _aot_extensions():
    """fdiv_kernels._C from every csrc/*.cpp (and csrc/*.cu with CUDA), against the torch installed here."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        raise SystemExit(
            "fdiv_kernels setup: FDIV_KERNELS_BUILD=aot compiles against the torch of the build environment, and "
            "there is none: install torch first and build with `pip install --no-build-isolation ...` (or drop "
            "FDIV_KERNELS_BUILD=aot / FDIV_KERNELS_BUILD_CUDA=1: the default compiles on first use)"
        ) from None
    build_cuda, why = _decide_cuda(torch)
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", B.DEFAULT_ARCH_LIST)
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if B.cpu_native():
        cpu_note = "CPU kernels with -march=native (FDIV_KERNELS_CPU_NATIVE=1; runs only on CPUs like this one)"
    else:
        cpu_note = "portable CPU kernels (baseline + run-time AVX2/FMA/F16C copy)"
    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # noqa: E731  (setuptools wants relative paths)
    kwargs = dict(
        name="fdiv_kernels._C",
        sources=rel(B.sources(CSRC, build_cuda)),
        depends=rel(f for f in B.source_files(CSRC) if f not in B.sources(CSRC, build_cuda)),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": B.cxx_flags()},
        extra_link_args=list(B.LD_FLAGS),
    )
    if build_cuda:
        kwargs["include_dirs"] = [CSRC] + B.nvidia_wheel_includes(torch.version.cuda)
        kwargs["extra_compile_args"]["nvcc"] = list(B.NVCC_FLAGS)
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None

    class BuildExtWithRecord(cpp_extension.BuildExtension):
        """Writes <library>.build.json (torch version, source hash...) beside each library it builds."""

        def build_extension(self, ext):
            super().build_extension(ext)
            library = self.get_ext_fullpath(ext.name)
            B.write_record(library, B.build_record(CSRC, build_cuda, arch_list))
            _log(f"{os.path.basename(library)} built for torch {torch.__version__}")

        def run(self):
            super().run()  # builds into build/, then (in place, editable installs) copies the libraries to the tree
            if not self.inplace:
                return
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:  # the records go along
                fullname = self.get_ext_fullname(ext.name)
                package_dir = build_py.get_package_dir(".".join(fullname.split(".")[:-1]))
                inplace = os.path.join(package_dir, os.path.basename(self.get_ext_filename(fullname)))
                B.write_record(inplace, B.build_record(CSRC, build_cuda, arch_list))

    _log(
        f"ahead-of-time build of fdiv_kernels._C against torch {torch.__version__} "
        f"{'WITH' if build_cuda else 'WITHOUT'} the CUDA kernels ({why}); {cpu_note}"
    )
    return [ext], {"build_ext": BuildExtWithRecord}


if not glob.glob(os.path.join(CSRC, "*.cpp")):
    raise SystemExit(f"fdiv_kernels setup: no C++ sources in {CSRC} (an incomplete sdist?)")

cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if B.build_mode() == "aot":
    ext_modules, ext_cmd = _aot_extensions()
    cmdclass.update(ext_cmd)
else:
    _log(
        "pure-Python build: the C++/CUDA kernels compile on first use against the torch that runs "
        "(FDIV_KERNELS_BUILD=aot with --no-build-isolation compiles them now)"
    )

# The divergence study (fdpo_study/, with 4 MB of base models) belongs to the repository, not to the kernel wheel:
# an editable install (`pip install -e .`, which `make` runs) maps it for `python -m fdpo_study`; wheels and
# sdists leave it out (MANIFEST.in too).
STUDY = ["fdpo_study"] if {"editable_wheel", "develop"} & set(sys.argv) else []

setup(
    packages=find_packages(include=["fdiv_kernels", "fdiv_kernels.*"]) + STUDY,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
