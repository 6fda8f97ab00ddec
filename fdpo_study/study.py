"""The divergence study: alignment vs diversity of f-DPO fine-tunes of the embedded base model.

From one base model and one set of preference pairs, fine-tune once per divergence (same data order, noise,
hyperparameters and cached reference errors), then sample every model from the same initial noise on the
held-out prompts and measure alignment (mean reward) and diversity (mean pairwise distance and Vendi score of
each prompt's samples). Writes ``study.md`` (table), ``study.json`` and ``study.png`` (reward vs diversity).
"""

from __future__ import annotations

import json
import math
import numbers
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fdiv_kernels.train.data import write_pairs
from fdiv_kernels.train.io import atomic_folder
from fdiv_kernels.train.loop import TrainConfig, cache_reference_errors, derived_seed, train
from fdiv_kernels.train.model import load_pipeline, sample
from fdiv_kernels.train.pipeline import Pipeline

from . import bootstrap as stats
from . import task
from .pretrain import prompts_held_out

BASE_PIPELINE = Path(__file__).parent / "assets" / "base"
# The same pretraining without task.novel_specs(): half of the evaluation prompts are new to it.
NOVEL_BASE = BASE_PIPELINE.parent / "base_novel"
RUNS: tuple[tuple[str, float | None], ...] = (
    ("reverse_kl", None),
    ("forward_kl", None),
    ("js", None),
    ("alpha", 0.3),
    ("alpha", 0.5),
    ("alpha", 0.7),
    ("hellinger", None),
)


@dataclass
class StudyConfig:
    """The study's settings; :data:`QUICK` shrinks every size for a smoke run."""

    output: Path
    base: Path = BASE_PIPELINE
    seed: int = 0
    pairs: int = 1024
    sampling_steps: int = 10
    steps: int = 80
    batch_size: int = 32
    learning_rate: float = 4e-5
    # beta/2 sits inside psi and gamma outside (spec §2): beta * gamma = 5000 keeps reverse KL exactly
    # Diffusion-DPO's beta = 5000, while the other divergences see log-ratios of order 1 (see docs/training.md).
    beta: float = 500.0
    gamma: float = 10.0
    eval_prompts: int = 36  # the held-out prompts, in their fixed order
    eval_samples: int = 12  # per prompt
    progress: bool = True
    label_temperature: float = 0.0  # 0: hard labels from the reward; > 0: Bradley-Terry sampled (see make_pairs)
    reward_model_pairs: int = 0  # > 0: a reward model learned from this many labelled pairs labels the pairs

    def __post_init__(self):
        self.output, self.base = Path(self.output), Path(self.base)
        for name in ("pairs", "sampling_steps", "steps", "batch_size"):
            _check_count(f"--{name.replace('_', '-')}", getattr(self, name))
        _check_count("eval_prompts", self.eval_prompts)
        held_out = len(task.split_specs()[1])
        if self.eval_prompts > held_out:
            raise ValueError(f"eval_prompts must be at most {held_out} (the held-out prompts); got {self.eval_prompts}")
        _check_count("eval_samples", self.eval_samples, low=2)  # diversity compares a prompt's samples in pairs
        _check_count("--reward-model-pairs", self.reward_model_pairs, low=0)
        check_base(self.base)
        for name in ("learning_rate", "beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0; got {value!r}")


def portable_path(path: Path) -> str:
    """A base's path as results record it: a shipped base relative to the package's parent folder (so that a
    frontier's committed runs resume and re-summarise in a checkout anywhere), any other one absolute."""
    path = Path(path).resolve()
    package = Path(__file__).resolve().parent  # fdpo_study/
    return str(path.relative_to(package.parent)) if path.is_relative_to(package) else str(path)


def check_base(base: Path) -> None:
    if not (Path(base) / "model_index.json").is_file():
        raise FileNotFoundError(f"--base {base} is not a pipeline folder (it has no model_index.json)")


