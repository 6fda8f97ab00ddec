"""``study --frontier``: reward-diversity frontiers over the regularisation strength, several seeds per point.

For each seed: sample and label the preference pairs, cache the reference errors, evaluate the base model; then
for each divergence and each regularisation strength, fine-tune and evaluate (the same protocol as the study).
Each finished model is written at once, atomically, to ``results/<divergence>_g<gamma>_s<seed>.json``; a run
that is killed continues where it stopped when started again with the same ``--output`` (finished models are
read back, a half-trained one is trained again). At the end (and with ``--report-only``) the results are
summarised in ``frontier.json``, ``frontier.md`` and ``frontier.png``.

The regularisation strength is ``gamma``, the outer scale of the pair logit ``z = gamma * (psi(d_w) - psi(d_l))``,
with the log-ratio scale ``beta`` (inside psi) held at the study's 500. In the f-divergence-regularised objective
``E[r] - gamma * D_f(pi || pi_ref)`` this is the coefficient of the divergence (Sun et al.'s beta); for reverse KL
it is Diffusion-DPO's beta = ``beta * gamma`` (the study's gamma 10 is Diffusion-DPO's 5000). Small gamma:
the logit never saturates and training pushes as far as the steps allow (over-optimisation); large gamma: it
saturates early and the model stays near the reference (under-optimisation).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fdiv_kernels import DIVERGENCES
from fdiv_kernels.train.io import WRITER_FILE, WriterLock, from_json, read_json
from fdiv_kernels.train.loop import TrainConfig, cache_reference_errors, train
from fdiv_kernels.train.model import load_pipeline

from . import bootstrap as stats
from . import task
from .study import StudyConfig, check_base, evaluate, make_pairs, portable_path, prompt_groups

# Chosen from a pilot (seed 0, reverse KL and JS; results/study/frontier_pilot.jsonl, docs/training.md "Frontiers"):
# reverse KL's reward peaks near gamma 1 and falls at 0.3 while diversity keeps falling (over-optimisation); at 100
# JS is close to the base (under-optimisation).
DEFAULT_GAMMAS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DEFAULT_DIVERGENCES = ("reverse_kl", "js")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
# Measured per-item times on 2 quiet CPU cores (torch 2.14, 2 threads; seed 3 of the committed frontier,
# results/study/frontier): one fine-tune plus its evaluation ~68 s; per seed, the pairs, reference errors and
# base evaluation ~88 s.
SECONDS_PER_MODEL = 68.0
SECONDS_PER_SEED = 88.0
# The diversity measures the frontier can be drawn against (per-prompt metrics of the evaluation).
DIVERSITY = ("pairwise_distance", "vendi", "object_spread", "background_spread")


@dataclass
class FrontierConfig:
    output: Path
    divergences: tuple[str, ...] = DEFAULT_DIVERGENCES
    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    # The main study's settings (StudyConfig's defaults) for everything but the strengths.
    base: Path = StudyConfig.base
    pairs: int = StudyConfig.pairs
    sampling_steps: int = StudyConfig.sampling_steps
    steps: int = StudyConfig.steps
    batch_size: int = StudyConfig.batch_size
    learning_rate: float = StudyConfig.learning_rate
    beta: float = StudyConfig.beta
    alpha: float = 0.5
    label_temperature: float = StudyConfig.label_temperature
    eval_prompts: int = StudyConfig.eval_prompts
    eval_samples: int = StudyConfig.eval_samples
    progress: bool = True
    keep_runs: bool = False  # keep each fine-tuned UNet (else removed once evaluated)

    def __post_init__(self):
        self.output, self.base = Path(self.output), Path(self.base)
        self.divergences = tuple(self.divergences)
        self.gammas = tuple(
            float(g) if isinstance(g, numbers.Real) and not isinstance(g, bool) else g for g in self.gammas
        )
        self.seeds = tuple(self.seeds)
        unknown = [d for d in self.divergences if d not in DIVERGENCES]
        if not self.divergences or unknown:
            raise ValueError(
                f"--divergences must name at least one of {', '.join(DIVERGENCES)}; got "
                f"{', '.join(map(str, unknown)) or 'none'}"
            )
        _unique("--divergences", self.divergences)
        if len(self.gammas) < 2:
            raise ValueError(f"--gammas needs at least 2 regularisation strengths for a curve; got {self.gammas}")
        for g in self.gammas:
            if isinstance(g, bool) or not isinstance(g, numbers.Real) or not math.isfinite(g) or g <= 0:
                raise ValueError(f"--gammas must be finite numbers > 0; got {g!r}")
        _unique("--gammas", [f"{g:g}" for g in self.gammas])
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        for s in self.seeds:
            _check_int("--seeds", s, 0)
        _unique("--seeds", self.seeds)
        for name in ("pairs", "sampling_steps", "steps", "batch_size", "eval_prompts"):
            _check_int(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        _check_int("--eval-samples", self.eval_samples, 2)
        held_out = len(task.split_specs()[1])
        if self.eval_prompts > held_out:
            raise ValueError(
                f"--eval-prompts must be at most {held_out} (the held-out prompts); got {self.eval_prompts}"
            )
        for name in ("learning_rate", "beta"):
            _check_real(f"--{name.replace('_', '-')}", getattr(self, name), positive=True)
        _check_real("--label-temperature", self.label_temperature, positive=False)
        _check_real("--alpha", self.alpha, positive=True)
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must be in (0, 1); got {self.alpha!r}")
        if self.output.exists() and not self.output.is_dir():
            raise FileExistsError(f"--output {self.output} is a file; the frontier is written as a folder")
        check_base(self.base)

    def shared(self) -> dict:
        """The settings every result of one output folder must share (the lists may grow between runs)."""
        skip = {"output", "divergences", "gammas", "seeds", "progress", "keep_runs"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        return {**settings, "base": portable_path(self.base)}

    def eval_specs(self) -> list[task.Spec]:
        """The evaluation prompts, in the order of every result's per-prompt values."""
        return task.split_specs()[1][: self.eval_prompts]


