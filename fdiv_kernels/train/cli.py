"""``fdpo-train`` / ``python -m fdiv_kernels.train``: ref-errors, train.

The divergence study's commands (pretrain, make-pairs, study, study-report) are ``python -m fdpo_study``, a
package of the repository that the wheel does not carry.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .. import DIVERGENCES
from .io import OutputWriteError

_USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, ImportError, OutputWriteError)
# Moved to the study's own CLI; named here so that the old spelling says where they went.
STUDY_COMMANDS = ("pretrain", "make-pairs", "study", "study-report")


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdpo-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the trained model over the launched processes with FSDP2 (fully_shard, one unit per block) "
        "instead of DDP; checkpoints and the final unet/ hold the full weights",
    )
    return parser


def _config_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "config")}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in STUDY_COMMANDS:
        parser.exit(2, f"fdpo-train: error: {argv[0]} is the study's command: python -m fdpo_study {argv[0]}\n")
    if argv[:1] == ["train"]:
        _apply_config(parser, argv)
    return run_command(parser, _run, argv)


def run_command(parser: argparse.ArgumentParser, run, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and ``run`` it: bad input exits 2 with one line, SIGTERM through the cleanup (Ctrl-C's
    path). Shared with the study's CLI (``python -m fdpo_study``)."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    previous = _exit_on_sigterm()
    try:
        return run(args)
    except _USER_ERRORS as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
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
    if args.command == "ref-errors":
        from .loop import TrainConfig, cache_reference_errors

        # The data flags are a subset of train's; the cache file stands in for the run folder.
        cache_reference_errors(TrainConfig(**_config_args(args)), args.output)
    elif args.command == "train":
        from .loop import TrainConfig, train

        train(TrainConfig(**_config_args(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
