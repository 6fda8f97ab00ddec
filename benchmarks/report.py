"""Tables and plots from benchmark results (benchmarks/results/<tag>.json); nothing here measures anything.

    python -m benchmarks.report                 # regenerate <tag>.md and <tag>.png for every results JSON
    python -m benchmarks.report --heads results/heads-<tag>.json   # the preference heads' pytest-benchmark JSON
                                                # (benchmarks/test_heads_bench.py): <tag>.md and the README's
                                                # heads block (between the heads:begin/end markers)
    python -m benchmarks.report --readme        # also write results/README_table.md and splice it into
                                                # benchmarks/README.md between the bench:begin/end markers
                                                # (--no-splice: README_table.md only)

spec §5 (docs/spec.md) targets are shown next to the numbers (a check mark or a cross); nothing asserts them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HEADS_BEGIN, HEADS_END = "<!-- heads:begin -->", "<!-- heads:end -->"
PEER = {"cpu": "compile-diffusers", "cuda": "compile-ref"}
PEER_COL = {"compile-diffusers": "x_compile_diffusers", "compile-ref": "x_compile_ref"}


def load(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    return data["meta"], data["results"]


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits - 1}g}" if v else "0"


def _cases(rows: list[dict]) -> list[tuple]:
    seen = {}
    for r in rows:
        seen.setdefault((r["shape"], r["dims"], r["dtype"], r["variant"]), None)
    return list(seen)


def _index(rows: list[dict]) -> dict:
    return {(r["shape"], r["dtype"], r["variant"], r["provider"], r["mode"]): r for r in rows}


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def _providers(rows: list[dict], kind: str | None = None) -> list[str]:
    names = []
    for r in rows:
        if r["provider"] not in names and _ok(r):
            names.append(r["provider"])
    if kind == "fdiv":
        return [n for n in names if n.startswith("fdiv-")]
    if kind == "baseline":
        return [n for n in names if not n.startswith("fdiv-")]
    return names


def _featured_fdiv(rows: list[dict], device_type: str) -> list[str]:
    """fdiv providers a summary shows: the device's fused kernels, or the torch fallback if none ran."""
    fdiv = _providers(rows, "fdiv")
    fused = [p for p in fdiv if p != "fdiv-torch"]
    return fused or fdiv


# ----------------------------------------------------------------------------------------------------- tables
def _busy(meta: dict) -> bool:
    """A CPU run during which other processes held the cores (load average above 0.5 at its start or end)."""
    load = [v for v in (meta.get("loadavg_start"), meta.get("loadavg_end")) if v is not None]
    return meta.get("device_type") == "cpu" and bool(load) and max(load) > 0.5


def _where(meta: dict) -> str:
    """CPU: the thread count the run used; GPU: the chip and CUDA runtime."""
    if meta.get("device_type") == "cuda":
        return (
            f"sm_{meta.get('gpu_capability', '?').replace('.', '')}, {meta.get('gpu_sms', '?')} SMs, "
            f"{meta.get('gpu_memory_gb', '?')} GB, CUDA {meta.get('cuda_runtime')}"
        )
    return f"{meta['threads']} threads"


def header(meta: dict, source: str) -> str:
    copy = meta.get("copy", {})
    extra = ""
    if "numpy_copy_gbps" in copy:
        extra = f" (torch copy {copy['torch_copy_gbps']:.1f}, numpy copy {copy['numpy_copy_gbps']:.1f})"
    lines = [
        f"**{meta['device_name']}**, {_where(meta)}, torch {meta['torch']}, triton {meta['triton']}, "
        f"Python {meta['python']}, {meta['date']}, commit {meta.get('git_commit')}"
        + (" (uncommitted changes)" if meta.get("git_dirty") else "")
        + (", **smoke run (--quick)**" if meta.get("quick") else "")
        + ".",
        f"Source: `{source}`, from `{meta.get('command', 'python -m benchmarks.run')}`"
        f" ({meta.get('elapsed_s', '?')} s).",
        f"Copy bandwidth: **{copy.get('gbps', float('nan')):.1f} GB/s**{extra}: {copy.get('how', '')}, "
        f"{copy.get('buffer_mb', 0):.0f} MB buffer, read + write bytes.",
    ]
    if meta.get("device_type") == "cpu":
        lines.append(
            f"Load average at start / end: {meta.get('loadavg_start')} / {meta.get('loadavg_end')}"
            + (" — **other processes shared the cores: timings are noisy.**" if _busy(meta) else ".")
        )
    return "\n".join(lines)


