"""The f-DPO fine-tuning loop: a diffusers UNet, a noise scheduler, Accelerate, and ``fused_fdpo_loss``.

One step follows Diffusion-DPO (Wallace et al., 2023): the winner and loser of a pair share the noise and the
timestep, the batch is ``[winners; losers]``, the frozen reference is the starting UNet (or its errors, cached
by :func:`cache_reference_errors`), and only the UNet is trained.

Reproducibility and sharding: the run draws pairs as a stream fixed by the seed (a seeded permutation per
epoch), and the noise, timestep and VAE sample of stream position ``k`` come from a generator seeded by
``(seed, k)``. Every process therefore computes exactly its slice of the global batch, a resumed run continues
the same stream, and cached reference errors are indexed by ``k``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import os
import re
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from diffusers.optimization import get_scheduler
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import fused_fdpo_loss, get_divergence
from .data import DatasetError, PreferenceDataset
from .datasets_io import BACKENDS as DATA_BACKENDS
from .datasets_io import open_preferences
from .fsdp import (
    FullCheckpointState,
    check_fsdp_flags,
    check_fsdp_launch,
    full_model_state,
    shard_model,
    unsharded_copy,
)
from .io import (
    WRITER_FILE,
    OutputWriteError,
    WriterLock,
    atomic_folder,
    file_sha256,
    folder_sha256,
    lock_folder,
    remove_stale,
    unlock_folder,
    verify_checksums,
    write_checksums,
    write_failure,
    write_text_atomic,
)
from .lora import adapters_disabled, add_lora, check_lora_flags, has_lora, save_lora
from .model import (
    NoiseProcess,
    Pipeline,
    PipelineError,
    check_compile_backend,
    denoise,
    denoiser_name,
    load_pipeline,
    place,
    speed_switches,
)
from .timesteps import TimestepSampler, check_timestep_flags

MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Everything a run depends on (the command line maps onto these fields one to one)."""

    pipeline: Path
    dataset: Path
    output: Path
    divergence: str = "reverse_kl"
    alpha: float = 0.5
    beta: float = 5000.0
    gamma: float = 1.0
    label_smoothing: float = 0.0
    prediction_type: str | None = None  # default: the pipeline scheduler's
    ref_errors: Path | None = None  # cached reference errors instead of a frozen reference UNet
    max_steps: int = 100
    batch_size: int = 8  # preference pairs per micro-step, over all processes
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    resolution: int | None = None  # default: the UNet's native size
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only the final UNet
    resume: str | None = None  # "latest" or a checkpoint folder
    xformers: bool = False
    cpu: bool = False
    dataloader_workers: int = 0
    check_images: bool = True
    data_backend: str = "auto"  # table reader: memory, datasets (memory-mapped Arrow) or auto (by kind and size)
    log_grad_weights: bool = False
    progress: bool = True
    lora_rank: int | None = None  # None: full fine-tuning; else LoRA adapters, the reference is adapters-off
    lora_alpha: float | None = None  # default: lora_rank (scale 1), as diffusers' DPO scripts
    report_to: str = "none"  # Accelerate tracker: "tensorboard", "wandb" or "none" (log.jsonl is always written)
    weighting_scheme: str = "none"  # flow targets: timestep density or weight, as diffusers' SD3 scripts
    logit_mean: float = 0.0  # logit_normal density
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode density
    snr_gamma: float | None = None  # epsilon / v targets: Min-SNR weighting, min(SNR, gamma) / SNR
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the trained model and the reference copy
    compile_backend: str = "inductor"
    fsdp: bool = False  # shard the trained model with FSDP2 (fully_shard) over the processes instead of DDP

    def __post_init__(self):
        for name in ("pipeline", "dataset", "output", "ref_errors"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        get_divergence(self.divergence, self.alpha)  # unknown or rejected divergences fail here, with the reason
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; expected one of {list(MIXED_PRECISION)}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0; got {self.seed}")
        _check_flags(self)
        if self.data_backend not in DATA_BACKENDS:
            raise ValueError(f"--data-backend {self.data_backend!r}: expected one of {list(DATA_BACKENDS)}")
        check_lora_flags(self.lora_rank, self.lora_alpha)
        _check_tracker(self.report_to)
        check_timestep_flags(self.weighting_scheme, self.snr_gamma, self.logit_std)
        if self.compile:
            check_compile_backend(self.compile_backend)
        check_fsdp_flags(self)

    @property
    def stream_length(self) -> int:
        """Pair draws in the whole run."""
        return self.max_steps * self.gradient_accumulation_steps * self.batch_size


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_number(
    cfg, name: str, low=None, *, strict: bool = False, below=None, integer: bool = False, optional: bool = False
) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"{_flag(name)} must be a finite {'integer' if integer else 'number'}; got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{_flag(name)} must be {'>' if strict else '>='} {low}; got {value!r}")
    if below is not None and not value < below:
        raise ValueError(f"{_flag(name)} must be < {below}; got {value!r}")