def _check_count(flag: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{flag} must be an integer >= {low}; got {value!r}")


QUICK = {"pairs": 64, "steps": 6, "batch_size": 16, "eval_prompts": 8, "eval_samples": 4}


def run_name(divergence: str, alpha: float | None) -> str:
    return divergence if alpha is None else f"{divergence}_{alpha:g}"


def check_make_pairs(
    folder: Path, pairs: int, sampling_steps: int, overwrite: bool = False, reward_model_pairs: int = 0
) -> None:
    """The checks of :func:`make_pairs`'s arguments, before anything is sampled or written."""
    _check_count("--pairs", pairs)
    _check_count("--sampling-steps", sampling_steps)
    _check_count("--reward-model-pairs", reward_model_pairs, low=0)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--output {folder} is a file; the pairs are written as a folder: choose another path")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose another output folder or pass --overwrite")


def make_pairs(
    pipe: Pipeline,
    folder: Path,
    pairs: int,
    seed: int,
    sampling_steps: int,
    overwrite: bool = False,
    progress: bool = True,
    label_temperature: float = 0.0,
    reward_model_pairs: int = 0,
) -> Path:
    """Sample two images per training prompt from ``pipe``, label them, save Pick-a-Pic.

    Labels come from the task reward. ``label_temperature`` 0: the higher reward wins (hard labels; equal rewards
    are a tie). T > 0: Bradley-Terry sampling, image 0 wins with probability sigmoid((r0 - r1) / T), from its own
    seeded generator, so that the labels are as noisy as human ones (the programmatic reward stays the gold
    standard for evaluation). ``reward_model_pairs`` N > 0: the task reward labels N other pairs instead (same
    rule), a :class:`reward_model.RewardModel` is fitted to them, and its scores label these pairs (the higher
    wins); ``learned_reward_0/1`` record them beside the task's ``reward_0/1``.
    """
    check_label_temperature(label_temperature)
    check_make_pairs(folder, pairs, sampling_steps, overwrite, reward_model_pairs)
    captions, images, r0, r1 = _sample_pairs(pipe, pairs, seed, "pairs", sampling_steps, progress)
    label_0, p_0 = _labels(r0, r1, label_temperature, seed, "labels")
    extra = {
        "reward_0": r0.tolist(),
        "reward_1": r1.tolist(),
        "p_label_0": p_0.tolist(),
        "label_temperature": [float(label_temperature)] * pairs,
    }
    if reward_model_pairs:
        from . import reward_model

        rm_captions, rm_images, rm_r0, rm_r1 = _sample_pairs(
            pipe, reward_model_pairs, seed, "reward model pairs", sampling_steps, progress
        )
        rm_label, _ = _labels(rm_r0, rm_r1, label_temperature, seed, "reward model labels")
        n = reward_model_pairs
        model = reward_model.fit(rm_images[:n], rm_images[n:], rm_captions, rm_label, seed)
        learned = reward_model.score(model, images, captions + captions)
        l0, l1 = learned[:pairs], learned[pairs:]
        label_0 = p_0 = _winner(l0, l1)
        extra.update(
            p_label_0=p_0.tolist(),
            learned_reward_0=l0.tolist(),
            learned_reward_1=l1.tolist(),
            reward_model_pairs=[reward_model_pairs] * pairs,
        )
    return write_pairs(
        folder, captions, images[:pairs], images[pairs:], label_0.tolist(), extra=extra, overwrite=overwrite
    )