def _unique(flag: str, values) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} has repeated values: {', '.join(map(str, values))}")


def _check_int(flag: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{flag} must be integers >= {low}; got {value!r}")


def _check_real(flag: str, value, positive: bool) -> None:
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
    if bad or value < 0 or (positive and value == 0):
        raise ValueError(f"{flag} must be a finite number {'>' if positive else '>='} 0; got {value!r}")


def result_name(divergence: str, gamma: float, seed: int) -> str:
    return f"{divergence}_g{gamma:g}_s{seed}"


def estimate_seconds(cfg: FrontierConfig, done: int = 0, seeds_done: int = 0) -> float:
    """Wall-time estimate on 2 quiet CPU cores, scaled by the training and evaluation sizes."""
    size = (cfg.steps * cfg.batch_size) / (80 * 32) * 0.8 + (cfg.eval_prompts * cfg.eval_samples) / (36 * 12) * 0.2
    per_seed = SECONDS_PER_SEED * (cfg.pairs / 1024 * 0.75 + 0.25)
    models = len(cfg.divergences) * len(cfg.gammas) * len(cfg.seeds) - done
    return models * SECONDS_PER_MODEL * size + (len(cfg.seeds) - seeds_done) * per_seed


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_result(path: Path, shared: dict) -> dict | None:
    if not path.is_file():
        return None
    data = read_json(path)
    if data.get("settings") != shared:
        settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        raise ValueError(
            f"{path} was made with other settings than this run's; use another --output "
            f"(differing: {', '.join(sorted(_differing(settings, shared)))})"
        )
    from_json([path], _result_fields, data, shared["eval_prompts"])
    return data


def _result_fields(data: dict, prompts: int) -> None:
    """Read every field a summary reads from a result (a damaged one fails here, where its file is known)."""
    for metric in data["metrics"].values():
        float(metric["mean"])
        if len(np.asarray(metric["per_prompt"], dtype=float)) != prompts:
            raise ValueError(f"per_prompt holds {len(metric['per_prompt'])} values for {prompts} prompts")
    for key in ("evaluate", "prepare" if data["model"] == "base" else "train"):
        float(data["timings_s"][key])
    if data["model"] != "base":
        float(data["final_train"]["implicit_acc"])
    dict(data["machine"])


def _differing(a: dict, b: dict) -> set:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def _check_folder(cfg: FrontierConfig) -> None:
    """Start or resume ``cfg.output``: it must be empty, new, or a frontier made with the same shared settings."""
    marker = cfg.output / "frontier_config.json"
    if marker.is_file():
        recorded = read_json(marker)
        if recorded != cfg.shared():
            raise ValueError(
                f"{cfg.output} holds a frontier made with other settings (differing: "
                f"{', '.join(sorted(_differing(recorded, cfg.shared())))}); use another --output"
            )
    elif cfg.output.exists() and any(p.name != WRITER_FILE for p in cfg.output.iterdir()):
        raise FileExistsError(f"{cfg.output} exists and is not a frontier folder; choose another --output")


def _metrics_record(metrics: dict) -> dict:
    return {k: {"mean": v["mean"], "per_prompt": v["per_prompt"]} for k, v in metrics.items()}


def run_frontier(cfg: FrontierConfig) -> dict:
    """Train and evaluate every (divergence, gamma, seed) not yet in ``cfg.output/results``; then summarise."""
    _check_folder(cfg)
    cfg.output.mkdir(parents=True, exist_ok=True)
    with WriterLock(cfg.output, "study --frontier"):  # one writer per folder: a second run would train the same models
        return _run_frontier(cfg)


def _run_frontier(cfg: FrontierConfig) -> dict:
    shared = cfg.shared()
    out = cfg.output
    (out / "results").mkdir(parents=True, exist_ok=True)
    _write_json(out / "frontier_config.json", shared)
    # The pairs, reference errors and half-trained models are rebuilt from the seeds; only results are kept.
    (out / ".gitignore").write_text("cache/\nwork/\n")
    eval_specs = cfg.eval_specs()
    todo = [
        (s, d, g)
        for s in cfg.seeds
        for d in cfg.divergences
        for g in cfg.gammas
        if _read_result(out / "results" / f"{result_name(d, g, s)}.json", shared) is None
    ]
    seeds_done = sum(_read_result(out / "results" / f"base_s{s}.json", shared) is not None for s in cfg.seeds)
    total = len(cfg.divergences) * len(cfg.gammas) * len(cfg.seeds)
    estimate = estimate_seconds(cfg, total - len(todo), seeds_done)
    if cfg.progress:
        print(
            f"frontier: {total - len(todo)} of {total} models done; about {estimate / 60:.0f} min to go "
            f"(2 quiet CPU cores)",
            flush=True,
        )
    base = None
    for seed in cfg.seeds:
        jobs = [(d, g) for s, d, g in todo if s == seed]
        base_path = out / "results" / f"base_s{seed}.json"
        if not jobs and base_path.is_file():
            continue
        base = load_pipeline(cfg.base) if base is None else base
        seed_dir = out / "cache" / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        tick = time.perf_counter()
        if not (seed_dir / "pairs").is_dir():  # written atomically: present means complete
            make_pairs(
                base,
                seed_dir / "pairs",
                cfg.pairs,
                seed,
                cfg.sampling_steps,
                progress=cfg.progress,
                label_temperature=cfg.label_temperature,
            )
        train_cfg = TrainConfig(
            pipeline=cfg.base,
            dataset=seed_dir / "pairs",
            output=out / "work",
            max_steps=cfg.steps,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            beta=cfg.beta,
            seed=seed,
            log_every=max(1, cfg.steps // 10),
            cpu=True,
            progress=False,
            alpha=cfg.alpha,
        )
        ref = seed_dir / "ref_errors.safetensors"
        if not ref.is_file():  # written atomically too
            cache_reference_errors(train_cfg, ref)
        prepare_s = time.perf_counter() - tick
        if _read_result(base_path, shared) is None:
            tick = time.perf_counter()
            metrics, _ = evaluate(
                base, eval_specs, cfg.eval_samples, seed, cfg.sampling_steps, "evaluate base", cfg.progress
            )
            _write_json(
                base_path,
                {
                    "model": "base",
                    "seed": seed,
                    "settings": shared,
                    "metrics": _metrics_record(metrics),
                    "timings_s": {"prepare": prepare_s, "evaluate": time.perf_counter() - tick},
                    "machine": _machine(),
                },
            )
        for divergence, gamma in tqdm(jobs, desc=f"frontier seed {seed}", disable=not cfg.progress, dynamic_ncols=True):
            name = result_name(divergence, gamma, seed)
            work = out / "work" / name
            shutil.rmtree(work, ignore_errors=True)  # a killed run's half-trained model
            tick = time.perf_counter()
            result = train(replace(train_cfg, divergence=divergence, gamma=gamma, output=work, ref_errors=ref))
            train_s = time.perf_counter() - tick
            tick = time.perf_counter()
            tuned = load_pipeline(cfg.base, unet=work / "unet")
            metrics, _ = evaluate(
                tuned, eval_specs, cfg.eval_samples, seed, cfg.sampling_steps, f"evaluate {name}", cfg.progress
            )
            last = result.records[-1]
            _write_json(
                out / "results" / f"{name}.json",
                {
                    "model": name,
                    "divergence": divergence,
                    "gamma": gamma,
                    "seed": seed,
                    "settings": shared,
                    "metrics": _metrics_record(metrics),
                    "final_train": {k: last[k] for k in ("loss", "implicit_acc", "reward_margin")},
                    "timings_s": {"train": train_s, "evaluate": time.perf_counter() - tick},
                    "machine": _machine(),
                },
            )
            if not cfg.keep_runs:
                shutil.rmtree(work, ignore_errors=True)
    if not cfg.keep_runs:
        shutil.rmtree(out / "work", ignore_errors=True)
    return summarise(cfg)


def _machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def load_results(cfg: FrontierConfig) -> tuple[dict, dict]:
    """The finished results of ``cfg``'s grid: ``{(divergence, gamma, seed): record}`` and ``{seed: base record}``."""
    shared = cfg.shared()
    models, bases = {}, {}
    for seed in cfg.seeds:
        base = _read_result(cfg.output / "results" / f"base_s{seed}.json", shared)
        if base is not None:
            bases[seed] = base
        for d in cfg.divergences:
            for g in cfg.gammas:
                found = _read_result(cfg.output / "results" / f"{result_name(d, g, seed)}.json", shared)
                if found is not None:
                    models[(d, g, seed)] = found
    return models, bases


def _array(records: list[dict], key: str) -> np.ndarray:
    return np.array([r["metrics"][key]["per_prompt"] for r in records])  # [S, P]


def summarise(cfg: FrontierConfig, n_boot: int = stats.DEFAULT_BOOT) -> dict:
    """Statistics over the seeds that are complete (every divergence and gamma finished); writes the summary."""
    models, bases = load_results(cfg)
    complete = [
        s for s in cfg.seeds if s in bases and all((d, g, s) in models for d in cfg.divergences for g in cfg.gammas)
    ]
    summary = {
        "config": {
            **cfg.shared(),
            "divergences": list(cfg.divergences),
            "gammas": list(cfg.gammas),
            "seeds": list(cfg.seeds),
        },
        "complete_seeds": complete,
        "finished_models": len(models),
        "rows": [],
        "frontiers": {},
    }
    timings = [m["timings_s"]["train"] + m["timings_s"]["evaluate"] for m in models.values()]
    seed_prep = [b["timings_s"]["prepare"] + b["timings_s"]["evaluate"] for b in bases.values()]
    summary["timings_s"] = {
        "per_model_mean": float(np.mean(timings)) if timings else None,
        "per_seed_prepare_mean": float(np.mean(seed_prep)) if seed_prep else None,
        "total_measured": float(np.sum(timings) + np.sum(seed_prep)),
    }
    summary["machine"] = next(iter(models.values()))["machine"] if models else _machine()
    if not complete:
        _write_summary(cfg, summary)
        return summary
    keys = list(next(iter(bases.values()))["metrics"])
    rows = [("base", None, None, [bases[s] for s in complete])]
    rows += [(d, d, g, [models[(d, g, s)] for s in complete]) for d in cfg.divergences for g in cfg.gammas]
    summary["rows"], summary["frontiers"] = _statistics(cfg, rows, keys, slice(None), n_boot)
    # The same statistics on the prompts the base saw in pretraining and on those it never saw (a base pretrained
    # with --hold-out-novel; nothing for a base that saw every evaluation prompt).
    captions = [s.caption for s in cfg.eval_specs()]
    summary["prompt_groups"] = {}
    for group, indices in prompt_groups(cfg.base, captions).items():
        group_rows, gaps = _statistics(cfg, rows, keys, indices, n_boot)
        summary["prompt_groups"][group] = {
            "prompts": [captions[i] for i in indices],
            "rows": group_rows,
            "frontiers": gaps,
        }
    _write_summary(cfg, summary)
    return summary


def _statistics(cfg: FrontierConfig, rows: list[tuple], keys: list[str], prompts, n_boot: int) -> tuple[list, dict]:
    """Per model, each metric over seeds x ``prompts`` (indices or a slice) with its Pareto flag; and the
    frontier gaps of every divergence against reverse KL (or the first one), for each diversity measure."""

    def array(records: list[dict], key: str) -> np.ndarray:
        return _array(records, key)[:, prompts]

    out = []
    for label, divergence, gamma, records in rows:
        row = {
            "model": label if gamma is None else f"{label} gamma {gamma:g}",
            "divergence": divergence,
            "gamma": gamma,
        }
        for key in keys:
            row[key] = stats.bootstrap(array(records, key), n_boot=n_boot).as_dict()
        if gamma is not None:
            row["final_implicit_acc"] = float(np.mean([r["final_train"]["implicit_acc"] for r in records]))
        out.append(row)
    flags = stats.pareto_flags(
        [array(records, "reward") for *_, records in rows],
        [array(records, "pairwise_distance") for *_, records in rows],
        n_boot=n_boot,
    )
    for row, flag in zip(out, flags):
        row["pareto"] = flag
    by_model = {(divergence, gamma): records for _, divergence, gamma, records in rows}
    baseline = "reverse_kl" if "reverse_kl" in cfg.divergences else cfg.divergences[0]
    gaps = {}
    for other in cfg.divergences:
        if other == baseline:
            continue
        for key in DIVERSITY:
            if key not in keys:
                continue
            cube = lambda d, k: np.stack([array(by_model[(d, g)], k) for g in cfg.gammas], 1)  # noqa: E731 [S,G,P]
            gaps[f"{other} vs {baseline}: {key}"] = stats.frontier_gap(
                cube(baseline, "reward"), cube(baseline, key), cube(other, "reward"), cube(other, key), n_boot=n_boot
            )
    return out, gaps


def _write_summary(cfg: FrontierConfig, summary: dict) -> None:
    _write_json(cfg.output / "frontier.json", summary)
    (cfg.output / "frontier.md").write_text(frontier_markdown(summary))
    if summary["rows"]:
        plot_frontier(cfg, summary, cfg.output / "frontier.png")


def frontier_markdown(summary: dict) -> str:
    """The frontier table and the verdicts."""
    from .study_report import frontier_tables

    return frontier_tables(summary)


def replot(folder: Path) -> None:
    """Redraw ``folder``'s frontier.png from its committed frontier.json and results (no training, no statistics
    recomputed)."""
    summary = json.loads((folder / "frontier.json").read_text())
    settings = dict(summary["config"])
    base = Path(settings.pop("base"))
    package_parent = Path(__file__).resolve().parents[1]  # a shipped base is recorded relative to it
    cfg = FrontierConfig(
        output=folder, base=base if base.is_absolute() else package_parent / base, progress=False, **settings
    )
    if summary["rows"]:
        plot_frontier(cfg, summary, folder / "frontier.png")


def plot_frontier(cfg: FrontierConfig, summary: dict, path: Path) -> None:
    """Reward vs diversity, one curve per divergence through its gammas in gamma order (point labels): the mean over
    seeds (points, dashed) and each seed's curve (faint); the base model as black squares; the reward band where
    the frontier test compares the curves shaded grey. A last panel: JS - reverse KL pairwise distance at each
    compared reward level with its paired 95% bootstrap interval over seeds x prompts (the intervals the verdict
    uses), the mean gap with its interval, and the equivalence margin. For a base that never saw some of the
    prompts, a panel on those only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .study_report import margins

    models, bases = load_results(cfg)
    seeds = summary["complete_seeds"]
    panels = [
        (k, label, None, summary["frontiers"])
        for k, label in (
            ("pairwise_distance", "mean pairwise distance (per-pixel RMS)"),
            ("background_spread", "background spread (RGB)"),
            ("object_spread", "object-attribute spread (tolerance units)"),
        )
        if k in bases[seeds[0]]["metrics"]
    ]
    novel = (summary.get("prompt_groups") or {}).get("novel")
    if novel:  # the same curves on the prompts the base never saw
        captions = [s.caption for s in cfg.eval_specs()]
        panels.append(
            (
                "pairwise_distance",
                "pairwise distance, novel prompts only",
                [captions.index(c) for c in novel["prompts"]],
                novel["frontiers"],
            )
        )
    gap_name = next((n for n in summary["frontiers"] if n.endswith(": pairwise_distance")), None)
    gap = summary["frontiers"].get(gap_name) if gap_name else None
    has_gap = gap is not None and gap["verdict"] != "no overlap"

    def mean(record: dict, key: str, prompts: list[int] | None) -> float:
        values = record["metrics"][key]["per_prompt"]
        return float(np.mean(values if prompts is None else [values[i] for i in prompts]))

    count = len(panels) + has_gap
    cols = 2
    rows = (count + cols - 1) // cols
    gammas = sorted(cfg.gammas)
    with plt.rc_context({"font.size": 12, "axes.titlesize": 12, "legend.fontsize": 10}):
        fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 5.0 * rows), squeeze=False)
        flat = list(axes.flat)
        for ax, (key, label, prompts, frontiers) in zip(flat, panels):
            compared = frontiers.get(next((n for n in frontiers if n.endswith(f": {key}")), ""), {})
            if compared.get("levels"):
                ax.axvspan(
                    compared["levels"][0], compared["levels"][-1], color="0.85", lw=0, label="compared reward band"
                )
            for i, divergence in enumerate(cfg.divergences):
                colour = f"C{i}"
                r, v = (
                    np.array([[mean(models[(divergence, g, s)], k, prompts) for g in gammas] for s in seeds])
                    for k in ("reward", key)
                )  # [S, G], gamma order
                for s in range(len(seeds)):
                    ax.plot(r[s], v[s], "-", color=colour, alpha=0.15, lw=1)
                ax.plot(r.mean(0), v.mean(0), "o--", color=colour, ms=5, lw=1.2, label=f"{divergence} (mean)")
                offset = (5, 5) if i % 2 == 0 else (5, -14)  # one divergence's labels above, the other's below
                for g, xi, yi in zip(gammas, r.mean(0), v.mean(0)):
                    ax.annotate(
                        f"{g:g}", (xi, yi), textcoords="offset points", xytext=offset, fontsize=10, color=colour
                    )
            base_r = [mean(bases[s], "reward", prompts) for s in seeds]
            base_v = [mean(bases[s], key, prompts) for s in seeds]
            ax.plot(base_r, base_v, "ks", ms=5, label="base (per seed)")
            ax.set_xlabel(f"mean reward on {'novel' if prompts else 'held-out'} prompts")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left")
        if has_gap:
            ax = flat[len(panels)]
            levels = np.array(gap["levels"])
            lo, hi = np.array(gap["ci_at_level"]).T
            at = np.array(gap["gap_at_level"])
            margin = margins(summary)["pairwise_distance"]
            ax.axhline(0, color="black", lw=0.8)
            for m in (-margin, margin):
                ax.axhline(m, color="C3", ls=":", lw=1.2)
            ax.fill_between(
                [levels[0], levels[-1]], *gap["ci"], color="C2", alpha=0.2, lw=0, label="mean gap, 95% interval"
            )
            ax.axhline(gap["mean_gap"], xmin=0, xmax=1, color="C2", lw=1)
            ax.errorbar(
                levels, at, yerr=[at - lo, hi - at], fmt="o", color="C2", capsize=3, label="gap per level, 95% interval"
            )
            ax.plot([], [], ":", color="C3", label=f"equivalence margin ±{margin:.3f}")
            ax.set_xlabel("reward level (the compared band)")
            ax.set_ylabel("JS - reverse KL pairwise distance")
            ax.set_title("JS - reverse KL at equal reward: paired 95% bootstrap\n(percentile) over seeds x prompts")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
            low, high = ax.get_ylim()
            ax.set_ylim(low - 0.6 * (high - low), high)  # room for the legend below the intervals
            ax.grid(alpha=0.3)
            ax.legend(loc="lower center")
        for ax in flat[count:]:
            ax.axis("off")
        fig.suptitle(
            f"Reward-diversity frontiers over gamma (point labels), {len(seeds)} seeds: mean (dashed, gamma order), "
            "single seeds (faint)"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
