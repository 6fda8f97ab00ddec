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
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
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
from .data import PreferenceDataset
from .io import atomic_folder
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
        check_lora_flags(self.lora_rank, self.lora_alpha)
        _check_tracker(self.report_to)
        check_timestep_flags(self.weighting_scheme, self.snr_gamma, self.logit_std)
        if self.compile:
            check_compile_backend(self.compile_backend)

    @property
    def stream_length(self) -> int:
        """Pair draws in the whole run."""
        return self.max_steps * self.gradient_accumulation_steps * self.batch_size


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
    resolution = cfg.resolution or pipe.resolution
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
    timesteps = TimestepSampler(process, cfg.weighting_scheme, cfg.snr_gamma, cfg.logit_mean, cfg.logit_std,
                                cfg.mode_scale)
    if hasattr(pipe.text, "resolution"):  # SDXL's micro-conditioning names the training image size
        pipe.text.resolution = resolution
    pairs = PreferenceDataset(cfg.dataset, resolution, check_images=cfg.check_images)
    return Setup(pipe, pairs, process, resolution, timesteps)


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
    return DataLoader(stream, batch_size=cfg.batch_size, shuffle=False, drop_last=True,
                      num_workers=cfg.dataloader_workers)


def _ref_cache_metadata(cfg: TrainConfig, setup: Setup) -> dict[str, str]:
    """What cached reference errors depend on; a cache is used only if all of it matches the run."""
    return {
        "pipeline": str(cfg.pipeline.resolve()),
        "dataset": str(cfg.dataset.resolve()),
        "pairs": str(len(setup.pairs)),
        "seed": str(cfg.seed),
        "resolution": str(setup.resolution),
        "prediction_type": setup.process.prediction_type,
        "timestep_sampling": (setup.timesteps or TimestepSampler(setup.process)).describe(),
        "mixed_precision": cfg.mixed_precision,
    }


def _load_ref_errors(cfg: TrainConfig, setup: Setup) -> torch.Tensor:
    path = cfg.ref_errors
    if not path.is_file():
        raise FileNotFoundError(f"--ref-errors {path} does not exist; write it with the ref-errors command")
    with safe_open(path, "pt") as handle:
        found = handle.metadata() or {}
        errors = handle.get_tensor("ref_err")
    for key, value in _ref_cache_metadata(cfg, setup).items():
        if found.get(key) != value:
            raise ValueError(f"--ref-errors {path} was computed with {key}={found.get(key)!r}; this run has {value!r}")
    if errors.shape[0] < cfg.stream_length:
        raise ValueError(
            f"--ref-errors {path} covers {errors.shape[0]} pair draws; this run needs {cfg.stream_length} "
            "(max_steps x gradient_accumulation_steps x batch_size): recompute it with these settings"
        )
    return errors


def cache_reference_errors(cfg: TrainConfig, path: Path) -> Path:
    """Run the reference over the run's whole stream and save its per-sample errors ``[K, 2]`` (safetensors).

    Training with ``--ref-errors`` then needs no reference UNet; runs that differ only in the loss (divergence,
    alpha, beta, learning rate) share one cache.
    """
    setup = prepare_run(cfg)
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
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
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"ref_err": torch.cat(errors).cpu().contiguous()}, tmp, metadata=_ref_cache_metadata(cfg, setup))
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return path