def _sample_pairs(
    pipe: Pipeline, pairs: int, seed: int, stream: str, sampling_steps: int, progress: bool
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images of each of ``pairs`` training prompts drawn from the seeded ``stream``; returns the captions, the
    images [2 * pairs] (all first images, then all second ones, as saved: 8-bit) and their task rewards r0, r1."""
    train_specs, _ = task.split_specs()
    generator = torch.Generator().manual_seed(derived_seed(seed, stream, 0))
    specs = [train_specs[i] for i in torch.randint(len(train_specs), (pairs,), generator=generator)]
    captions = [s.caption for s in specs]
    side = pipe.resolution // pipe.vae_scale
    noise = torch.randn(2 * pairs, pipe.unet.config.in_channels, side, side, generator=generator)
    with tqdm(total=2 * pairs, desc=f"sample {stream}", disable=not progress, dynamic_ncols=True) as bar:
        images = sample(pipe, captions + captions, noise, sampling_steps, progress=bar)
    images = (images * 255).round() / 255  # score exactly what is saved (8-bit PNG)
    scores = task.reward(images, specs + specs)["reward"]
    return captions, images, scores[:pairs], scores[pairs:]


def _winner(score_0: torch.Tensor, score_1: torch.Tensor) -> torch.Tensor:
    """Hard labels: 1 where image 0 scores higher, 0 where lower, 0.5 (a tie, dropped in training) where equal."""
    return torch.where(score_0 > score_1, 1.0, torch.where(score_0 < score_1, 0.0, 0.5))


def _labels(r0: torch.Tensor, r1: torch.Tensor, temperature: float, seed: int, stream: str):
    """(label_0, P(label_0 = 1)) from the task rewards: hard at temperature 0, else Bradley-Terry sampled."""
    if temperature == 0:
        return _winner(r0, r1), _winner(r0, r1)
    p_0 = torch.sigmoid((r0 - r1).double() / temperature).float()
    return torch.bernoulli(p_0, generator=torch.Generator().manual_seed(derived_seed(seed, stream, 0))), p_0


def label_agreement(folder: Path) -> dict:
    """How often a pairs folder's labels agree with the task reward's ordering (pairs with a strict winner by both)."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(folder) / "pairs.parquet").to_pydict()
    r0, r1, label = (torch.tensor(table[k]) for k in ("reward_0", "reward_1", "label_0"))
    decided = (r0 != r1) & (label != 0.5)
    agree = (label[decided] == (r0[decided] > r1[decided]).float()).float().mean().item() if decided.any() else None
    learned = "reward_model_pairs" in table
    return {
        "labeller": f"learned reward model ({table['reward_model_pairs'][0]} pairs)" if learned else "task reward",
        "label_temperature": table["label_temperature"][0],
        "agreement_with_reward": agree,
        "pairs_compared": int(decided.sum()),
    }


def check_label_temperature(value) -> None:
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"--label-temperature must be a finite number >= 0 (0: hard labels); got {value!r}")


# Normalisation of the object-attribute spreads: each in units of the reward's tolerance for that attribute.
_SPREAD_UNITS = {
    "colour": task.COLOUR_TOLERANCE,
    "position": task.POSITION_TOLERANCE,
    "size": task.SIZE_TOLERANCE,
    "shape": task.SHAPE_MARGIN,
}