def summary_table(meta: dict, rows: list[dict], mode: str = "fwd+bwd") -> str:
    """One row per case: baseline and fdiv times, and the best fdiv provider's ratios."""
    dev = meta["device_type"]
    idx = _index(rows)
    peer = PEER[dev]
    baselines = [p for p in ("eager", "compile-diffusers", "compile-ref") if p in _providers(rows)]
    fdiv = _featured_fdiv(rows, dev)
    cols = ["shape", "dtype", "variant"] + [f"{p} ms" for p in baselines + fdiv]
    cols += ["best fdiv", "× eager", f"× {peer}", "% copy", "peak extra MB (eager / peer / best)"]
    kernel_cols = dev == "cuda" and any(r.get("kernel_ms") is not None for r in rows)
    if kernel_cols:  # device time alone (profiler sums), beside the wall time above: host cost = the difference
        cols += ["kernel ms (eager / peer / best)", "kernel % copy (best)"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for shape, dims, dtype, variant in _cases(rows):
        get = lambda p, case=(shape, dtype, variant): idx.get((*case, p, mode))  # noqa: E731
        cells = [f"{shape} `{dims}`", dtype, variant]
        for p in baselines + fdiv:
            r = get(p)
            cells.append(_num(r["median_ms"]) if _ok(r) else (r or {}).get("status", "—"))
        ran = [get(p) for p in fdiv if _ok(get(p))]
        best = min(ran, key=lambda r: r["median_ms"]) if ran else None
        if best is None:
            cells += ["—"] * (7 if kernel_cols else 5)
        else:
            mem = [get(p).get("peak_extra_mb") if _ok(get(p)) else None for p in ("eager", peer)]
            cells += [
                best["provider"],
                _num(best.get("x_eager")),
                _num(best.get(PEER_COL[peer])),
                _num(best["pct_copy"]),
                " / ".join(_num(m) for m in mem + [best.get("peak_extra_mb")]),
            ]
            if kernel_cols:
                kern = [get(p).get("kernel_ms") if _ok(get(p)) else None for p in ("eager", peer)]
                cells += [
                    " / ".join(_num(k) for k in kern + [best.get("kernel_ms")]),
                    _num(best.get("kernel_pct_copy")),
                ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _targets(dev: str) -> list[tuple]:
    """(label, column, threshold, shapes or None for all) for the fused kernels, spec §5 (docs/spec.md) and issue 3."""
    if dev == "cpu":
        return [
            ("× eager ≥ 3", "x_eager", 3.0, None),
            ("× compile-diffusers ≥ 1.3", "x_compile_diffusers", 1.3, None),
            ("% copy ≥ 70 (flux, video)", "pct_copy", 70.0, ("flux", "video")),
        ]
    return [
        ("% copy ≥ 90 (large)", "pct_copy", 90.0, ("large",)),
        ("× eager ≥ 4", "x_eager", 4.0, None),
        ("× compile-ref ≥ 1.3", "x_compile_ref", 1.3, None),
    ]


def targets_table(meta: dict, rows: list[dict]) -> str:
    dev = meta["device_type"]
    idx = _index(rows)
    fused = [p for p in _providers(rows, "fdiv") if p != "fdiv-torch"]
    if not fused:
        return '_No fused fdiv kernel ran on this device (see "Not measured"); no target to check._'
    targets = _targets(dev)
    cols = ["shape", "dtype", "variant", "provider"] + [t[0] for t in targets]
    if dev == "cuda":
        cols.append("launches fwd ≤ 2 / bwd ≤ 1")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for shape, _dims, dtype, variant in _cases(rows):
        for p in fused:
            r = idx.get((shape, dtype, variant, p, "fwd+bwd"))
            if not _ok(r):
                continue
            cells = [shape, dtype, variant, p]
            for _label, col, thr, only in targets:
                v = r.get(col)
                if v is None:
                    cells.append("—")
                elif only is not None and shape not in only:
                    cells.append(_num(v))
                else:
                    cells.append(f"{_num(v)} {'✓' if v >= thr else '✗'}")
            if dev == "cuda":
                f, b = r.get("launches_fwd"), r.get("launches_bwd")
                cells.append("—" if f is None else f"{f} / {b} {'✓' if f <= 2 and b <= 1 else '✗'}")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def detail_table(meta: dict, rows: list[dict]) -> str:
    peer = PEER[meta["device_type"]]
    cols = [
        "shape",
        "dtype",
        "variant",
        "provider",
        "mode",
        "median ms [q20, q80]",
        "GB/s",
        "% copy",
        "kernel ms",
        "kernel % copy",
        "host ms",
        "× eager",
        f"× {peer}",
        "peak extra MB (× tensor)",
        "launches",
        "first call ms",
        "compile s",
    ]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if not _ok(r):
            continue
        mem = r.get("peak_extra_mb")
        cells = [
            r["shape"],
            r["dtype"],
            r["variant"],
            r["provider"],
            r["mode"],
            f"{_num(r['median_ms'])} [{_num(r['q20_ms'])}, {_num(r['q80_ms'])}]",
            _num(r["gbps"]),
            _num(r["pct_copy"]),
            _num(r.get("kernel_ms")),
            _num(r.get("kernel_pct_copy")),
            _num(r.get("host_ms")),
            _num(r.get("x_eager")),
            _num(r.get(PEER_COL[peer])),
            "—" if mem is None else f"{_num(mem)} ({_num(r.get('peak_extra_tensors'))})",
            _num(r.get("launches")),
            _num(r.get("first_call_ms")),
            _num(r.get("compile_s")),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def loss_agreement(rows: list[dict]) -> str:
    """Every provider must compute the same loss as eager: a harness sanity check, not a precision test."""
    eager = {(r["shape"], r["dtype"], r["variant"]): r.get("loss") for r in rows if r["provider"] == "eager"}
    worst = (0.0, None)
    for r in rows:
        ref = eager.get((r["shape"], r["dtype"], r["variant"]))
        if r.get("loss") is None or not ref:
            continue
        rel = abs(r["loss"] - ref) / abs(ref)
        if rel > worst[0] or rel != rel:
            worst = (rel, r)
    if worst[1] is None:
        return "Loss values: every provider matches eager exactly (or eager did not run)."
    r = worst[1]
    flag = "" if worst[0] < 1e-3 else " **— larger than expected: check the harness or the kernel.**"
    return (
        f"Loss values: largest relative difference from eager {worst[0]:.1e} ({r['provider']}, {r['shape']} "
        f"{r['dtype']} {r['variant']}){flag}"
    )


def not_measured(rows: list[dict]) -> str:
    seen = {}
    for r in rows:
        if r.get("status") != "ok":
            key = (r["provider"], r.get("status"), r.get("reason", ""))
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return "_Everything requested ran._"
    return "\n".join(f"- `{p}` {s} ({n} rows): {reason}" for (p, s, reason), n in seen.items())


def device_markdown(meta: dict, rows: list[dict], source: str) -> str:
    dev = meta["device_type"]
    method = meta.get("method", {})
    parts = [
        f"# fdiv_kernels microbenchmarks: {meta['device_name']}",
        "_Generated by `python -m benchmarks.report` from the JSON below; do not edit by hand._",
        header(meta, source),
        "Method: "
        + "; ".join(f"{k}: {v}" for k, v in method.items())
        + (f"; compile cache: {meta['compile_cache']}" if meta.get("compile_cache") else "")
        + ".",
        "Bytes (spec §5, per pass of one `[2B, D]` tensor): fwd+bwd 6, 5.5 with a shared target, 5 with ref_err "
        "(4 with ref_err and a shared target); fwd 3 / 2.5 / 2; bwd 3 / 2.5 / 3. Ratios × = baseline time / this "
        "time, same case and mode.",
        f"## fwd+bwd summary\n\n{summary_table(meta, rows)}\n\n{loss_agreement(rows)}",
        f"## Targets (spec §5 and issue 3; shown, not asserted)\n\n{targets_table(meta, rows)}",
        f"![speedup and bandwidth]({Path(source).with_suffix('.png').name})",
        f"## All measurements\n\n{detail_table(meta, rows)}",
        f"## Not measured\n\n{not_measured(rows)}",
    ]
    if dev == "cpu":
        parts.insert(
            4,
            "CPU peak memory counts the torch CPU allocator's tracked allocations (torch.profiler "
            "`profile_memory=True`), not RSS.",
        )
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------- plot
def plot(meta: dict, rows: list[dict], png: Path, mode: str = "fwd+bwd") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    idx = _index(rows)
    cases = [c for c in _cases(rows) if any(_ok(idx.get((c[0], c[2], c[3], p, mode))) for p in _providers(rows))]
    providers = _providers(rows)
    labels = [f"{s}\n{d}" + ("" if v == "full" else f"\n{v}") for s, _dims, d, v in cases]
    x = np.arange(len(cases))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.6 * len(cases) + 2), 8), sharex=True)
    width = 0.8 / max(1, len(providers))
    for k, p in enumerate(providers):
        rs = [idx.get((s, d, v, p, mode)) for s, _dims, d, v in cases]
        speed = [r["x_eager"] if _ok(r) and r.get("x_eager") else np.nan for r in rs]
        pct = [r["pct_copy"] if _ok(r) else np.nan for r in rs]
        pos = x - 0.4 + width * (k + 0.5)
        color = f"C{k}"
        if p != "eager":  # eager is the unit of the speedup panel
            ax1.bar(pos, speed, width, label=p, color=color)
        ax2.bar(pos, pct, width, label=p, color=color)
        kernel_pct = [r.get("kernel_pct_copy") or np.nan if _ok(r) else np.nan for r in rs]
        if not np.all(np.isnan(kernel_pct)):  # GPU: device time alone, as a marker over the wall-time bar
            ax2.plot(pos, kernel_pct, "_", color="k", markersize=8, label="kernel time only" if k == 0 else None)
    dev = meta["device_type"]
    ax1.set_yscale("log")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(
        3.0 if dev == "cpu" else 4.0, color="r", ls="--", lw=0.8, label=f"target ≥ {3 if dev == 'cpu' else 4}x eager"
    )
    ax1.set_ylabel(f"speedup over eager ({mode})")
    ax1.legend(fontsize=7, ncol=3)
    ax2.axhline(
        70 if dev == "cpu" else 90,
        color="r",
        ls="--",
        lw=0.8,
        label=f"target {70 if dev == 'cpu' else 90}% ({'flux, video' if dev == 'cpu' else 'large'})",
    )
    ax2.set_ylabel(f"% of copy bandwidth ({meta['copy']['gbps']:.0f} GB/s)")
    ax2.set_xticks(x, labels, fontsize=7)
    ax2.legend(fontsize=7, ncol=3)
    fig.suptitle(
        f"fdiv_kernels {mode}: {meta['device_name']}, {_where(meta)}, torch {meta['torch']}, "
        f"{meta['date'][:10]}"
        + (" (smoke run)" if meta.get("quick") else "")
        + (" (busy machine: noisy)" if _busy(meta) else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_device_report(json_path: Path) -> list[Path]:
    json_path = Path(json_path)
    meta, rows = load(json_path)
    md = json_path.with_suffix(".md")
    md.write_text(device_markdown(meta, rows, _rel(json_path)))
    written = [md]
    if any(_ok(r) for r in rows):
        try:
            written.append(plot(meta, rows, json_path.with_suffix(".png")))
        except ImportError as err:  # e.g. no matplotlib on a bare GPU machine: rerun the report elsewhere
            print(f"no plot ({err}); run `python -m benchmarks.report {_rel(json_path)}` where matplotlib is installed")
    return written


def _is_run(path: Path) -> bool:
    """Whether ``path`` is a ``benchmarks.run`` results file (results, and meta naming the device type)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "results" in data and "device_type" in data.get("meta", {})


# ----------------------------------------------------------------------------------------------------- README
def pick_results(results_dir: Path) -> dict[str, Path]:
    """Per device type the results a README shows: full runs before partial/smoke ones, then the newest."""
    best: dict[str, tuple] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            meta, _ = load(path)
        except Exception:
            continue
        rank = (not meta.get("quick") and not path.stem.endswith("-partial"), meta.get("date", ""))
        dev = meta.get("device_type", "?")
        if dev not in best or rank > best[dev][0]:
            best[dev] = (rank, path)
    return {dev: best[dev][1] for dev in ("cpu", "cuda") if dev in best}


def readme_block(results_dir: Path = RESULTS) -> str:
    picked = pick_results(results_dir)
    parts = ["<!-- generated by `python -m benchmarks.report --readme`; do not edit by hand -->"]
    if not picked:
        parts.append("_No benchmark results yet: run `python -m benchmarks.run --device cpu`._")
    for dev, path in picked.items():
        meta, rows = load(path)
        title = "CPU" if dev == "cpu" else "GPU"
        parts.append(
            f"#### {title}: {meta['device_name']}, {_where(meta)}, {meta['date'][:10]} (source: `{_rel(path)}`)"
        )
        parts.append(
            f"fwd+bwd, median ms; × = speedup of the fastest fdiv backend; % copy = its effective "
            f"bandwidth (spec §5 bytes) over a copy measured in the same run "
            f"({meta['copy']['gbps']:.1f} GB/s). Details and plot: `{_rel(path.with_suffix('.md'))}`."
            + (" **Smoke run only.**" if meta.get("quick") else "")
            + (" **Measured while other processes shared the cores: noisy.**" if _busy(meta) else "")
        )
        parts.append(summary_table(meta, rows))
    if "cuda" not in picked:
        parts.append("_No GPU results yet: `python -m benchmarks.run --device cuda` on a CUDA machine._")
    return "\n\n".join(parts) + "\n"


def splice_readme(block: str, readme: Path, begin: str = BEGIN, end_marker: str = END) -> bool:
    """Replace the text between the markers of ``readme``; False if the file or markers are missing."""
    if not readme.exists():
        return False
    text = readme.read_text()
    start, end = text.find(begin), text.find(end_marker)
    if start < 0 or end < start:
        return False
    readme.write_text(text[: start + len(begin)] + "\n" + block + text[end:])
    return True


# ------------------------------------------------------------------------------------------- preference heads
def heads_block(json_path: Path) -> str:
    """The preference heads' table (benchmarks/test_heads_bench.py's pytest-benchmark JSON): per head, shape and
    dtype the fwd+bwd medians of the authors' eager formula, its torch.compile and the fused passes, the fused
    speedups, % of copy, and each loss's relative difference from the float64 reference."""
    data = json.loads(Path(json_path).read_text())
    rows = [b["extra_info"] | {"median_ms": b["stats"]["median"] * 1e3} for b in data["benchmarks"]]
    first = rows[0] if rows else {}
    loads = [r.get("loadavg_1m") for r in rows if r.get("loadavg_1m") is not None]
    commit = data.get("commit_info", {})
    head = (
        f"#### CPU: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, {first.get('threads')} thread, "
        f"torch {first.get('torch')}, {data['datetime'][:10]} (source: `{_rel(Path(json_path))}`, commit "
        f"{commit.get('id', '?')[:7]}" + (", uncommitted changes" if commit.get("dirty") else "") + ")"
    )
    note = (
        "fwd+bwd, median ms (pytest-benchmark); × = the fused provider's speedup; % copy = the fused provider's "
        f"bytes (MaPO 5 tensor passes, the others 6) over a copy ({first.get('copy_gbps')} GB/s); rel. diff = "
        "|loss - float64 reference| / |reference| (fdiv_kernels.reference) for eager / compile / fused. "
        "`dpo` is plain Diffusion-DPO (eager = diffusers' formula) in the same run, for context."
        + (f" Load average {min(loads):.2f}–{max(loads):.2f}: another job held the other core." if loads else "")
    )
    cols = ["head", "shape", "dtype", "eager ms", "compile ms", "fdiv-cpu ms", "× eager", "× compile", "% copy"]
    cols.append("rel. diff vs f64 (eager / compile / fused)")
    out = [head, "", note, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    index = {(r["head"], r["shape"], r["dtype"], r["impl"]): r for r in rows}
    cases = list(dict.fromkeys((r["head"], r["shape"], r["dims"], r["dtype"]) for r in rows))
    for name, shape, dims, dtype in cases:
        got = [index.get((name, shape, dtype, impl)) for impl in ("eager", "compile", "fdiv")]
        ms = [r["median_ms"] if r else None for r in got]
        fused = got[2]
        cells = [name, f"{shape} `{dims}`", dtype] + [_num(m) for m in ms]
        cells += [_num(ms[0] / ms[2]) if ms[0] and ms[2] else "—", _num(ms[1] / ms[2]) if ms[1] and ms[2] else "—"]
        cells.append(_num(fused.get("pct_copy")) if fused else "—")
        cells.append(" / ".join(f"{r['loss_rel_diff_vs_f64']:.1e}" if r else "—" for r in got))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", help="results JSON files (default: every *.json in --results)")
    ap.add_argument("--results", default=str(RESULTS), help="results folder")
    ap.add_argument(
        "--readme",
        action="store_true",
        help="write <results>/README_table.md and splice it into benchmarks/README.md between the bench markers",
    )
    ap.add_argument("--readme-path", default=str(REPO / "benchmarks" / "README.md"))
    ap.add_argument("--no-splice", action="store_true", help="with --readme: write README_table.md only")
    ap.add_argument("--heads", metavar="JSON", help="test_heads_bench.py's JSON: write its .md, splice the README")
    args = ap.parse_args(argv)
    results = Path(args.results)
    if args.heads:
        block = heads_block(Path(args.heads))
        md = Path(args.heads).with_suffix(".md")
        md.write_text(block)
        print(f"wrote {_rel(md)}")
        if not args.no_splice and splice_readme(block, Path(args.readme_path), HEADS_BEGIN, HEADS_END):
            print(f"updated {_rel(Path(args.readme_path))} between {HEADS_BEGIN} and {HEADS_END}")
        return
    # The folder also holds other benchmarks' JSON (benchmarks.host, benchmarks.train_step): skip what is not a run.
    for path in args.json or [p for p in sorted(results.glob("*.json")) if _is_run(p)]:
        for out in write_device_report(Path(path)):
            print(f"wrote {_rel(out)}")
    if args.readme:
        block = readme_block(results)
        table = results / "README_table.md"
        table.write_text(block)
        print(f"wrote {_rel(table)}")
        readme = Path(args.readme_path)
        if args.no_splice:
            return
        if splice_readme(block, readme):
            print(f"updated {_rel(readme)} between {BEGIN} and {END}")
        else:
            print(f"{_rel(readme)} has no {BEGIN} ... {END} block (or does not exist): left untouched")


if __name__ == "__main__":
    main()
