"""``fdpo-train`` / ``python -m fdiv_kernels.train``: pretrain, make-pairs, ref-errors, train, study."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .. import DIVERGENCES
from .io import OutputWriteError

_USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, ImportError, OutputWriteError)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """Flags that fix the run's data stream: shared by ``train`` and ``ref-errors`` (a cache must match them)."""
    p.add_argument("--pipeline", type=Path, required=True, help="local diffusers pipeline folder (with unet/)")
    p.add_argument(
        "--dataset",
        type=Path,
        required=True,
        help="Pick-a-Pic table: .parquet/.jsonl file, or a folder of parquet shards or one jsonl",
    )
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per micro-step, over all processes")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the UNet's native size)")
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction", "flow"],
        default=None,
        help="training target (default: the pipeline scheduler's)",
    )
    p.add_argument(
        "--weighting-scheme",
        choices=["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"],
        default="none",
        help="flow targets, as diffusers' SD3 scripts: logit_normal/mode draw timesteps "
        "from that density, cosmap/sigma_sqrt weight them (pair_weight); none: uniform",
    )
    p.add_argument("--logit-mean", type=float, default=0.0, help="mean of --weighting-scheme logit_normal")
    p.add_argument("--logit-std", type=float, default=1.0, help="std of --weighting-scheme logit_normal")
    p.add_argument("--mode-scale", type=float, default=1.29, help="scale of --weighting-scheme mode")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0, help="fixes data order, noise and timesteps")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is available")
    p.add_argument("--dataloader-workers", type=int, default=0)
    p.add_argument(
        "--no-check-images",
        dest="check_images",
        action="store_false",
        help="skip the up-front check that every image opens and verifies (huge datasets)",
    )
    p.add_argument(
        "--data-backend",
        choices=["auto", "memory", "datasets"],
        default="auto",
        help="table reader: memory (whole table in memory), datasets (memory-mapped Arrow through the "
        "datasets library: bounded memory; .parquet or .arrow shards), auto (default): datasets for "
        ".arrow shards and parquet tables over 64 MiB, memory otherwise; see docs/training.md",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")


REWARD_MODEL_HELP = (
    "label the pairs with a small reward model fitted to this many other pairs labelled by the task reward "
    "(0, default: the task reward labels them); the task reward stays the judge"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdpo-train", description=__doc__)
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

    p = sub.add_parser("ref-errors", help="cache the reference model's errors over a run's data stream")
    _add_data_flags(p)
    p.add_argument("--output", type=Path, required=True, help="safetensors file to write")

    p = sub.add_parser("train", help="f-DPO fine-tuning of a pipeline's UNet (accelerate launch for several processes)")
    _add_data_flags(p)
    p.add_argument("--output", type=Path, required=True, help="run folder: log.jsonl, checkpoint-N/, unet/")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML or JSON file of settings (flag names as keys; a run's train_config.json repeats it); "
        "flags on the command line override it",
    )
    p.add_argument(
        "--report-to",
        choices=["none", "tensorboard", "wandb"],
        default="none",
        help="also log to these Accelerate trackers (log.jsonl is always written)",
    )
    p.add_argument("--divergence", default="reverse_kl", help=f"one of {', '.join(DIVERGENCES)}")
    p.add_argument("--alpha", type=float, default=0.5, help="alpha of --divergence alpha, in (0, 1)")
    p.add_argument(
        "--beta",
        type=float,
        default=5000.0,
        help="Diffusion-DPO beta, original/SDXL convention (diffusers' SD1.5 script: pass twice its value)",
    )
    p.add_argument("--gamma", type=float, default=1.0, help="outer scale of the pair logit")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument(
        "--ref-errors",
        type=Path,
        default=None,
        help="cached reference errors (from ref-errors) instead of a frozen reference UNet",
    )
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-weight-decay", type=float, default=1e-2)
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=0, help="0: no checkpoints, only the final unet/")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--xformers", action="store_true", help="xformers attention (CUDA only)")
    p.add_argument(
        "--log-grad-weights",
        action="store_true",
        help="also log batch means of the gradient weights push_w, push_l (fdiv_kernels.gradient_field)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train LoRA adapters of this rank (peft; to_q/to_k/to_v/to_out.0) instead of the whole model; "
        "the reference is the model with adapters disabled, the output lora/ (diffusers' LoRA format)",
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: --lora-rank, scale 1)")
    p.add_argument(
        "--snr-gamma",
        type=float,
        default=None,
        help="Min-SNR timestep weighting (epsilon/v targets): pair weight min(SNR, gamma)/SNR; e.g. 5",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, about a third more compute",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (and the reference copy)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")

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

    p = sub.add_parser(
        "study-report", help="regenerate the study tables in README.md and docs/training.md from results/study/*.json"
    )
    p.add_argument("--results", type=Path, default=None, help="folder of the study JSON (default results/study)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
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


def _config_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "config")}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        _apply_config(parser, argv)
    args = parser.parse_args(argv)
    previous = _exit_on_sigterm()
    try:
        return _run(args)
    except _USER_ERRORS as err:
        parser.exit(2, f"fdpo-train {args.command}: error: {err}\n")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """Make SIGTERM (``kill``, ``timeout``, a job scheduler) exit like Ctrl-C does, through the cleanup that removes
    half-written temporary folders, instead of ending the process where it stands. Returns the old handler."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``train --config FILE``: the file's settings become the train flags' defaults before the real parse."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    path = pre.parse_known_args(argv[1:])[0].config
    if path is None:
        return
    from .config import apply_config_file

    train_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    try:
        apply_config_file(train_parser, path)
    except _USER_ERRORS as err:
        parser.exit(2, f"fdpo-train train: error: {err}\n")


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
        from .model import load_pipeline
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
    elif args.command == "ref-errors":
        from .loop import TrainConfig, cache_reference_errors

        # The data flags are a subset of train's; the cache file stands in for the run folder.
        cache_reference_errors(TrainConfig(**_config_args(args)), args.output)
    elif args.command == "train":
        from .loop import TrainConfig, train

        train(TrainConfig(**_config_args(args)))
    elif args.command == "study" and args.frontier:
        return _frontier(args)
    elif args.command == "study-report":
        from .report import RESULTS, regenerate

        changed = regenerate(args.results or RESULTS, check=args.check)
        for path in changed:
            print(("out of date: " if args.check else "wrote ") + path)
        return 1 if args.check and changed else 0
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