def evaluate(
    pipe: Pipeline,
    specs: list[task.Spec],
    samples: int,
    seed: int,
    sampling_steps: int,
    desc: str = "evaluate",
    progress: bool = True,
) -> tuple[dict, torch.Tensor]:
    """Alignment and diversity of ``samples`` images per prompt, from noise fixed by ``seed`` (shared by models).

    Returns the metrics (mean and standard error over prompts) and the images.
    """
    generator = torch.Generator().manual_seed(derived_seed(seed, "eval", 0))
    repeated = [s for s in specs for _ in range(samples)]
    side = pipe.resolution // pipe.vae_scale
    noise = torch.randn(len(repeated), pipe.unet.config.in_channels, side, side, generator=generator)
    with tqdm(total=len(repeated), desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        images = sample(pipe, [s.caption for s in repeated], noise, sampling_steps, progress=bar)
    scores = task.reward(images, repeated)
    grouped = images.view(len(specs), samples, *images.shape[1:])
    per_prompt = {
        "reward": scores["reward"].view(len(specs), samples).mean(1),
        "fidelity": scores["fidelity"].view(len(specs), samples).mean(1),
        "style": scores["style"].view(len(specs), samples).mean(1),
        "pairwise_distance": task.pairwise_distance(grouped),
        "vendi": task.vendi_score(grouped),
    }
    # Diversity by what varies, from the reward's own detector: the object's attributes (what the prompt pins
    # down up to jitter) apart from the background (what the prompt leaves free and the style term collapses).
    spread = task.attribute_spread(grouped)
    for name in ("colour", "position", "size", "shape", "background"):
        per_prompt[f"{name}_spread"] = spread[name]
    per_prompt["object_spread"] = sum(spread[k] / unit for k, unit in _SPREAD_UNITS.items()) / len(_SPREAD_UNITS)
    # Means over prompts with their standard errors (prompts are the independent units); the per-prompt values
    # are kept for paired comparisons between models (all models share prompts and initial noise).
    metrics = {
        k: {"mean": v.mean().item(), "se": _standard_error(v), "per_prompt": v.tolist()} for k, v in per_prompt.items()
    }
    return metrics, images


def prompt_groups(base: Path, captions: list[str]) -> dict[str, list[int]]:
    """Indices of the evaluation prompts that ``base`` saw in pretraining (``seen``) and never saw (``novel``), from
    its ``pretraining.json``; empty when it saw every one of them or does not record what it saw."""
    held = prompts_held_out(base) or set()
    novel = [i for i, caption in enumerate(captions) if caption in held]
    if not novel:
        return {}
    seen = [i for i, caption in enumerate(captions) if caption not in held]
    return {"seen": seen, "novel": novel} if seen else {"novel": novel}


def _standard_error(values: torch.Tensor) -> float:
    return (values.std() / len(values) ** 0.5).item()


def paired_differences(rows: list[dict], baseline: str = "reverse_kl") -> list[dict]:
    """Per model: mean and standard error over prompts of (model - baseline), for reward and pairwise distance."""
    base = next(r for r in rows if r["model"] == baseline)
    out = []
    for row in rows:
        if row["model"] == baseline:
            continue
        diff = {}
        for key in ("reward", "pairwise_distance"):
            d = torch.tensor(row[key]["per_prompt"]) - torch.tensor(base[key]["per_prompt"])
            ci = stats.paired([row[key]["per_prompt"]], [base[key]["per_prompt"]]).as_dict()["ci"]
            diff[key] = {"mean": d.mean().item(), "se": _standard_error(d), "ci": ci}
        out.append({"model": row["model"], **diff})
    return out


def pareto_front(rows: list[dict]) -> list[bool]:
    """Whether each row is not dominated (another row at least as good in reward and diversity, better in one)."""
    points = [(r["reward"]["mean"], r["pairwise_distance"]["mean"]) for r in rows]
    return [not any(a >= p[0] and b >= p[1] and (a, b) != p for a, b in points) for p in points]


def run_study(cfg: StudyConfig, overwrite: bool = False, runs: tuple = RUNS) -> dict:
    """Run the whole study into ``cfg.output`` (written aside, renamed into place at the end); returns the results.
    ``runs``: the (divergence, alpha) fine-tunes, reverse KL included (the baseline of the paired differences)."""
    started = time.perf_counter()
    check_label_temperature(cfg.label_temperature)
    timings: dict[str, float] = {}
    _, held_out = task.split_specs()
    eval_specs = held_out[: cfg.eval_prompts]
    # The fine-tunes' flags (beta, gamma, ...) are checked here, before minutes of sampling.
    train_cfg = TrainConfig(
        pipeline=cfg.base,
        dataset=cfg.output / "pairs",
        output=cfg.output / "runs",
        max_steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        beta=cfg.beta,
        gamma=cfg.gamma,
        seed=cfg.seed,
        log_every=max(1, cfg.steps // 10),
        cpu=True,
        progress=cfg.progress,
    )
    with atomic_folder(cfg.output, overwrite=overwrite) as out:
        base = load_pipeline(cfg.base)
        tick = time.perf_counter()
        make_pairs(
            base,
            out / "pairs",
            cfg.pairs,
            cfg.seed,
            cfg.sampling_steps,
            progress=cfg.progress,
            label_temperature=cfg.label_temperature,
            reward_model_pairs=cfg.reward_model_pairs,
        )
        timings["make_pairs"] = time.perf_counter() - tick

        train_cfg = replace(train_cfg, dataset=out / "pairs", output=out / "runs")
        tick = time.perf_counter()
        ref_errors = cache_reference_errors(train_cfg, out / "ref_errors.safetensors")
        timings["reference_errors"] = time.perf_counter() - tick

        tick = time.perf_counter()
        metrics, base_images = evaluate(
            base, eval_specs, cfg.eval_samples, cfg.seed, cfg.sampling_steps, "evaluate base", cfg.progress
        )
        rows = [{"model": "base", "divergence": None, "alpha": None, **metrics}]
        timings["evaluate base"] = time.perf_counter() - tick
        grids = {"base": base_images}
        for divergence, alpha in tqdm(runs, desc="study", disable=not cfg.progress, dynamic_ncols=True):
            name = run_name(divergence, alpha)
            tick = time.perf_counter()
            result = train(
                replace(
                    train_cfg,
                    divergence=divergence,
                    alpha=alpha or 0.5,
                    output=out / "runs" / name,
                    ref_errors=ref_errors,
                )
            )
            timings[f"train {name}"] = time.perf_counter() - tick
            tick = time.perf_counter()
            tuned = load_pipeline(cfg.base, unet=out / "runs" / name / "unet")
            metrics, grids[name] = evaluate(
                tuned, eval_specs, cfg.eval_samples, cfg.seed, cfg.sampling_steps, f"evaluate {name}", cfg.progress
            )
            timings[f"evaluate {name}"] = time.perf_counter() - tick
            last = result.records[-1]
            rows.append(
                {
                    "model": name,
                    "divergence": divergence,
                    "alpha": alpha,
                    **metrics,
                    "final_train": {k: last[k] for k in ("loss", "implicit_acc", "reward_margin")},
                }
            )
        # One seed: the flags and intervals are over prompts only (stats.bootstrap with S = 1).
        flags = stats.pareto_flags(
            [[r["reward"]["per_prompt"]] for r in rows], [[r["pairwise_distance"]["per_prompt"]] for r in rows]
        )
        for row, optimal, flag in zip(rows, pareto_front(rows), flags):
            row["pareto_optimal"] = optimal
            row["pareto"] = flag
        differences = paired_differences(rows)
        timings["total"] = time.perf_counter() - started
        captions = [s.caption for s in eval_specs]
        results = {
            "config": {**asdict(cfg), "output": str(cfg.output), "base": portable_path(cfg.base)},
            "eval_prompts": captions,
            "prompt_groups": prompt_groups(cfg.base, captions),
            "labels": label_agreement(out / "pairs"),
            "rows": rows,
            "paired_vs_reverse_kl": differences,
            "timings_s": timings,
            "machine": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
            },
        }
        (out / "study.json").write_text(json.dumps(results, indent=1))
        (out / "study.md").write_text(markdown_table(results))
        plot(results, out / "study.png")
        save_sample_grid(grids, [s.caption for s in eval_specs[:4]], cfg.eval_samples, out / "samples.png")
    return results


def markdown_table(results: dict) -> str:
    """The study table: one row per model, means over held-out prompts ± standard error over prompts (one seed)."""

    def cell(metric: dict, digits: int = 3) -> str:
        return f"{metric['mean']:.{digits}f} ± {metric['se']:.{digits}f}"

    def flag(row: dict) -> str:
        return row.get("pareto") or ("yes" if row["pareto_optimal"] else "no")

    pareto_note = (
        "Pareto: yes = on the front; no = dominated, significantly (paired 95% bootstrap over prompts); tie =\n"
        "dominated within noise."
        if any("pareto" in r for r in results["rows"])
        else "Pareto: point estimates only (this file predates per-prompt values): yes = no other row is at least as\n"
        "good in both reward and pairwise distance."
    )
    lines = [
        "| model | reward (alignment) | fidelity | style | pairwise distance | Vendi score | Pareto "
        "| final implicit_acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        acc = f"{row['final_train']['implicit_acc']:.2f}" if "final_train" in row else "-"
        lines.append(
            f"| {row['model']} | {cell(row['reward'])} | {cell(row['fidelity'])} | {cell(row['style'])} | "
            f"{cell(row['pairwise_distance'])} | {cell(row['vendi'], 2)} | {flag(row)} | {acc} |"
        )
    lines += [
        "",
        "One seed: every ± is the standard error over the held-out prompts (evaluation noise of one trained model),",
        "not run-to-run variation; `study --frontier` gives intervals over seeds x prompts.",
        pareto_note,
    ]
    if "object_spread" in results["rows"][0]:
        lines += [
            "",
            "Diversity by what varies (the reward's detector; object spread: mean of colour, position, size and shape",
            "spreads, each in units of the reward's tolerance for it; background: RGB distance):",
            "",
            "| model | object spread | colour | position | size | shape | background spread |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in results["rows"]:
            lines.append(
                f"| {row['model']} | {cell(row['object_spread'])} | "
                + " | ".join(cell(row[f"{k}_spread"]) for k in ("colour", "position", "size", "shape"))
                + f" | {cell(row['background_spread'])} |"
            )
    groups = results.get("prompt_groups") or {}
    if groups:
        sizes = ", ".join(f"{len(v)} {k}" for k, v in groups.items())
        lines += [
            "",
            f"By prompt group ({sizes}): novel prompts were never seen by the base model's pretraining (nor by the",
            "preference pairs); seen ones only by pretraining. Mean ± standard error over the group's prompts:",
            "",
            "| model | " + " | ".join(f"{m} ({g})" for m in ("reward", "pairwise distance") for g in groups) + " |",
            "|---|" + "---|" * (2 * len(groups)),
        ]
        for row in results["rows"]:
            cells = [
                cell(_subset(row[key], indices))
                for key in ("reward", "pairwise_distance")
                for indices in groups.values()
            ]
            lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences from reverse_kl (Diffusion-DPO), mean ± standard error over the same prompts and noise",
        "(one seed), with the 95% bootstrap interval over prompts:",
        "",
        "| model | Δ reward | Δ pairwise distance |",
        "|---|---|---|",
    ]

    def diff_cell(d: dict) -> str:
        if d["se"] != d["se"]:  # NaN: a file without per-prompt values, only the means differ
            return f"{d['mean']:+.3f} (of the means)"
        ci = f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if "ci" in d else ""
        return f"{d['mean']:+.3f} ± {d['se']:.3f}{ci}"

    for diff in results["paired_vs_reverse_kl"]:
        lines.append(f"| {diff['model']} | {diff_cell(diff['reward'])} | {diff_cell(diff['pairwise_distance'])} |")
    cfg = results["config"]
    labels = results.get("labels")
    if labels:
        agree = labels["agreement_with_reward"]
        lines += [
            "",
            f"Labels: {labels['labeller']}, temperature {labels['label_temperature']:g}; they agree with the task "
            f"reward's ordering on {'-' if agree is None else f'{agree:.1%}'} of {labels['pairs_compared']} pairs.",
        ]
    lines.append("")
    lines.append(
        f"{len(results['eval_prompts'])} held-out prompts x {cfg['eval_samples']} samples ({cfg['sampling_steps']} "
        f"DDIM steps); {cfg['pairs']} preference pairs; {cfg['steps']} steps x {cfg['batch_size']} pairs, "
        f"lr {cfg['learning_rate']:g}, beta {cfg['beta']:g}, gamma {cfg['gamma']:g}; seed {cfg['seed']}; "
        f"total {results['timings_s']['total']:.0f} s."
    )
    return "\n".join(lines) + "\n"


def _subset(metric: dict, indices: list[int]) -> dict:
    values = torch.tensor([metric["per_prompt"][i] for i in indices])
    return {"mean": values.mean().item(), "se": _standard_error(values) if len(values) > 1 else float("nan")}


def plot(results: dict, path: Path) -> None:
    """Reward vs each diversity measure, one point per model with its 95% bootstrap interval over prompts; and the
    paired differences from reverse KL with their paired 95% intervals (what the significance calls rest on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def interval(values: list) -> tuple[float, float]:
        e = stats.bootstrap([values])
        return e.mean - e.low, e.high - e.mean

    rows = results["rows"]
    markers = "sovD^<>ph"
    with plt.rc_context({"font.size": 12, "axes.titlesize": 12, "legend.fontsize": 11}):
        fig, axes = plt.subplots(2, 2, figsize=(12.4, 9.6))
        for ax, key, label in (
            (axes[0][0], "pairwise_distance", "mean pairwise distance (per-pixel RMS)"),
            (axes[0][1], "vendi", "Vendi score (effective distinct samples)"),
        ):
            for row, marker in zip(rows, markers):
                x_err, y_err = (np.array(interval(row[k]["per_prompt"]))[:, None] for k in ("reward", key))
                ax.errorbar(
                    row["reward"]["mean"],
                    row[key]["mean"],
                    xerr=x_err,
                    yerr=y_err,
                    fmt=marker,
                    color="black" if row["model"] == "base" else None,
                    capsize=2,
                    label=row["model"],
                )
            ax.set_xlabel("mean reward on held-out prompts (alignment)")
            ax.set_ylabel(label)
            ax.set_title("each model, 95% interval over prompts (unpaired)")
            ax.grid(alpha=0.3)
        ax = axes[1][0]
        baseline = next(r for r in rows if r["model"] == "reverse_kl")
        for row, marker in zip(rows, markers):
            if row["model"] in ("base", "reverse_kl"):
                continue
            diffs = [
                stats.paired([row[k]["per_prompt"]], [baseline[k]["per_prompt"]])
                for k in ("reward", "pairwise_distance")
            ]
            ax.errorbar(
                diffs[0].mean,
                diffs[1].mean,
                xerr=[[diffs[0].mean - diffs[0].low], [diffs[0].high - diffs[0].mean]],
                yerr=[[diffs[1].mean - diffs[1].low], [diffs[1].high - diffs[1].mean]],
                fmt=marker,
                color=f"C{rows.index(row) - 1}",
                capsize=2,
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("Δ reward vs reverse_kl")
        ax.set_ylabel("Δ pairwise distance vs reverse_kl")
        ax.set_title("paired differences, 95% bootstrap interval over prompts")
        ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        axes[1][1].axis("off")
        axes[1][1].legend(handles, labels, loc="center")
        seed = results["config"]["seed"]
        fig.suptitle(
            f"f-DPO on the embedded task, seed {seed} only (one trained model per divergence):\n"
            f"every interval is over the {len(results['eval_prompts'])} held-out prompts, not over runs"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def save_sample_grid(
    grids: dict[str, torch.Tensor], captions: list[str], samples: int, path: Path, shown: int = 6
) -> None:
    """One row per model: ``shown`` samples of each of the first prompts (``captions``); same noise per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = len(captions)
    rows = []
    for images in grids.values():
        per_prompt = images[: prompts * samples].view(prompts, samples, *images.shape[1:])[:, :shown]
        rows.append(torch.cat(list(per_prompt.flatten(0, 1).permute(0, 2, 3, 1)), dim=1))  # [H, n * W, 3]
    mosaic = torch.cat(rows).numpy()
    side = next(iter(grids.values())).shape[-1]
    fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 40 + 1.5, mosaic.shape[0] / 40 + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([side * (i + 0.5) for i in range(len(grids))], list(grids))
    ax.set_xticks(
        [side * shown * (i + 0.5) for i in range(prompts)],
        [c.replace(" at the ", "\nat the ") for c in captions],
        fontsize=7,
    )
    ax.tick_params(length=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