def _check_flags(cfg: TrainConfig) -> None:
    """Every flag on its own, before anything is loaded or written; each message names its flag."""
    from .model import PREDICTION_TYPES

    _check_number(cfg, "beta", 0, strict=True)
    _check_number(cfg, "gamma", 0, strict=True)
    _check_number(cfg, "label_smoothing", 0, below=0.5)
    _check_number(cfg, "alpha")
    _check_number(cfg, "learning_rate", 0)
    _check_number(cfg, "lr_warmup_steps", 0, integer=True)
    _check_number(cfg, "adam_beta1", 0, below=1)
    _check_number(cfg, "adam_beta2", 0, below=1)
    _check_number(cfg, "adam_weight_decay", 0)
    _check_number(cfg, "adam_epsilon", 0)
    _check_number(cfg, "max_grad_norm", 0)
    _check_number(cfg, "resolution", 1, integer=True, optional=True)  # 0 is not "the default": that is None
    _check_number(cfg, "log_every", 1, integer=True)
    _check_number(cfg, "checkpoint_every", 0, integer=True)
    _check_number(cfg, "dataloader_workers", 0, integer=True)
    if cfg.prediction_type is not None and cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"--prediction-type {cfg.prediction_type!r}: expected one of {list(PREDICTION_TYPES)}")
    if cfg.resume is not None and not str(cfg.resume):
        raise ValueError("--resume needs 'latest' or a checkpoint folder")
    # Whatever else the loss refuses (its own checks may be stricter than the ones above), refused now.
    x = torch.zeros(2, 1)
    try:
        fused_fdpo_loss(
            x,
            x,
            x,
            beta=float(cfg.beta),
            divergence=cfg.divergence,
            alpha=float(cfg.alpha),
            gamma=float(cfg.gamma),
            label_smoothing=float(cfg.label_smoothing),
            backend="torch",
        )
    except (ValueError, TypeError, OverflowError) as err:
        raise ValueError(
            f"the loss refuses these flags (--beta, --gamma, --divergence, --alpha, --label-smoothing): {err}"
        ) from None


@dataclass
class TrainResult:
    output: Path
    records: list[dict] = field(default_factory=list)


def derived_seed(seed: int, purpose: str, index: int) -> int:
    """A 63-bit seed for (run seed, purpose, index), independent across purposes and indices."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PairStream(Dataset):
    """The run's sequence of pair draws from ``start`` on: position ``k`` -> pair ``order[k]`` plus ``k`` itself."""

    def __init__(self, pairs: Dataset, seed: int, length: int, start: int = 0):
        generator = torch.Generator().manual_seed(derived_seed(seed, "order", 0))
        epochs = math.ceil(length / len(pairs))
        self.order = torch.cat([torch.randperm(len(pairs), generator=generator) for _ in range(epochs)])[:length]
        self.pairs, self.start = pairs, start

    def __len__(self) -> int:
        return len(self.order) - self.start

    def __getitem__(self, i: int) -> dict:
        k = self.start + i
        return {**self.pairs[int(self.order[k])], "position": k}


@dataclass
class Setup:
    """A validated run: pipeline, data and noise process, before anything is written."""

    pipe: Pipeline
    pairs: PreferenceDataset
    process: NoiseProcess
    resolution: int
    timesteps: TimestepSampler | None = None  # None: uniform, unweighted


def prepare_run(cfg: TrainConfig) -> Setup:
    """Load and check the pipeline, resolution and dataset; every bad input fails here, with its file or flag."""
    pipe = load_pipeline(cfg.pipeline)
    resolution = pipe.resolution if cfg.resolution is None else cfg.resolution
    if resolution % pipe.size_multiple:
        raise PipelineError(
            f"--resolution {resolution} does not fit {cfg.pipeline}: its UNet and VAE need image sides that are "
            f"multiples of {pipe.size_multiple} (native size {pipe.resolution})"
        )
    process = NoiseProcess(pipe.scheduler_config, cfg.prediction_type)
    if denoiser_name(pipe.unet) == "transformer" and process.prediction_type != "flow":
        raise PipelineError(
            f"--prediction-type {process.prediction_type}: {cfg.pipeline}'s {type(pipe.unet).__name__} is a "
            "flow-matching model and trains on the flow target (omit --prediction-type, or pass flow)"
        )
    timesteps = TimestepSampler(
        process, cfg.weighting_scheme, cfg.snr_gamma, cfg.logit_mean, cfg.logit_std, cfg.mode_scale
    )
    if hasattr(pipe.text, "resolution"):  # SDXL's micro-conditioning names the training image size
        pipe.text.resolution = resolution
    pairs = open_preferences(cfg.dataset, resolution, check_images=cfg.check_images, backend=cfg.data_backend)
    _check_captions(pipe, pairs)
    return Setup(pipe, pairs, process, resolution, timesteps)


def _check_captions(pipe: Pipeline, pairs: PreferenceDataset) -> None:
    """Captions the pipeline's tokenizer refuses fail here, naming their row. (The embedded word tokenizer refuses
    long captions and unknown words; transformers' CLIP tokenizers truncate long captions, as diffusers does.)"""
    from .model import WordTokenizer

    tokenizer = getattr(getattr(pipe, "text", None), "tokenizer", None)
    if not isinstance(tokenizer, WordTokenizer):
        return
    seen = set()
    for caption, _, _, where in pairs.rows:
        if caption not in seen:
            seen.add(caption)
            try:
                tokenizer([caption])
            except ValueError as err:
                raise DatasetError(f"{where}: {err} (the tokenizer of {pipe.path}); fix or drop that row") from None