def _checkpoints(output: Path) -> list[Path]:
    return sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _resume_point(cfg: TrainConfig) -> tuple[Path | None, int]:
    if cfg.resume is None:
        if cfg.output.exists() and any(cfg.output.iterdir()):
            raise FileExistsError(f"output folder {cfg.output} is not empty; pass --resume latest or choose another")
        return None, 0
    path = (_checkpoints(cfg.output) or [None])[-1] if cfg.resume == "latest" else Path(cfg.resume)
    if path is None or not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: no checkpoint found (looked in {path or cfg.output})")
    return path, json.loads((path / "trainer_state.json").read_text())["step"]


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
    setup = prepare_run(cfg)
    checkpoint, start_step = _resume_point(cfg)
    ref_errors = _load_ref_errors(cfg, setup) if cfg.ref_errors is not None else None
    accelerator = _accelerator(cfg)
    _check_batch(cfg, accelerator)
    device, dtype = accelerator.device, MIXED_PRECISION[cfg.mixed_precision]

    pipe = setup.pipe
    pipe.frozen_parts_to(device, dtype)
    unet = pipe.unet.train()
    ref_unet = None
    if cfg.lora_rank is not None:
        # Frozen base weights in the compute dtype, adapters in fp32; the reference is the adapters-off model.
        add_lora(place(unet, device, dtype), cfg.lora_rank, cfg.lora_alpha, where=f"{cfg.pipeline}'s denoiser",
                 seed=derived_seed(cfg.seed, "lora", 0))
    elif ref_errors is None:
        ref_unet = place(copy.deepcopy(unet).requires_grad_(False).eval(), device, dtype)
    if cfg.xformers:
        _enable_xformers(device, [m for m in (unet, ref_unet) if m is not None])
    speed_switches(unet, cfg.gradient_checkpointing, cfg.compile, cfg.compile_backend)
    if ref_unet is not None:
        speed_switches(ref_unet, compile=cfg.compile, compile_backend=cfg.compile_backend)
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps)
    start = start_step * cfg.gradient_accumulation_steps * cfg.batch_size
    unet, optimizer, loader, schedule = accelerator.prepare(unet, optimizer, _stream_loader(cfg, setup, start), schedule)
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
    accelerator.wait_for_everyone()  # every process checked the output folder before the first one writes to it
    if accelerator.is_main_process:
        cfg.output.mkdir(parents=True, exist_ok=True)
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        run = {**asdict(cfg), "num_processes": accelerator.num_processes, "distributed_backend": backend}
        (cfg.output / "train_config.json").write_text(json.dumps(run, indent=1, default=str))
    if cfg.report_to != "none":
        accelerator.init_trackers("fdpo", config=_tracker_config(run) if accelerator.is_main_process else None)
    grad_weights = _grad_weights_fn(cfg, accelerator)

    result = TrainResult(cfg.output)
    sums: dict[str, torch.Tensor] = {}
    step = start_step
    name = f"alpha {cfg.alpha:g}" if cfg.divergence == "alpha" else cfg.divergence
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=f"f-DPO {name}", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
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
                model_pred, target=target, **reference, beta=cfg.beta, divergence=cfg.divergence, alpha=cfg.alpha,
                gamma=cfg.gamma, label_smoothing=cfg.label_smoothing, return_stats=True,
                pair_weight=setup.timesteps.pair_weight(timesteps[:pairs]),
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        values = {
            "loss": loss.detach(), "implicit_acc": stats.implicit_acc, "raw_model_loss": stats.raw_model_loss,
            "raw_ref_loss": stats.raw_ref_loss, "reward_margin": (stats.reward[:pairs] - stats.reward[pairs:]).mean(),
        }
        if grad_weights is not None:
            push_w, push_l = grad_weights(stats.logratio[:pairs], stats.logratio[pairs:], cfg.divergence,
                                          alpha=cfg.alpha, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing)
            values.update(push_w=push_w.mean(), push_l=push_l.mean())
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
                with (cfg.output / "log.jsonl").open("a") as log:
                    log.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            _save_checkpoint(accelerator, cfg.output, step)
    bar.close()
    if cfg.checkpoint_every:
        _save_checkpoint(accelerator, cfg.output, step)
    _save_unet(accelerator, unet, cfg.output)
    accelerator.end_training()
    return result


def _reduce_log(accelerator: Accelerator, sums: dict, step: int, lr: float) -> dict:
    """Means over the micro-steps since the last log and over all processes (every process calls this)."""
    keys = sorted(k for k in sums if k != "count")
    local = torch.stack([sums[k] for k in keys] + [torch.as_tensor(sums["count"])]).to(accelerator.device)
    total = accelerator.reduce(local, "sum")
    return {"step": step, "lr": lr, **{k: (total[i] / total[-1]).item() for i, k in enumerate(keys)}}


def _save_checkpoint(accelerator: Accelerator, output: Path, step: int) -> None:
    """Model (safetensors), optimizer, scheduler and RNG states; written aside, then renamed into place."""
    final, tmp = output / f"checkpoint-{step}", output / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


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
        with atomic_folder(output / ("lora" if lora else denoiser_name(model)), overwrite=True) as tmp:
            if lora:
                save_lora(model, tmp, denoiser_name(model))
            else:
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
