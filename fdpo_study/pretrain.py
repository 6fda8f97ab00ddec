"""``pretrain``: train the embedded default's base model (UNet + text encoder, jointly) on the rendered task.

Plain denoising (epsilon) training on freshly rendered images of the task's prompts, on CPU, seeded. Its output
is a pipeline folder (weights stored in float16) with a ``pretraining.json`` that records the settings and the
prompts left out. Shipped: ``fdpo_study/assets/base`` (all 180 prompts) and ``assets/base_novel``
(``--hold-out-novel``: without the 18 prompts of :func:`task.novel_specs`).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from fdiv_kernels.train.io import atomic_folder
from fdiv_kernels.train.model import TinyTextEncoder, WordTokenizer, save_pipeline, tiny_unet

from . import task

CAPTION_WORDS = 7  # "a {size} {colour} {shape} at the {position}"
# Written into the pipeline folder: what the base was pretrained on (read by the study's prompt groups).
PRETRAINING_FILE = "pretraining.json"


@dataclass
class PretrainConfig:
    output: Path
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    seed: int = 0
    resolution: int = task.RESOLUTION
    hold_out_novel: bool = False  # leave task.novel_specs() out of pretraining

    def __post_init__(self):
        self.output = Path(self.output)
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0), ("resolution", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}; got {value!r}")
        if not isinstance(self.hold_out_novel, bool):
            raise ValueError(f"hold_out_novel must be True or False; got {self.hold_out_novel!r}")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"--learning-rate must be a finite number > 0; got {lr!r}")


def lr_multiplier(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0 (the decay stands in for weight averaging at this scale)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(cfg: PretrainConfig, overwrite: bool = False) -> Path:
    """Train the base model and write it as a pipeline folder at ``cfg.output``; returns the folder."""
    if cfg.output.exists() and not cfg.output.is_dir():
        raise FileExistsError(f"--output {cfg.output} is a file; a pipeline is a folder: choose another path")
    if cfg.output.exists() and not overwrite:
        raise FileExistsError(f"{cfg.output} already exists; choose another output folder or pass --overwrite")
    held_out = set(task.novel_specs()) if cfg.hold_out_novel else set()
    prompts = [s for s in task.ALL_SPECS if s not in held_out]
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokenizer = WordTokenizer(list(task.VOCABULARY), CAPTION_WORDS)
    encoder = TinyTextEncoder(len(task.VOCABULARY), CAPTION_WORDS, width=32)
    unet = tiny_unet(cfg.resolution, cross_attention_dim=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    parameters = [*unet.parameters(), *encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.steps, cfg.warmup_steps)
    )
    bar = tqdm(range(cfg.steps), desc="pretrain", dynamic_ncols=True)
    for _ in bar:
        specs = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch_size,), generator=generator)]
        images = task.render(specs, generator, cfg.resolution) * 2 - 1
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        cond = encoder(tokenizer([s.caption for s in specs]))
        pred = unet(scheduler.add_noise(images, noise, timesteps), timesteps, cond).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with atomic_folder(cfg.output, overwrite=overwrite) as tmp:
        save_pipeline(tmp, unet, scheduler, tokenizer, encoder, dtype=torch.float16)
        settings = {k: v for k, v in asdict(cfg).items() if k != "output"}
        record = {"settings": settings, "prompts_held_out": sorted(s.caption for s in held_out)}
        (tmp / PRETRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return cfg.output


def prompts_held_out(pipeline: Path) -> set[str] | None:
    """The captions a pipeline's pretraining left out, from its ``pretraining.json``; None when it has none (a
    pipeline not made by :func:`pretrain`: what it saw is unknown)."""
    path = Path(pipeline) / PRETRAINING_FILE
    if not path.is_file():
        return None
    try:
        return set(json.loads(path.read_text())["prompts_held_out"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected JSON with a 'prompts_held_out' list of captions ({err})") from None