def noised_batch(setup: Setup, batch: dict, seed: int, device: torch.device):
    """(noisy input [2b], timesteps [2b], target [2b], text conditioning [2b]) of a local batch of b pairs."""
    pipe, process = setup.pipe, setup.process
    generators = [torch.Generator().manual_seed(derived_seed(seed, "noise", int(k))) for k in batch["position"]]
    channels = pipe.unet.config.in_channels
    side = setup.resolution // pipe.vae_scale
    index = torch.cat([(setup.timesteps or TimestepSampler(process)).index(g) for g in generators])
    noise = torch.stack([torch.randn(channels, side, side, generator=g) for g in generators])
    pixels = batch["pixels"].to(device)
    with torch.no_grad():
        # Winner then loser of each pair draw their VAE samples from the pair's generator, in that order.
        latents = pipe.encode(torch.cat([pixels[:, 0], pixels[:, 1]]), generators + generators)
        cond = pipe.text(batch["caption"], device)
    noisy, timesteps, target = process.prepare(latents, noise.repeat(2, 1, 1, 1).to(device), index.repeat(2).to(device))
    return noisy, timesteps, target, _twice(cond)


def _twice(cond):
    """Conditioning of the pairs for ``[winners; losers]`` (a tensor, or a dict of them for transformers)."""
    if isinstance(cond, dict):
        return {k: _twice(v) for k, v in cond.items()}
    return cond.repeat(2, *[1] * (cond.dim() - 1))


def _check_tracker(report_to: str) -> None:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"none": True, "tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if report_to not in available:
        raise ValueError(f"--report-to {report_to!r}: expected one of {list(available)}")
    if not available[report_to]:
        raise ImportError(f"--report-to {report_to} needs the {report_to} package (pip install {report_to})")


