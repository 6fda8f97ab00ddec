"""Static speed gate: what the compiled kernels look like, checked without a GPU.

Compiles csrc/fdpo_cuda.cu for sm_90 (and sm_100 where the toolkit can) with the flags the build uses, and the
Triton kernels for GPUTarget("cuda", 90, 32) with the launcher's specializations; reads registers and spills
(``cuobjdump -res-usage``) and the hot loops (``cuobjdump -sass``), and asserts per kernel the invariants the
kernels' speed rests on:

* no local memory (no spills, no local arrays): LOCAL == 0 and STACK == 0;
* a register budget that keeps the intended resident blocks per SM (the CUDA forward's ``__launch_bounds__(256,
  3)``: >= 3 blocks; the CUDA backward >= 2; Triton kernels a floor of warps per SM);
* every vectorized hot loop reads with 128-bit loads only (``LDG.E.128``), exactly as many as the tensors' bytes per
  iteration need (two per fp32 tensor and one per 16-bit tensor for 8 elements: the mixed-dtype kernels included),
  into distinct registers (all of an iteration's loads can be in flight together);
* every vectorized backward stores with 128-bit stores only, the CUDA one as streaming ``STG.E.EF.128``;
* the mixed-dtype combinations trainers pass have their vectorized kernels (none sent to the scalar generic one).

It asserts invariants (widths, counts, spills, budgets), not instruction totals, which move with every ptxas.
The toolchain is pinned (PINNED below): other versions get a warning (``--strict``: a refusal), since ptxas
versions disagree on registers and spills. Prints, and with ``--out`` writes, a table of registers, blocks/SM,
instructions per 16 B and bytes in flight per SM. Exit status 1 on any violation, one line each.

    python -m benchmarks.static_gate                          # both arches + Triton (76 s on this 2-core VM)
    python -m benchmarks.static_gate --arch 90 --no-triton    # one arch while iterating
    python -m benchmarks.static_gate --out benchmarks/results/static_gate.md
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCE = os.path.join(REPO, "csrc", "fdpo_cuda.cu")

# The toolchain the invariants were checked with (nvcc 13.0.88's ptxas, Triton 3.8.0's ptxas for Triton kernels).
PINNED = {"nvcc": "13.0", "triton": "3.8."}

# sm_90 / sm_100 per-SM limits (CUDA occupancy calculator): registers, warps, blocks, shared memory.
SM_REGS, SM_WARPS, SM_BLOCKS, SM_SMEM = 65536, 64, 32, 228 * 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

THREADS = 256  # the CUDA kernels' block size (kThreads in fdpo_cuda.cu)
# CUDA: blocks of 256 per SM the register budget must keep (the forward: fwd_min_blocks() in fdpo_cuda.cu)
MIN_BLOCKS = {"forward": 3, "backward": 2}
TRITON_MIN_WARPS = 16  # Triton: warps per SM the register budget must keep (the latency the kernels must hide)

SIZE = {"float": 4, "c10::Half": 2, "c10::BFloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}
SHORT = {"float": "f32", "c10::Half": "f16", "c10::BFloat16": "bf16"}

# (pred, ref, target) storage mixes that must have vectorized CUDA kernels (fdpo::mixed_storage_switch).
MIXED_COMBOS = [("float", "float", "c10::BFloat16"), ("float", "c10::BFloat16", "c10::BFloat16"),
                ("float", "float", "c10::Half"), ("float", "c10::Half", "c10::Half")]  # fmt: skip


# --------------------------------------------------------------------------------------------------- toolchain
def _module(name: str):
    """fdiv_kernels._build or fdiv_kernels.backends.<name> loaded from this checkout WITHOUT importing the package
    (whose import loads, and when csrc/ changed compiles, the C++ extension: minutes the gate does not need)."""
    pkg = "_static_gate_fdiv_kernels"
    if pkg not in sys.modules:
        mod = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(pkg, None, is_package=True))
        mod.__path__ = [os.path.join(REPO, "fdiv_kernels")]
        sys.modules[pkg] = mod
        sub = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(pkg + ".backends", None, is_package=True))
        sub.__path__ = [os.path.join(REPO, "fdiv_kernels", "backends")]
        sys.modules[pkg + ".backends"] = sub
    return importlib.import_module(f"{pkg}.{name}")


def _tool(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""


def find_cuda_home() -> str:
    home = _module("_build").find_cuda_home()
    if not home or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        raise SystemExit("static_gate: no CUDA toolkit (nvcc on PATH or CUDA_HOME) to compile csrc/fdpo_cuda.cu")
    return home


def find_cuobjdump(cuda_home: str) -> str:
    """The toolkit's cuobjdump, else the one bundled in the Triton wheel (triton/backends/nvidia/bin)."""
    own = os.path.join(cuda_home, "bin", "cuobjdump")
    if os.path.isfile(own):
        return own
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(bundled):
        return bundled
    raise SystemExit("static_gate: no cuobjdump (neither in CUDA_HOME/bin nor in triton/backends/nvidia/bin)")


