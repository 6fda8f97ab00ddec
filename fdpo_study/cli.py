"""``python -m fdpo_study``: the divergence study's commands (pretrain, make-pairs, study, study-report,
fingerprint).

The study is a research harness of this repository, not part of the kernel wheel: it runs from a clone
(``make study``). Its fine-tunes go through the training loop of the wheel, ``fdiv_kernels.train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fdiv_kernels.train.cli import run_command

REWARD_MODEL_HELP = (
    "label the pairs with a small reward model fitted to this many other pairs labelled by the task reward "
    "(0, default: the task reward labels them); the task reward stays the judge"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fdpo_study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train the embedded base model (UNet + text encoder) on the rendered task")
    p.add_argument("--output", type=Path, required=True, help="pipeline folder to write")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hold-out-novel",
        action="store_true",
        help="leave the 18 'novel' evaluation prompts out of pretraining (the shipped assets/base_novel)",
    )
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("make-pairs", help="sample pairs from a base model, label them with the task reward")
    p.add_argument("--output", type=Path, required=True, help="dataset folder to write (Pick-a-Pic schema)")
    p.add_argument("--pipeline", type=Path, default=None, help="base pipeline (default: the embedded one)")
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--sampling-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--label-temperature",
        type=float,
        default=0.0,
        help="Bradley-Terry label noise (0: the higher reward wins); see docs/training.md",
    )
    p.add_argument("--reward-model-pairs", type=int, default=0, help=REWARD_MODEL_HELP)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("study", help="the divergence study on the embedded task (alignment vs diversity)")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder to write: study.md, study.json, study.png, the runs (default fdpo-study[-quick])",
    )
    p.add_argument("--quick", action="store_true", help="a smoke-test sized study (under 3 minutes)")
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="base pipeline from `pretrain` (default: the embedded one, assets/base; assets/base_novel has "
        "never seen half of the evaluation prompts)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=None, help="inner beta (default 500; see docs/training.md)")
    p.add_argument("--gamma", type=float, default=None, help="outer scale of the logit (default 10)")
    p.add_argument(
        "--label-temperature",
        type=float,
        default=None,
        help="Bradley-Terry label noise: image 0 wins with probability sigmoid((r0 - r1) / T); "
        "0 (default): the higher reward wins",
    )
    p.add_argument("--reward-model-pairs", type=int, default=None, help=REWARD_MODEL_HELP)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--frontier",
        action="store_true",
        help="reward-diversity frontiers: each divergence at each --gammas, for each --seeds; resumable "
        "(default output fdpo-frontier[-quick]; see docs/training.md, Frontiers)",
    )
    p.add_argument(
        "--divergences",
        type=_names,
        default=None,
        help="--frontier: comma-separated divergences (default reverse_kl,js)",
    )
    p.add_argument(
        "--gammas",
        type=_floats,
        default=None,
        help="--frontier: comma-separated regularisation strengths gamma (default 0.3,1,3,10,30,100)",
    )
    p.add_argument("--seeds", type=_ints, default=None, help="--frontier: comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="--frontier: summarise the finished results in --output, train nothing",
    )
    p.add_argument("--keep-runs", action="store_true", help="--frontier: keep each fine-tuned UNet")

    p = sub.add_parser("study-report", help="regenerate the study tables in docs/training.md from results/study/*.json")
    p.add_argument("--results", type=Path, default=None, help="folder of the study JSON (default results/study)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")

    p = sub.add_parser(
        "fingerprint",
        help="the study's pipeline shrunk to seconds, against the numbers committed beside the results "
        "(results/study/fingerprint.json): exit 1 if the code's numbers moved",
    )
    p.add_argument("--write", action="store_true", help="record today's numbers instead of comparing")
    return parser


def _csv(text: str, kind, what: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}; got {text!r}") from None
    if not values or any(v == "" for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}; got {text!r}")
    return values


def _names(text: str) -> tuple:
    return _csv(text, str.strip, "names")


def _floats(text: str) -> tuple:
    return _csv(text, float, "numbers")


def _ints(text: str) -> tuple:
    return _csv(text, int, "integers")


def _run(args: argparse.Namespace) -> int:
    if args.command == "pretrain":
        from .pretrain import PretrainConfig, pretrain

        pretrain(
            PretrainConfig(
                output=args.output,
                steps=args.steps,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                seed=args.seed,
                hold_out_novel=args.hold_out_novel,
            ),
            overwrite=args.overwrite,
        )
        print(f"wrote the base pipeline to {args.output}")
    elif args.command == "make-pairs":
        from fdiv_kernels.train.model import load_pipeline

        from .study import BASE_PIPELINE, check_make_pairs, make_pairs

        check_make_pairs(args.output, args.pairs, args.sampling_steps, args.overwrite, args.reward_model_pairs)
        pipe = load_pipeline(args.pipeline or BASE_PIPELINE)
        make_pairs(
            pipe,
            args.output,
            args.pairs,
            args.seed,
            args.sampling_steps,
            overwrite=args.overwrite,
            label_temperature=args.label_temperature,
            reward_model_pairs=args.reward_model_pairs,
        )
        print(f"wrote {args.pairs} labelled pairs to {args.output} (pairs.parquet + images/)")
    elif args.command == "study" and args.frontier:
        return _frontier(args)
    elif args.command == "study-report":
        from .study_report import RESULTS, regenerate

        changed = regenerate(args.results or RESULTS, check=args.check)
        for path in changed:
            print(("out of date: " if args.check else "wrote ") + path)
        return 1 if args.check and changed else 0
    elif args.command == "fingerprint":
        from . import fingerprint

        if args.write:
            fingerprint.write()
            print(f"wrote {fingerprint.FINGERPRINT}")
            return 0
        moved = fingerprint.check()
        for line in moved:
            print(line)
        print(f"{fingerprint.REGENERATE}" if moved else "the committed study results match today's code")
        return 1 if moved else 0
    elif args.command == "study":
        from .study import QUICK, StudyConfig, run_study

        only = [f for f in ("divergences", "gammas", "seeds") if getattr(args, f) is not None]
        only += [f for f in ("report_only", "keep_runs") if getattr(args, f)]
        if only:
            raise ValueError(f"--{only[0].replace('_', '-')} needs --frontier")

        output = args.output or Path("fdpo-study-quick" if args.quick else "fdpo-study")
        loss = {
            k: getattr(args, k)
            for k in ("base", "beta", "gamma", "label_temperature", "reward_model_pairs")
            if getattr(args, k) is not None
        }
        cfg = StudyConfig(
            output=output, seed=args.seed, progress=args.progress, **loss, **(QUICK if args.quick else {})
        )
        results = run_study(cfg, overwrite=args.overwrite)
        print((output / "study.md").read_text())
        print(f"wrote {output}/study.md, study.json, study.png in {results['timings_s']['total']:.0f} s")
    return 0


def _frontier(args: argparse.Namespace) -> int:
    """``study --frontier``: the settings of the study (``--quick`` sizes too), swept over gamma and seeds."""
    from .frontier import FrontierConfig, estimate_seconds, run_frontier, summarise
    from .study import QUICK

    if args.gamma is not None:
        raise ValueError("--gamma is the swept strength under --frontier: pass --gammas")
    if args.overwrite:
        raise ValueError("--frontier resumes into --output and never overwrites: remove the folder to start afresh")
    if args.seed != 0:
        raise ValueError("--frontier takes --seeds (a list), not --seed")
    if args.reward_model_pairs is not None:
        raise ValueError("--reward-model-pairs is a setting of the single study, not of --frontier (yet)")
    sizes = {k: v for k, v in QUICK.items()} if args.quick else {}
    settings = {
        k: getattr(args, k)
        for k in ("divergences", "gammas", "seeds", "base", "beta", "label_temperature")
        if getattr(args, k) is not None
    }
    output = args.output or Path("fdpo-frontier-quick" if args.quick else "fdpo-frontier")
    cfg = FrontierConfig(output=output, progress=args.progress, keep_runs=args.keep_runs, **settings, **sizes)
    if args.report_only:
        if not (output / "frontier_config.json").is_file():
            raise FileNotFoundError(f"{output} holds no frontier (no frontier_config.json)")
        summary = summarise(cfg)
    else:
        if args.progress:
            size = f"{len(cfg.divergences)} divergences x {len(cfg.gammas)} gammas x {len(cfg.seeds)} seeds"
            print(
                f"frontier of {size}: about {estimate_seconds(cfg) / 60:.0f} min from scratch on 2 quiet CPU cores",
                flush=True,
            )
        summary = run_frontier(cfg)
    print((output / "frontier.md").read_text())
    complete = len(summary["complete_seeds"])
    print(f"wrote {output}/frontier.md, frontier.json, frontier.png ({complete} complete seeds)")


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