def _tracker_config(run: dict) -> dict:
    """The run's settings as tracker hyperparameters (scalars and strings only, as TensorBoard's hparams need)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in run.items()}


def _accelerator(cfg: TrainConfig) -> Accelerator:
    return Accelerator(
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output if cfg.report_to != "none" else None,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=cfg.cpu,
        # The loader yields global batches and each process takes its slice: --batch-size is the global batch.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def _check_batch(cfg: TrainConfig, accelerator: Accelerator) -> None:
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over "
            f"{accelerator.num_processes} processes"
        )


def _stream_loader(cfg: TrainConfig, setup: Setup, start: int) -> DataLoader:
    stream = PairStream(setup.pairs, cfg.seed, cfg.stream_length, start)
    return DataLoader(
        stream, batch_size=cfg.batch_size, shuffle=False, drop_last=True, num_workers=cfg.dataloader_workers
    )


REF_CACHE_FORMAT = "fdiv_kernels.ref_errors/2"
_REDO = "recompute it with the ref-errors command and this run's flags"


def _pipeline_digest(path: Path) -> str:
    """sha256 of what a run reads from a pipeline folder: model_index.json and every component folder it lists."""
    path = Path(path)
    digest = hashlib.sha256(f"model_index.json\0{file_sha256(path / 'model_index.json')}\0".encode())
    for name in sorted(json.loads((path / "model_index.json").read_text())):
        if not name.startswith("_") and (path / name).is_dir():
            digest.update(f"{name}/\0".encode())
            folder_sha256(path / name, digest)
    return digest.hexdigest()


def _ref_cache_metadata(cfg: TrainConfig, setup: Setup) -> dict[str, str]:
    """The settings cached reference errors depend on (their content hashes come on top: :func:`_ref_cache_content`)."""
    return {
        "format": REF_CACHE_FORMAT,
        "seed": str(cfg.seed),
        "pairs": str(len(setup.pairs)),
        "batch_size": str(cfg.batch_size),
        "resolution": str(setup.resolution),
        "prediction_type": setup.process.prediction_type,
        "timestep_sampling": (setup.timesteps or TimestepSampler(setup.process)).describe(),
        "mixed_precision": cfg.mixed_precision,
    }


def _ref_cache_content(cfg: TrainConfig, setup: Setup, length: int, pipeline_sha256: str) -> dict[str, str]:
    """Content hashes of what cached errors over the first ``length`` pair draws depend on: the pipeline's files
    and the drawn pairs (captions and image bytes, in stream order)."""
    return {
        "pipeline_sha256": pipeline_sha256,
        "data_sha256": setup.pairs.content_digest(PairStream(setup.pairs, cfg.seed, length).order),
    }


def _load_ref_errors(cfg: TrainConfig, setup: Setup, pipeline_sha256: str) -> torch.Tensor:
    path = cfg.ref_errors
    if not path.is_file():
        raise FileNotFoundError(f"--ref-errors {path} does not exist; write it with the ref-errors command")
    try:
        with safe_open(path, "pt") as handle:
            found = handle.metadata() or {}
            errors = handle.get_tensor("ref_err")
    except Exception as err:  # safetensors' own error types, a missing tensor, a truncated file
        raise ValueError(
            f"--ref-errors {path} is not a readable reference-error cache ({type(err).__name__}: {err}); {_REDO}"
        ) from None
    if found.get("format") != REF_CACHE_FORMAT:
        raise ValueError(
            f"--ref-errors {path} records no content hashes (written by an older fdiv_kernels?), so "
            f"nothing says it matches this run; {_REDO}"
        )
    if (
        errors.dim() != 2
        or errors.shape[1] != 2
        or errors.dtype != torch.float32
        or (hashlib.sha256(errors.numpy().tobytes()).hexdigest() != found.get("ref_err_sha256"))
    ):
        raise ValueError(
            f"--ref-errors {path} is damaged: its errors do not match the checksum recorded with them; {_REDO}"
        )
    for key, value in _ref_cache_metadata(cfg, setup).items():
        if found.get(key) != value:
            raise ValueError(
                f"--ref-errors {path} was computed with {key}={found.get(key)!r}; this run has {value!r}; {_REDO}"
            )
    if errors.shape[0] < cfg.stream_length:
        raise ValueError(
            f"--ref-errors {path} covers {errors.shape[0]} pair draws; this run needs {cfg.stream_length} "
            "(max_steps x gradient_accumulation_steps x batch_size): recompute it with these settings"
        )
    content = _ref_cache_content(cfg, setup, errors.shape[0], pipeline_sha256)
    if found.get("pipeline_sha256") != content["pipeline_sha256"]:
        raise ValueError(
            f"--ref-errors {path} was computed with other pipeline weights or configs (from "
            f"{found.get('pipeline')}) than --pipeline {cfg.pipeline} has now; {_REDO}"
        )
    if found.get("data_sha256") != content["data_sha256"]:
        raise ValueError(
            f"--ref-errors {path} was computed on other data (from {found.get('dataset')}): the captions "
            f"or images of the pairs it covers differ from --dataset {cfg.dataset}'s now; {_REDO}"
        )
    return errors


def cache_reference_errors(cfg: TrainConfig, path: Path) -> Path:
    """Run the reference over the run's whole stream and save its per-sample errors ``[K, 2]`` (safetensors).

    Training with ``--ref-errors`` then needs no reference UNet; runs that differ only in the loss (divergence,
    alpha, beta, learning rate) share one cache. The file records content hashes of the pipeline and of the
    drawn pairs, and the settings the errors depend on; a run refuses a cache that differs in any.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(
            f"{path} already exists" + (" (a folder; --output names the cache file to write)" if path.is_dir() else "")
        )
    setup = prepare_run(cfg)
    accelerator = _accelerator(cfg)
    _check_batch(cfg, accelerator)
    dtype = MIXED_PRECISION[cfg.mixed_precision]
    setup.pipe.frozen_parts_to(accelerator.device, dtype)
    ref = place(setup.pipe.unet.requires_grad_(False).eval(), accelerator.device, dtype)
    loader = accelerator.prepare(_stream_loader(cfg, setup, 0))
    errors = []
    for batch in tqdm(loader, desc="reference errors", disable=not (cfg.progress and accelerator.is_main_process)):
        noisy, timesteps, target, cond = noised_batch(setup, batch, cfg.seed, accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            pred = denoise(ref, noisy.to(dtype), timesteps, cond)
        err = (pred.float() - target.float()).square().flatten(1).mean(1)
        errors.append(accelerator.gather(torch.stack(err.chunk(2), 1)))
    if accelerator.is_main_process:
        errors = torch.cat(errors).cpu().float().contiguous()
        metadata = {
            **_ref_cache_metadata(cfg, setup),
            **_ref_cache_content(cfg, setup, errors.shape[0], _pipeline_digest(cfg.pipeline)),
            "ref_err_sha256": hashlib.sha256(errors.numpy().tobytes()).hexdigest(),
            "pipeline": str(cfg.pipeline.resolve()),
            "dataset": str(cfg.dataset.resolve()),
        }  # for messages
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file({"ref_err": errors}, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    accelerator.wait_for_everyone()
    return path


def _checkpoints(output: Path) -> list[Path]:
    """The run's ``checkpoint-N`` folders, by step (other names are not checkpoints of this trainer)."""
    found = [p for p in output.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# On --resume these flags may differ from the run's, and their new values take effect from the checkpoint on:
# how long the run goes, what it logs and saves, and how (not what) it computes.
RESUME_MAY_CHANGE = frozenset(
    {
        "max_steps",
        "log_every",
        "checkpoint_every",
        "resume",
        "output",
        "progress",
        "check_images",
        "dataloader_workers",
        "log_grad_weights",
        "report_to",
        "data_backend",
        "cpu",
        "xformers",
        "gradient_checkpointing",
        "compile",
        "compile_backend",
    }
)
# Compared by what they resolve to: the pipeline's and dataset's content (so moved folders are fine), the
# resolution and target, cached errors vs a reference model.
_RESOLVED_FLAGS = frozenset({"pipeline", "dataset", "ref_errors", "resolution", "prediction_type"})
# Every other flag fixes the run (its data stream, loss, optimizer state or model) and must match the checkpoint's.
_FINISHED_OUTPUTS = ("unet", "lora", "transformer")


def _run_state(cfg: TrainConfig, setup: Setup) -> dict:
    """What each checkpoint records about its run, for ``--resume`` to compare: the flags and what they resolved to."""
    return {
        "config": _flags_record(cfg),
        "resolved": {
            "pipeline_sha256": _pipeline_digest(cfg.pipeline),
            "dataset_sha256": setup.pairs.table_digest,
            "pairs": len(setup.pairs),
            "resolution": setup.resolution,
            "prediction_type": setup.process.prediction_type,
            "reference": "cached errors (--ref-errors)" if cfg.ref_errors is not None else "the reference model",
        },
    }


def _flags_record(cfg: TrainConfig) -> dict:
    return {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def _check_fresh_output(output: Path) -> None:
    """A new run's folder: new, empty, or the folder of a run that stopped before its first checkpoint."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; a run writes a folder there: choose another path")
    # A killed writer's temporary files and folders (removed when the run starts) and pid file do not count.
    if not output.exists() or all(
        re.fullmatch(r"\..+\.tmp(-.*)?", p.name) or p.name == WRITER_FILE for p in output.iterdir()
    ):
        return
    if _checkpoints(output):
        names = ", ".join(p.name for p in _checkpoints(output))
        raise FileExistsError(
            f"output folder {output} holds a run with checkpoints ({names}): pass --resume latest "
            "to continue it, or choose another output folder"
        )
    if not (output / "train_config.json").is_file():
        names = sorted(p.name for p in output.iterdir() if p.name != WRITER_FILE)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FileExistsError(
            f"output folder {output} is not empty and holds no run of this trainer (it has {shown}); "
            "choose an empty or new output folder"
        )
    finished = [name for name in _FINISHED_OUTPUTS if (output / name).exists()]
    if finished:
        raise FileExistsError(
            f"output folder {output} holds a finished run ({finished[0]}/); choose another output folder"
        )
    # Otherwise the folder holds a run that stopped before its first checkpoint: it is started over there.


def _find_checkpoint(cfg: TrainConfig) -> Path:
    if cfg.resume != "latest":
        path = Path(cfg.resume)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume {path}: no such checkpoint folder; pass 'latest' or a run's checkpoint-N folder"
            )
        return path
    found = _checkpoints(cfg.output) if cfg.output.is_dir() else []
    if found:
        return found[-1]
    if (cfg.output / "train_config.json").is_file():
        raise FileNotFoundError(
            f"--resume latest: {cfg.output} holds no checkpoint (its run stopped before the first "
            "one, or ran with --checkpoint-every 0); run without --resume to start it over in "
            "the same folder"
        )
    raise FileNotFoundError(f"--resume latest: no checkpoint found in {cfg.output}")


def _what_to_do(checkpoint: Path) -> str:
    """The way out of a damaged checkpoint: an earlier one of the same run, or a new run."""
    named = re.fullmatch(r"checkpoint-(\d+)", checkpoint.name)
    earlier = [
        p
        for p in _checkpoints(checkpoint.parent)
        if p.resolve() != checkpoint.resolve() and (not named or int(p.name.split("-")[1]) < int(named[1]))
    ]
    if earlier:
        return (
            f"resume from an earlier checkpoint (--resume {earlier[-1]}; delete {checkpoint} first if it is "
            "the latest) or start over in a new output folder"
        )
    return "start over in a new output folder (no earlier checkpoint of this run to resume from)"


def _read_trainer_state(checkpoint: Path, what_to_do: str) -> tuple[int, dict]:
    file = checkpoint / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{file} is missing; {what_to_do}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); {what_to_do}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{file}: 'step' must be a positive integer; got {step!r}; {what_to_do}")
    named = re.fullmatch(r"checkpoint-(\d+)", checkpoint.name)
    if named and int(named.group(1)) != step:
        raise ValueError(f"{file} says step {step} but the folder is {checkpoint.name}; {what_to_do}")
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("resolved"), dict):
        raise ValueError(
            f"{file} does not record the run's flags (written by an older fdiv_kernels?), so a resume "
            f"cannot be checked against them; {what_to_do}"
        )
    return step, state


def _show(value) -> str:
    return "(default)" if value is None else str(value)


def _run_changes(cfg: TrainConfig, state: dict, recorded: dict) -> list[str]:
    """The differences between this invocation and the checkpoint's run that would break the run."""
    defaults = {f.name: None if f.default is MISSING else f.default for f in fields(TrainConfig)}
    old_flags, old = recorded["config"], recorded["resolved"]
    changes = [
        f"{_flag(name)} {_show(value)} (the run has {_show(old_flags.get(name, defaults.get(name)))})"
        for name, value in state["config"].items()
        if name not in RESUME_MAY_CHANGE
        and name not in _RESOLVED_FLAGS
        and value != old_flags.get(name, defaults.get(name))
    ]
    new = state["resolved"]
    described = {
        "pipeline_sha256": lambda: (
            f"--pipeline {cfg.pipeline}: its files differ from those the run started from ({old_flags.get('pipeline')})"
        ),
        "dataset_sha256": lambda: (
            f"--dataset {cfg.dataset}: its table differs from the run's "
            f"({old_flags.get('dataset')}; captions, labels, image bytes or image paths changed)"
        ),
        "pairs": lambda: f"--dataset {cfg.dataset} has {new['pairs']} pairs (the run's had {old['pairs']})",
        "resolution": lambda: f"--resolution {new['resolution']} (the run has {old['resolution']})",
        "prediction_type": lambda: f"--prediction-type {new['prediction_type']} (the run has {old['prediction_type']})",
        "reference": lambda: f"the reference is {new['reference']} (the run used {old['reference']})",
    }
    for key, describe in described.items():
        if key in old and old[key] != new[key]:
            changes.append(describe())
    return changes


def _resume_point(cfg: TrainConfig, state: dict) -> tuple[Path | None, int]:
    """The checkpoint to resume from and its step, every check passed (nothing is written here)."""
    if cfg.resume is None:
        _check_fresh_output(cfg.output)
        return None, 0
    checkpoint = _find_checkpoint(cfg)
    what_to_do = _what_to_do(checkpoint)
    verify_checksums(checkpoint, what_to_do)
    step, recorded = _read_trainer_state(checkpoint, what_to_do)
    changes = _run_changes(cfg, state, recorded)
    if changes:
        may = ", ".join(_flag(n) for n in sorted(RESUME_MAY_CHANGE - {"resume", "output"}))
        raise ValueError(
            f"--resume {checkpoint}: refused, these differ from the run's (recorded in its trainer_state.json) and "
            f"would change the run it continues: {'; '.join(changes)}. Pass the run's values (or leave the flags out "
            f"where the run used the default), or start a new run in another output folder. Flags that may change "
            f"on resume, taking effect from the checkpoint on: {may}"
        )
    if cfg.max_steps < step:
        raise ValueError(
            f"--max-steps {cfg.max_steps} is below the step of {checkpoint} ({step}): a resumed run "
            f"continues from there; pass --max-steps {step} or more"
        )
    return checkpoint, step


def _load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    try:
        accelerator.load_state(checkpoint)
    except Exception as err:  # whatever accelerate, torch or safetensors raise on a file they cannot read
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"--resume {checkpoint}: its files pass their checksums but cannot be loaded "
            f"({type(err).__name__}: {first}); {_what_to_do(checkpoint)}"
        ) from err


def _prepare_output(
    cfg: TrainConfig, accelerator: Accelerator, checkpoint: Path | None, step: int, writer: WriterLock
) -> None:
    """The run folder, once every check passed (main process): locked (a new one), a killed run's leftovers
    removed, ``log.jsonl`` cut back to the checkpoint's step on resume, or dropped when a run that stopped before
    its first checkpoint starts over."""
    output = cfg.output
    output.mkdir(parents=True, exist_ok=True)
    writer.acquire()
    if writer.stale_writer:
        accelerator.print(f"{output} was left by a writer that is no longer running ({writer.stale_writer})")
    remove_stale(output, ".*.tmp*")
    for leftover in output.glob(".*.tmp"):
        if leftover.is_file():
            leftover.unlink()
    log = output / "log.jsonl"
    if checkpoint is None:
        if (output / "train_config.json").is_file():
            accelerator.print(f"{output} holds a run that stopped before its first checkpoint: starting it over there")
        log.unlink(missing_ok=True)
    elif log.is_file():
        kept = []
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        write_text_atomic(log, "".join(kept))


def _grad_weights_fn(cfg: TrainConfig, accelerator: Accelerator):
    if not cfg.log_grad_weights:
        return None
    try:
        from ..gradient_field import gradient_weights
    except ImportError:
        accelerator.print("--log-grad-weights: fdiv_kernels.gradient_field is not available; not logging them")
        return None
    return gradient_weights


def train(cfg: TrainConfig) -> TrainResult:
    """Fine-tune ``cfg.pipeline``'s UNet with f-DPO on ``cfg.dataset``; writes ``cfg.output`` (see the docs)."""
    # One writer per output folder, held by the main process from before the first check (a second run on a
    # live folder is refused here, having read and written nothing) to the end; a new folder is locked once made.
    writer = WriterLock(cfg.output, "train") if _main_process(cfg) else None
    try:
        if writer is not None:
            writer.acquire(missing_ok=True)
        return _train(cfg, writer)
    finally:
        if writer is not None:
            writer.release()


def _main_process(cfg: TrainConfig) -> bool:
    """Whether this is the main process, before the Accelerator exists: from accelerate's process state, made
    as the Accelerator makes it (with the same ``cpu``); the Accelerator then builds on it."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=cfg.cpu or parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process


def _train(cfg: TrainConfig, writer: WriterLock | None) -> TrainResult:
    setup = prepare_run(cfg)
    state = _run_state(cfg, setup)
    checkpoint, start_step = _resume_point(cfg, state)
    ref_errors = None
    if cfg.ref_errors is not None:
        ref_errors = _load_ref_errors(cfg, setup, state["resolved"]["pipeline_sha256"])
    accelerator = _accelerator(cfg)
    _check_batch(cfg, accelerator)
    if cfg.fsdp:
        check_fsdp_launch(accelerator)
    device, dtype = accelerator.device, MIXED_PRECISION[cfg.mixed_precision]

    pipe = setup.pipe
    pipe.frozen_parts_to(device, dtype)
    unet = pipe.unet.train()
    ref_unet = _setup_models(cfg, unet, ref_errors, device, dtype)
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps)
    start = start_step * cfg.gradient_accumulation_steps * cfg.batch_size
    prepare = partial(_prepare_sharded, accelerator) if cfg.fsdp else accelerator.prepare
    unet, optimizer, loader, schedule = prepare(unet, optimizer, _stream_loader(cfg, setup, start), schedule)
    if checkpoint is not None:
        _load_checkpoint(accelerator, checkpoint)
    accelerator.wait_for_everyone()  # every process checked the output folder before the first one writes to it
    if accelerator.is_main_process:
        _prepare_output(cfg, accelerator, checkpoint, start_step, writer)
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        # On resume every flag recorded here took effect: the others were refused by _resume_point.
        run = {**state["config"], "num_processes": accelerator.num_processes, "distributed_backend": backend}
        with _writing(cfg.output / "train_config.json", cfg.output):
            write_text_atomic(cfg.output / "train_config.json", json.dumps(run, indent=1, default=str))
    if cfg.report_to != "none":
        accelerator.init_trackers("fdpo", config=_tracker_config(run) if accelerator.is_main_process else None)
    grad_weights = _grad_weights_fn(cfg, accelerator)

    result = TrainResult(cfg.output)
    sums: dict[str, torch.Tensor] = {}
    step = start_step
    name = f"alpha {cfg.alpha:g}" if cfg.divergence == "alpha" else cfg.divergence
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        desc=f"f-DPO {name}",
        dynamic_ncols=True,
        disable=not (cfg.progress and accelerator.is_main_process),
    )
    for batch in loader:
        with accelerator.accumulate(unet):
            noisy, timesteps, target, cond = noised_batch(setup, batch, cfg.seed, device)
            model_pred = denoise(unet, noisy, timesteps, cond)
            pairs = model_pred.shape[0] // 2
            # Mixed precision: the fused kernel reads half-precision inputs and accumulates in fp32, so the
            # target is cast to the prediction's dtype rather than the predictions upcast to fp32.
            target = (target[:pairs] if setup.process.shared_target else target).to(model_pred.dtype)
            reference = {}
            if ref_errors is None:
                with torch.no_grad(), accelerator.autocast(), _reference(ref_unet, unet, accelerator) as ref:
                    reference["ref_pred"] = denoise(ref, noisy.to(dtype), timesteps, cond).to(model_pred.dtype)
            else:
                errors = ref_errors[batch["position"].cpu()].to(device)
                reference["ref_err"] = torch.cat([errors[:, 0], errors[:, 1]])
            loss, stats = fused_fdpo_loss(
                model_pred,
                target=target,
                **reference,
                beta=cfg.beta,
                divergence=cfg.divergence,
                alpha=cfg.alpha,
                gamma=cfg.gamma,
                label_smoothing=cfg.label_smoothing,
                return_stats=True,
                pair_weight=setup.timesteps.pair_weight(timesteps[:pairs]),
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        values = _step_values(cfg, loss, stats, pairs, grad_weights)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value.float()
        sums["count"] = sums.get("count", 0.0) + 1.0
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record = _reduce_log(accelerator, sums, step, schedule.get_last_lr()[0])
            sums = {}
            result.records.append(record)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "implicit_acc", "reward_margin")}, refresh=False)
            if accelerator.is_main_process:
                with _writing(cfg.output / "log.jsonl", cfg.output), (cfg.output / "log.jsonl").open("a") as log:
                    log.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            _save_checkpoint(accelerator, cfg.output, step, state)
    bar.close()
    if cfg.checkpoint_every:
        _save_checkpoint(accelerator, cfg.output, step, state)
    (_save_sharded_unet if cfg.fsdp else _save_unet)(accelerator, unet, cfg.output)
    accelerator.end_training()
    return result


def _setup_models(cfg: TrainConfig, unet, ref_errors, device, dtype):
    """LoRA adapters on ``unet`` or its frozen reference copy (none with cached ref_errors), the speed switches and
    FSDP sharding, in place; returns the reference copy or None."""
    ref_unet = None
    if cfg.lora_rank is not None:
        # Frozen base weights in the compute dtype, adapters in fp32; the reference is the adapters-off model.
        add_lora(
            place(unet, device, dtype),
            cfg.lora_rank,
            cfg.lora_alpha,
            where=f"{cfg.pipeline}'s denoiser",
            seed=derived_seed(cfg.seed, "lora", 0),
        )
    elif ref_errors is None:
        ref_unet = place(copy.deepcopy(unet).requires_grad_(False).eval(), device, dtype)
    if cfg.xformers:
        _enable_xformers(device, [m for m in (unet, ref_unet) if m is not None])
    speed_switches(unet, cfg.gradient_checkpointing, cfg.compile, cfg.compile_backend)
    if ref_unet is not None:
        speed_switches(ref_unet, compile=cfg.compile, compile_backend=cfg.compile_backend)
    if cfg.fsdp:
        shard_model(unet, device)  # the reference copy above stays whole
    return ref_unet


def _step_values(cfg: TrainConfig, loss, stats, pairs: int, grad_weights) -> dict:
    """One micro-step's logged values (and the mean gradient weights where grad_weights is set)."""
    values = {
        "loss": loss.detach(),
        "implicit_acc": stats.implicit_acc,
        "raw_model_loss": stats.raw_model_loss,
        "raw_ref_loss": stats.raw_ref_loss,
        "reward_margin": (stats.reward[:pairs] - stats.reward[pairs:]).mean(),
    }
    if grad_weights is not None:
        push_w, push_l = grad_weights(
            stats.logratio[:pairs],
            stats.logratio[pairs:],
            cfg.divergence,
            alpha=cfg.alpha,
            gamma=cfg.gamma,
            label_smoothing=cfg.label_smoothing,
        )
        values.update(push_w=push_w.mean(), push_l=push_l.mean())
    return values


def _reduce_log(accelerator: Accelerator, sums: dict, step: int, lr: float) -> dict:
    """Means over the micro-steps since the last log and over all processes (every process calls this)."""
    keys = sorted(k for k in sums if k != "count")
    local = torch.stack([sums[k] for k in keys] + [torch.as_tensor(sums["count"])]).to(accelerator.device)
    total = accelerator.reduce(local, "sum")
    return {"step": step, "lr": lr, **{k: (total[i] / total[-1]).item() for i, k in enumerate(keys)}}


def _save_checkpoint(accelerator: Accelerator, output: Path, step: int, state: dict) -> None:
    """Model (safetensors), optimizer, scheduler and RNG states, the run's flags (``trainer_state.json``) and the
    sha256 of every file (``checksums.json``); written aside under a lock, then renamed into place."""
    final, tmp = output / f"checkpoint-{step}", output / f".checkpoint-{step}.tmp"
    lock = None
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        lock = lock_folder(tmp)  # a later run removes it only once this process is gone
    with _writing(final, output):  # the half-written checkpoint is removed first
        try:
            accelerator.wait_for_everyone()
            accelerator.save_state(tmp, safe_serialization=True)
            accelerator.wait_for_everyone()  # every process wrote its part (its RNG state) before the checksums
            if accelerator.is_main_process:
                (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1, default=str))
                write_checksums(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            unlock_folder(lock)
    accelerator.wait_for_everyone()


@contextmanager
def _writing(what: Path, output: Path):
    """A failed write of ``what`` (a full disk, above all) as one line naming it and the checkpoint to go on from;
    other errors pass through."""
    try:
        yield
    except Exception as err:
        failure = write_failure(err)
        if failure is None:
            raise
        found = _checkpoints(output)
        once = "once there is space" if failure.startswith("no space") else "once it can be written"
        next_step = (
            f"the last good checkpoint is {found[-1]}: {once}, continue with --resume latest"
            if found
            else f"no checkpoint of this run was written: {once}, run it again (it starts over)"
        )
        raise OutputWriteError(f"could not write {what}: {failure}; {next_step}") from err


def _reference(ref_unet, unet, accelerator: Accelerator):
    """The frozen reference copy, or (LoRA) the trained model itself, unwrapped, with its adapters off."""
    return nullcontext(ref_unet) if ref_unet is not None else adapters_disabled(accelerator.unwrap_model(unet))


def _save_unet(accelerator: Accelerator, unet, output: Path) -> None:
    """The fine-tuned UNet in diffusers format (``output/unet``), loadable in place of the pipeline's; with LoRA,
    only the adapters, in diffusers' LoRA format (``output/lora``, for ``pipeline.load_lora_weights``)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        lora = has_lora(model)
        final = output / ("lora" if lora else denoiser_name(model))
        with _writing(final, output), atomic_folder(final, overwrite=True) as tmp:
            if lora:
                save_lora(model, tmp, denoiser_name(model))
            else:
                model.save_pretrained(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()


def _prepare_sharded(accelerator: Accelerator, unet, optimizer, loader, schedule):
    """``accelerator.prepare`` for a model sharded by :func:`shard_model`: no DDP wrapping, and the model's and
    optimizer's states checkpointed whole (:class:`FullCheckpointState`) rather than by Accelerate, which would
    write only the main process's shards. The optimizer still skips its step on accumulation micro-steps."""
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator.register_for_checkpointing(FullCheckpointState(unet, optimizer))
    wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=accelerator.scaler)
    loader, schedule = accelerator.prepare(loader, schedule)
    return unet, wrapped, loader, schedule


def _save_sharded_unet(accelerator: Accelerator, unet, output: Path) -> None:
    """:func:`_save_unet` for a sharded model: the full weights gathered on the main process, which writes them."""
    state = full_model_state(unet)  # a collective: every process takes part
    if accelerator.is_main_process:
        model = unsharded_copy(unet, state)
        with atomic_folder(output / denoiser_name(model), overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()


def _enable_xformers(device: torch.device, unets: list) -> None:
    if device.type != "cuda":
        raise ValueError("--xformers needs a CUDA device; plain torch attention is used otherwise")
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        raise ImportError("--xformers needs the xformers package (pip install xformers)") from err
    for unet in unets:
        unet.enable_xformers_memory_efficient_attention()