def _version(text: str) -> str:
    m = re.search(r"release (\d+\.\d+), V([\d.]+)", text) or re.search(r"V([\d.]+)", text)
    return m.group(m.lastindex) if m else "?"


def toolchain(cuda_home: str, cuobjdump: str) -> dict:
    import torch
    import triton

    return {
        "nvcc": _version(_tool([os.path.join(cuda_home, "bin", "nvcc"), "--version"])),
        "ptxas": _version(_tool([os.path.join(cuda_home, "bin", "ptxas"), "--version"])),
        "cuobjdump": _version(_tool([cuobjdump, "--version"])),
        "triton": triton.__version__,
        "torch": torch.__version__,
    }


def check_pins(versions: dict, strict: bool) -> None:
    off = [f"{k} {versions[k]} (pinned {v}*)" for k, v in PINNED.items() if not versions[k].startswith(v)]
    if off:
        msg = "static_gate: toolchain differs from the pinned one: " + ", ".join(off)
        if strict:
            raise SystemExit(msg + "; --strict refuses (register and spill counts differ between ptxas versions)")
        print("WARNING " + msg + "; register budgets may move", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ CUDA build
def nvcc_command(cuda_home: str, arch: str, out: str) -> list[str]:
    """The build's nvcc flags (fdiv_kernels._build.NVCC_FLAGS + torch's), for one arch, as a cubin."""
    import torch
    from torch.utils import cpp_extension

    _build = _module("_build")

    includes = cpp_extension.include_paths("cuda") + _build.nvidia_wheel_includes(torch.version.cuda or "13")
    flags = list(dict.fromkeys(cpp_extension.COMMON_NVCC_FLAGS + _build.NVCC_FLAGS))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (
        [os.path.join(cuda_home, "bin", "nvcc"), "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        + flags
        + ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        + ["-std=c++20", "-I" + os.path.join(REPO, "csrc")]
        + ["-I" + d for d in includes]
        + ["-o", out, CU_SOURCE]
    )


def arch_supported(cuda_home: str, arch: str) -> bool:
    out = _tool([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-code"])
    return f"sm_{arch}" in out.split()


def compile_cubin(cuda_home: str, arch: str, workdir: str) -> str:
    out = os.path.join(workdir, f"fdpo_cuda_sm{arch}.cubin")
    proc = subprocess.run(nvcc_command(cuda_home, arch, out), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"static_gate: nvcc failed for sm_{arch}:\n{proc.stderr[-4000:]}")
    return out


# ------------------------------------------------------------------------------------------------- SASS model
@dataclass
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. LDG.E.128
    text: str
    pred_guard: bool


@dataclass
class Function:
    mangled: str
    name: str = ""
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    instrs: list[Instr] = field(default_factory=list)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def read_cubin(cuobjdump: str, cubin: str) -> dict[str, Function]:
    funcs: dict[str, Function] = {}
    res = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    for m in re.finditer(r"Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res):
        funcs[m.group(1)] = Function(m.group(1), regs=int(m.group(2)), stack=int(m.group(3)),
                                     shared=int(m.group(4)), local=int(m.group(5)))  # fmt: skip
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = funcs.setdefault(m.group(1), Function(m.group(1)))
            continue
        m = _INSTR.search(line)
        if m and current is not None:
            current.instrs.append(Instr(int(m.group(1), 16), m.group(3), m.group(3) + m.group(4), bool(m.group(2))))
    if funcs:
        names = subprocess.run(["c++filt"], input="\n".join(funcs), capture_output=True, text=True).stdout.split("\n")
        for f, n in zip(funcs.values(), names):
            f.name = n
    return funcs


def loops(f: Function) -> list[list[Instr]]:
    """The bodies of the backward branches (BRA to an earlier address), innermost first."""
    by_addr = {ins.addr: i for i, ins in enumerate(f.instrs)}
    found = []
    for i, ins in enumerate(f.instrs):
        if ins.op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", ins.text)
            if m and int(m.group(1), 16) < ins.addr and int(m.group(1), 16) in by_addr:
                found.append(f.instrs[by_addr[int(m.group(1), 16)] : i + 1])
    return sorted(found, key=len)


def is_load(ins: Instr) -> bool:
    return ins.op.startswith("LDG") and ".STRONG" not in ins.op  # __ldcg partial reads of the tail are STRONG


def width(ins: Instr) -> int:
    m = re.search(r"\.(64|128|U8|S8|U16|S16)\b", ins.op)
    return {"64": 64, "128": 128, "U8": 8, "S8": 8, "U16": 16, "S16": 16}[m.group(1)] if m else 32


def dest_regs(ins: Instr) -> set[int]:
    m = re.match(r"\S+\s+R(\d+)", ins.text)
    return set(range(int(m.group(1)), int(m.group(1)) + max(1, width(ins) // 32))) if m else set()


def hot_loop(f: Function) -> list[Instr] | None:
    """The streaming loop: the first loop (in code order, innermost) with global loads; the forward's tail loops
    (combine, per-pair head) come after it. None if there is none."""
    candidates = [body for body in loops(f) if any(is_load(i) for i in body)]
    return min(candidates, key=lambda b: (b[0].addr, len(b))) if candidates else None


def blocks_per_sm(regs: int, threads: int, smem: int = 0) -> int:
    warps = threads // 32
    per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (SM_REGS // per_warp) // warps
    by_smem = SM_SMEM // smem if smem else SM_BLOCKS
    return min(by_regs, SM_WARPS // warps, SM_BLOCKS, by_smem)


# ------------------------------------------------------------------------------------------------- the checks
@dataclass
class Row:
    arch: str
    kernel: str
    variant: str
    regs: int
    blocks: int
    warps_per_sm: int
    loads: str
    stores: str
    instr_per_16b: float | None
    inflight_kb: float | None
    groups: int = 0


def template_args(name: str) -> list[str]:
    inner = name[name.index("<") + 1 : name.rindex(">")]
    out, depth, cur = [], 0, ""
    for ch in inner:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def packs(type_name: str, vec: int) -> int:
    """16-byte loads per row of one tensor of `type_name` for `vec` elements."""
    return max(1, vec * SIZE[type_name] // 16)


def _opcount(instrs: list[Instr]) -> str:
    counts: dict[str, int] = {}
    for i in instrs:
        counts[i.op] = counts.get(i.op, 0) + 1
    return " ".join(f"{n}x{op}" for op, n in sorted(counts.items())) or "-"


def check_loop_loads(
    where: str, body: list[Instr] | None, expected: int, errors: list[str], strict_issue: bool = True
) -> tuple[list[Instr], int]:
    """The hot loop reads with exactly `expected` 128-bit loads, and (strict_issue) into distinct registers, so that
    they are all in flight together; returns the loads and the number of serialized groups they go out in."""
    if body is None:
        errors.append(f"{where}: no streaming loop found in the SASS")
        return [], 0
    lds = [i for i in body if is_load(i)]
    narrow = [i.op for i in lds if width(i) != 128]
    if narrow:
        errors.append(f"{where}: hot loop has narrow loads {_opcount([i for i in lds if width(i) != 128])}")
    if len(lds) != expected:
        errors.append(f"{where}: hot loop has {len(lds)} global loads, expected {expected} x LDG.E.128")
    groups, seen = 1, set()
    for i in lds:  # a load into registers an earlier load of the iteration filled waits for that one's data
        if dest_regs(i) & seen:
            groups, seen = groups + 1, set()
        seen |= dest_regs(i)
    if groups > 1 and strict_issue:
        errors.append(f"{where}: the loop's loads go out in {groups} serialized groups (destination registers "
                      "reused): they cannot all be in flight together")  # fmt: skip
    return lds, groups


def check_cuda(arch: str, funcs: dict[str, Function], errors: list[str]) -> list[Row]:
    rows, have = [], set()
    for f in funcs.values():
        base = re.sub(r"^void ", "", f.name.replace("(anonymous namespace)::", ""))
        where = f"sm_{arch} {base.split('(')[0]}"
        if f.local or f.stack:
            errors.append(f"{where}: local memory (LOCAL {f.local}, STACK {f.stack}): spills or a local array")
        if not base.startswith("fdpo_"):
            continue
        kind = "forward" if base.startswith("fdpo_forward") else "backward"
        blocks = blocks_per_sm(f.regs, THREADS, f.shared)
        args = template_args(base.split("(")[0])
        budget = _min_blocks(base, kind, args)
        if blocks < budget:
            errors.append(f"{where}: {f.regs} registers allow {blocks} blocks/SM, the budget is {budget}")
        variant, loads, stores, ipb, inflight = ",".join(SHORT.get(a, a) for a in args), [], [], None, None
        groups = 0
        if base.startswith("fdpo_forward_kernel<"):
            tp, tr, tt, tm, vec, ref, mask, cross = args
            vec, ref, mask, cross = int(vec), ref == "true", mask == "true", cross == "true"
            variant = f"{SHORT[tp]}/{SHORT[tr] if ref else 'ref_err'}/{SHORT[tt]}{'+mask' if mask else ''} x{vec}"
            variant += "+cross" if cross else ""
            if vec > 1:
                have.add(("fwd", tp, tr if ref else None, tt, ref, mask, cross))
                expected = 2 * (packs(tp, vec) + ref * packs(tr, vec) + packs(tt, vec) + mask * packs(tm, vec))
                body = hot_loop(f)
                loads, groups = check_loop_loads(where, body, expected, errors)
                nbytes = sum(width(i) // 8 for i in loads)
                if nbytes:
                    ipb, inflight = len(body) / (nbytes / 16), blocks * THREADS * nbytes / 1024
        elif base.startswith("fdpo_backward_kernel<"):
            tp, tt, tm, vec, mask = args
            vec, mask = int(vec), mask == "true"
            variant = f"{SHORT[tp]}/{SHORT[tt]}{'+mask' if mask else ''} x{vec}"
            if vec > 1:
                have.add(("bwd", tp, tt, mask))
                iters = -(-4 * 16 // SIZE[tp] // vec)  # bwd_iters<TP, VEC>() in fdpo_cuda.cu
                loads = [i for i in f.instrs if is_load(i) and width(i) == 128]
                narrow = [i for i in f.instrs if is_load(i) and width(i) != 128]
                stores = [i for i in f.instrs if i.op.startswith("STG")]
                want_loads = iters * (packs(tp, vec) + packs(tt, vec) + mask * packs(tm, vec))
                want_stores = iters * packs(tp, vec)
                if len(loads) != want_loads or len(narrow) > 2:  # 2 narrow: coef[row] and G
                    errors.append(f"{where}: loads {_opcount(loads + narrow)}, expected {want_loads} x LDG.E.128 "
                                  "(+ 2 scalar)")  # fmt: skip
                bad = [i for i in stores if width(i) != 128 or ".EF" not in i.op]
                if bad or len(stores) != want_stores:
                    errors.append(f"{where}: stores {_opcount(stores)}, expected {want_stores} x STG.E.EF.128")
                nbytes = sum(width(i) // 8 for i in loads)
                ipb, inflight, groups = len(f.instrs) / (nbytes / 16), blocks * THREADS * nbytes / 1024, 1
        rows.append(Row(arch, base.split("<")[0], variant, f.regs, blocks, blocks * THREADS // 32,
                        _opcount(loads), _opcount(stores), ipb, inflight, groups))  # fmt: skip
    _check_vectorized_coverage(arch, have, errors)
    return rows


def _min_blocks(base: str, kind: str, args: list[str]) -> int:
    """The blocks/SM budget of one kernel: MIN_BLOCKS[kind], except a forward kernel's own fwd_min_blocks()."""
    if not base.startswith("fdpo_forward_kernel<"):
        return MIN_BLOCKS[kind]
    # fwd_min_blocks(): 2 if masked and 10+ vectors a thread (the cross-term variants keep their base's budget)
    tp, tr, tt, tm, vec, ref, mask, _cross = args
    nbytes = int(vec) * (2 * SIZE[tp] + 2 * SIZE[tt] + 2 * SIZE[tr] * (ref == "true") + 2 * SIZE[tm] * (mask == "true"))
    return 2 if mask == "true" and nbytes >= 10 * 16 else 3


def _check_vectorized_coverage(arch: str, have: set, errors: list[str]) -> None:
    """Every same-dtype and mixed combination keeps its vectorized kernels (`have`: those check_cuda found), the
    unmasked forwards also their cross-term (SDPO) variants."""
    wanted = []
    for t in ("float", "c10::Half", "c10::BFloat16"):
        for ref in (True, False):
            for mask in (True, False):
                wanted += [("fwd", t, t if ref else None, t, ref, mask, cross) for cross in (False, not mask)]
        wanted += [("bwd", t, t, mask) for mask in (True, False)]
    for tp, tr, tt in MIXED_COMBOS:
        for mask in (True, False):
            for cross in (False, not mask):
                wanted += [("fwd", tp, tr, tt, True, mask, cross), ("fwd", tp, None, tt, False, mask, cross)]
            wanted.append(("bwd", tp, tt, mask))
    for w in dict.fromkeys(wanted):
        if w not in have:
            if w[0] == "fwd":
                what = f"forward pred {SHORT[w[1]]}, ref {SHORT[w[2]] if w[4] else 'ref_err'}, target {SHORT[w[3]]}"
                suffix = (" + mask" if w[5] else "") + (" + cross" if w[6] else "")
            else:
                what = f"backward pred {SHORT[w[1]]}, target {SHORT[w[2]]}"
                suffix = " + mask" if w[-1] else ""
            errors.append(f"sm_{arch}: no vectorized kernel for the {what}{suffix} (sent to the scalar path?)")


# ----------------------------------------------------------------------------------------------------- Triton
TRITON_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}

# (pred, ref or None for ref_err, target, mask or None): what the launcher is called with.
TRITON_FWD = [("bf16", "bf16", "bf16", None), ("bf16", None, "bf16", None), ("bf16", "bf16", "bf16", "bf16"),
              ("fp16", "fp16", "fp16", None), ("fp32", "fp32", "fp32", None), ("fp32", "fp32", "bf16", None),
              ("fp32", "bf16", "bf16", None), ("fp32", "fp16", "fp16", None)]  # fmt: skip
# ... and with cross_term (the SDPO safeguard's variants: CROSS=True, never with a mask).
TRITON_FWD_CROSS = [("bf16", "bf16", "bf16", None), ("fp32", "fp32", "fp32", None),
                    ("fp32", "bf16", "bf16", None)]  # fmt: skip
TRITON_BWD = [("bf16", "bf16", None), ("bf16", "bf16", "bf16"), ("fp16", "fp16", None), ("fp32", "fp32", None),
              ("fp32", "bf16", None), ("fp32", "fp16", None)]  # fmt: skip


def triton_compile(fn, pointers: dict, ints: list[str], constexprs: dict, num_warps: int, workdir: str) -> str:
    """The cubin of `fn` for sm_90 as the launcher specializes it: 16-byte-aligned pointers and i32 lengths that are
    multiples of 16 (row_len and chunk_len on the vector path; num_pairs is not)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name in ints:
            signature[name] = "i32"
            if name in ("row_len", "chunk_len"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    path = os.path.join(workdir, f"{fn.__name__}_{abs(hash(str(sorted(constexprs.items())) + str(pointers)))}.cubin")
    with open(path, "wb") as fh:
        fh.write(k.asm["cubin"])
    return path


def check_triton(cuobjdump: str, workdir: str, errors: list[str]) -> list[Row]:
    tk = _module("backends.triton_kernels")

    rows = []
    jobs = []
    fwd = [(combo, False) for combo in TRITON_FWD] + [(combo, True) for combo in TRITON_FWD_CROSS]
    for (pred, ref, tgt, mask), cross in fwd:
        ptrs = {"pred_ptr": pred, "ref_ptr": ref or pred, "target_ptr": tgt, "mask_ptr": mask or pred,
                "ws_ptr": "fp32"}  # fmt: skip
        const = {"HAS_REF": ref is not None, "HAS_MASK": mask is not None, "SHARED_TARGET": False,
                 "SHARED_MASK": False, "INTERLEAVED": False, "BLOCK": tk._FWD_BLOCK, "CROSS": cross}  # fmt: skip
        variant = f"{pred}/{ref or 'ref_err'}/{tgt}{'+mask' if mask else ''}{'+cross' if cross else ''}"
        jobs.append(("fwd", tk._partials_kernel, ptrs, const, tk._FWD_WARPS, tk._FWD_BLOCK, variant,
                     [pred] * 2 + [tgt] * 2 + ([ref] * 2 if ref else []) + ([mask] * 2 if mask else [])))  # fmt: skip
    for pred, tgt, mask in TRITON_BWD:
        ptrs = {"grad_ptr": pred, "grad_loss_ptr": "fp32", "pred_ptr": pred, "target_ptr": tgt,
                "mask_ptr": mask or pred, "coef_ptr": "fp32"}  # fmt: skip
        const = {"PER_PAIR_GRAD": False, "HAS_MASK": mask is not None, "SHARED_TARGET": False,
                 "SHARED_MASK": False, "INTERLEAVED": False, "BLOCK": tk._BWD_BLOCK}  # fmt: skip
        variant = f"{pred}/{tgt}{'+mask' if mask else ''}"
        jobs.append(("bwd", tk._backward_kernel, ptrs, const, tk._BWD_WARPS, tk._BWD_BLOCK, variant,
                     [pred, tgt] + ([mask] if mask else [])))  # fmt: skip
    ints = ["num_pairs", "row_len", "chunk_len"]
    for kind, fn, ptrs, const, warps, block, variant, streams in jobs:
        where = f"triton sm_90 {fn.__name__} {variant}"
        try:
            cubin = triton_compile(fn, ptrs, ints, const, warps, workdir)
        except Exception as err:  # noqa: BLE001 - reported as a gate violation
            errors.append(f"{where}: does not compile for sm_90: {type(err).__name__}: {str(err)[:300]}")
            continue
        (f,) = [g for g in read_cubin(cuobjdump, cubin).values() if g.instrs]
        if f.local or f.stack:
            errors.append(f"{where}: local memory (LOCAL {f.local}, STACK {f.stack})")
        threads = 32 * warps
        blocks = blocks_per_sm(f.regs, threads, f.shared)
        if blocks * warps < TRITON_MIN_WARPS:
            errors.append(f"{where}: {f.regs} registers allow {blocks * warps} warps/SM, budget {TRITON_MIN_WARPS}")
        per_thread = block // threads
        expected = sum(packs(s, per_thread) for s in streams)
        body = hot_loop(f)
        # Triton/ptxas issues a forward step's loads in two groups whatever the register budget (checked at 40 and
        # 72 registers): reported, not asserted; the occupancy-sized grid supplies the warps that hide it.
        loads, groups = check_loop_loads(where, body, expected, errors, strict_issue=False)
        stores = [i for i in (body or []) if i.op.startswith("STG")]
        if kind == "bwd":
            want = packs(streams[0], per_thread)
            if len(stores) != want or any(width(i) != 128 for i in stores):
                errors.append(f"{where}: loop stores {_opcount(stores)}, expected {want} x STG.E.128")
        nbytes = sum(width(i) // 8 for i in loads)
        ipb = len(body) / (nbytes / 16) if nbytes else None
        inflight = blocks * threads * nbytes / 1024 if nbytes else None
        rows.append(Row("90", "triton " + fn.__name__, variant, f.regs, blocks, blocks * warps, _opcount(loads),
                        _opcount(stores), ipb, inflight, groups))  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------------ report
def table(rows: list[Row]) -> str:
    head = (
        "| arch | kernel | variant | regs | blocks/SM | warps/SM | hot-loop loads | load groups | stores "
        "| instr per 16 B | KB in flight/SM |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        ipb = f"{r.instr_per_16b:.0f}" if r.instr_per_16b else "-"
        inflight = f"{r.inflight_kb:.0f}" if r.inflight_kb else "-"
        lines.append(f"| sm_{r.arch} | {r.kernel} | {r.variant} | {r.regs} | {r.blocks} | {r.warps_per_sm} | "
                     f"{r.loads} | {r.groups or '-'} | {r.stores} | {ipb} | {inflight} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="CUDA arch to check (90, 100); default: 90 and 100 if supported")
    ap.add_argument("--cubin", action="append", default=[], help="ARCH=PATH: read this cubin instead of compiling")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    ap.add_argument("--strict", action="store_true", help="refuse a toolchain other than the pinned one")
    ap.add_argument("--out", help="write the table (markdown) here")
    ap.add_argument("--keep", help="copy the compiled cubins into this folder")
    args = ap.parse_args(argv)
    t0 = time.time()
    cuda_home = find_cuda_home()
    cuobjdump = find_cuobjdump(cuda_home)
    versions = toolchain(cuda_home, cuobjdump)
    print("static_gate: toolchain " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    check_pins(versions, args.strict)
    errors: list[str] = []
    rows: list[Row] = []
    given = dict(c.split("=", 1) for c in args.cubin)
    with tempfile.TemporaryDirectory() as work:
        if not args.no_cuda:
            archs = args.arch or [a for a in ("90", "100") if a == "90" or arch_supported(cuda_home, a)]
            for a in archs:
                if a not in given and not arch_supported(cuda_home, a):
                    raise SystemExit(f"static_gate: --arch {a}: nvcc {versions['nvcc']} cannot compile for sm_{a}")
            todo = [a for a in archs if a not in given]
            jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)  # one nvcc per arch, side by side
            with ThreadPoolExecutor(max_workers=max(1, min(len(todo), jobs))) as pool:
                built = dict(zip(todo, pool.map(lambda a: compile_cubin(cuda_home, a, work), todo)))
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                for path in built.values():
                    shutil.copy(path, args.keep)
            print(
                f"static_gate: compiled {', '.join('sm_' + a for a in todo) or 'nothing'} in {time.time() - t0:.0f} s"
            )
            for a in archs:
                rows += check_cuda(a, read_cubin(cuobjdump, given.get(a) or built[a]), errors)
        if not args.no_triton:
            rows += check_triton(cuobjdump, work, errors)
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Static gate: compiled kernels (no GPU)\n\n")
            fh.write("`python -m benchmarks.static_gate` (benchmarks/static_gate.py); toolchain: ")
            fh.write(", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n\n")
            fh.write("Hot-loop loads are per iteration (CUDA backward: per thread, it has no loop); instructions per "
                     "16 B are the hot loop's (the backward's whole kernel) per 16 bytes it loads; KB in flight per "
                     "SM = resident blocks x threads x bytes loaded per iteration.\n\n")  # fmt: skip
            fh.write(text + "\n")
    for e in errors:
        print("FAIL " + e)
    print(f"static_gate: {len(rows)} kernels, {len(errors)} violations, {time.time() - t0:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
