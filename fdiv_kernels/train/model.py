"""Models and local diffusers pipeline folders: loading, saving, the noise process of training, and sampling.

A pipeline folder is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` plus one folder
per component. The trainer needs ``unet`` (a ``UNet2DConditionModel``), ``scheduler``, ``text_encoder`` and
``tokenizer``, and uses ``vae`` when present (latent diffusion) or trains in pixel space when absent. Text
encoders come from ``transformers`` (``CLIPTextModel``, as in Stable Diffusion 1.x/2.x) or are the embedded
task's :class:`TinyTextEncoder` with its :class:`WordTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from torch import nn

from .flow import load_sd3_pipeline
from .pipeline import Pipeline, PipelineError, place, read_json
from .sdxl import load_sdxl_pipeline

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
_OWN_LIBRARY = "fdiv_kernels.train"


class WordTokenizer:
    """Word-level tokenizer of the embedded task: whitespace-split lower-case words, id 0 is padding."""

    def __init__(self, vocabulary: list[str], max_length: int):
        self.vocabulary = list(vocabulary)
        self.max_length = max_length
        self._ids = {word: i + 1 for i, word in enumerate(self.vocabulary)}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = caption.lower().split()
            if len(words) > self.max_length:
                raise ValueError(f"caption {caption!r} has {len(words)} words; this tokenizer takes {self.max_length}")
            for col, word in enumerate(words):
                if word not in self._ids:
                    raise ValueError(f"caption {caption!r}: word {word!r} is not in the tokenizer's vocabulary")
                ids[row, col] = self._ids[word]
        return ids

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(
            json.dumps({"vocabulary": self.vocabulary, "max_length": self.max_length}, indent=1)
        )

    @classmethod
    def from_pretrained(cls, folder: Path) -> WordTokenizer:
        config = json.loads((Path(folder) / "tokenizer.json").read_text())
        return cls(config["vocabulary"], config["max_length"])


class TinyTextEncoder(nn.Module):
    """A small transformer text encoder: token + position embeddings, pre-norm encoder layers, final norm.

    Returns hidden states ``[N, max_length, width]`` for a UNet's cross-attention (``cross_attention_dim``).
    """

    def __init__(self, vocab_size: int, max_length: int, width: int = 32, layers: int = 2, heads: int = 4):
        super().__init__()
        self.config = {
            "vocab_size": vocab_size,
            "max_length": max_length,
            "width": width,
            "layers": layers,
            "heads": heads,
        }
        self.token = nn.Embedding(vocab_size + 1, width, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.token(input_ids) + self.position
        return self.norm(self.encoder(hidden, src_key_padding_mask=input_ids == 0))

    def save_pretrained(self, folder: Path, dtype: torch.dtype = torch.float32) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=1))
        save_file(
            {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors"
        )

    @classmethod
    def from_pretrained(cls, folder: Path) -> TinyTextEncoder:
        folder = Path(folder)
        model = cls(**json.loads((folder / "config.json").read_text()))
        state = load_file(folder / "model.safetensors")
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model


class TextConditioner:
    """Captions -> the UNet's ``encoder_hidden_states``, with a frozen tokenizer and text encoder."""

    def __init__(self, tokenizer, encoder: nn.Module):
        self.tokenizer = tokenizer
        self.encoder = encoder

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        if isinstance(self.tokenizer, WordTokenizer):
            return self.tokenizer(captions)
        return self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def __call__(self, captions: list[str], device: torch.device) -> torch.Tensor:
        hidden = self.encoder(self.token_ids(captions).to(device))
        return hidden if isinstance(self.encoder, TinyTextEncoder) else hidden[0]


def tiny_unet(
    resolution: int, channels: int = 3, cross_attention_dim: int = 32, block_out_channels: tuple[int, ...] = (32, 64)
) -> UNet2DConditionModel:
    """The embedded default's image model (about 1M parameters at the default widths)."""
    return UNet2DConditionModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def load_pipeline(path: str | Path, unet: str | Path | None = None) -> Pipeline:
    """Load a local pipeline folder for training; ``unet`` replaces its UNet with a fine-tuned one (a folder)."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"pipeline folder {path} does not exist")
    index = read_json(path / "model_index.json", "a diffusers pipeline folder has a model_index.json")
    if index.get("transformer") and index["transformer"][0] is not None:
        return load_sd3_pipeline(path, index, transformer=unet)
    if index.get("text_encoder_2") and index["text_encoder_2"][0] is not None:
        return load_sdxl_pipeline(path, index, unet=unet)
    for component in ("unet", "scheduler", "text_encoder", "tokenizer"):
        if not index.get(component) or index[component][0] is None:
            found = sorted(k for k, v in index.items() if not k.startswith("_") and v and v[0] is not None)
            raise PipelineError(
                f"{path / 'model_index.json'} lists no {component!r} component (it has {found}); "
                "this trainer needs a UNet2DConditionModel pipeline with unet, scheduler, text_encoder, tokenizer"
            )
    unet_dir = Path(unet) if unet is not None else path / "unet"
    unet_config = read_json(unet_dir / "config.json", "the UNet's config")
    if unet_config.get("_class_name") != "UNet2DConditionModel":
        raise PipelineError(
            f"{unet_dir / 'config.json'}: the denoiser is {unet_config.get('_class_name')!r}; "
            "this trainer fine-tunes UNet2DConditionModel"
        )
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "the noise scheduler's config")
    vae = None
    if index.get("vae") and index["vae"][0] is not None:
        vae = AutoencoderKL.from_pretrained(path / "vae").float()
    return Pipeline(
        path=path,
        unet=UNet2DConditionModel.from_pretrained(unet_dir).float(),
        scheduler_config=scheduler_config,
        text=_load_text(path, index),
        vae=vae,
    )


def denoise(model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
    """One denoiser call: ``cond`` is a UNet's text states, or a dict of the model's conditioning keywords."""
    if isinstance(cond, dict):
        return model(noisy, timestep=timesteps, **cond).sample
    return model(noisy, timesteps, cond).sample


def speed_switches(
    model: nn.Module, gradient_checkpointing: bool = False, compile: bool = False, compile_backend: str = "inductor"
) -> nn.Module:
    """Gradient checkpointing (blocks recompute their activations in the backward pass: less memory, about a
    third more compute) and ``torch.compile`` in place (``Module.compile``: state-dict keys stay the same, so
    checkpoints, resuming and saving are unaffected)."""
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if compile:
        model.compile(backend=compile_backend)
    return model


def check_compile_backend(backend: str) -> None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"--compile-backend {backend!r}: torch.compile knows {known}")


def denoiser_name(model: nn.Module) -> str:
    """The pipeline component a denoiser is saved as (and the prefix of its LoRA keys)."""
    return "unet" if isinstance(model, UNet2DConditionModel) else "transformer"


def _load_text(path: Path, index: dict) -> TextConditioner:
    library, encoder_class = index["text_encoder"]
    tokenizer_class = index["tokenizer"][1]
    if library == _OWN_LIBRARY:
        return TextConditioner(
            WordTokenizer.from_pretrained(path / "tokenizer"), TinyTextEncoder.from_pretrained(path / "text_encoder")
        )
    if library != "transformers":
        raise PipelineError(f"{path / 'model_index.json'}: text encoder from {library!r} is not supported")
    try:
        import transformers
    except ImportError as err:
        raise PipelineError(
            f"{path}: its text encoder is transformers.{encoder_class}; install transformers to load it"
        ) from err
    tokenizer = getattr(transformers, tokenizer_class).from_pretrained(path / "tokenizer")
    return TextConditioner(tokenizer, getattr(transformers, encoder_class).from_pretrained(path / "text_encoder"))


def save_pipeline(
    folder: Path,
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    tokenizer: WordTokenizer,
    encoder: TinyTextEncoder,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a pixel-space pipeline folder with the embedded text encoder (weights stored in ``dtype``)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "FDPOTinyTextToImage",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": [_OWN_LIBRARY, "TinyTextEncoder"],
        "tokenizer": [_OWN_LIBRARY, "WordTokenizer"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    place(unet, dtype=dtype).save_pretrained(folder / "unet")
    place(unet, dtype=torch.float32)
    scheduler.save_pretrained(folder / "scheduler")
    tokenizer.save_pretrained(folder / "tokenizer")
    encoder.save_pretrained(folder / "text_encoder", dtype=dtype)


class NoiseProcess:
    """Forward noising and the regression target of one training step.

    ``epsilon`` and ``v_prediction`` use the pipeline's DDPM-family noise schedule (as Diffusion-DPO does);
    ``flow`` is rectified flow as in diffusers' SD3 scripts: ``x_t = (1 - sigma) x + sigma noise``, target
    ``noise - x``, timesteps and (shifted) sigmas from ``FlowMatchEulerDiscreteScheduler``.
    """

    def __init__(self, scheduler_config: dict, prediction_type: str | None = None):
        is_flow = "FlowMatch" in scheduler_config.get("_class_name", "")
        self.prediction_type = prediction_type or (
            "flow" if is_flow else scheduler_config.get("prediction_type", "epsilon")
        )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )
        if self.prediction_type == "flow":
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config if is_flow else {})
        else:
            self.scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=self.prediction_type)
        self.num_timesteps = self.scheduler.config.num_train_timesteps

    @property
    def shared_target(self) -> bool:
        """Whether the target depends on the noise only, so winner and loser (same noise) share it."""
        return self.prediction_type == "epsilon"

    def prepare(self, latents: torch.Tensor, noise: torch.Tensor, index: torch.Tensor):
        """(noisy input, model timesteps, target) for timestep indices ``index`` in [0, num_timesteps)."""
        if self.prediction_type == "flow":
            sigma = self.scheduler.sigmas.to(latents.device)[index].view(-1, *[1] * (latents.dim() - 1))
            noisy = (1 - sigma) * latents + sigma * noise
            return noisy, self.scheduler.timesteps.to(latents.device)[index], noise - latents
        noisy = self.scheduler.add_noise(latents, noise, index)
        if self.prediction_type == "epsilon":
            return noisy, index, noise
        return noisy, index, self.scheduler.get_velocity(latents, noise, index)


def sampler_for(pipe: Pipeline):
    """A few-step deterministic sampler for the pipeline's noise process (DDIM, or flow-matching Euler)."""
    process = NoiseProcess(pipe.scheduler_config)
    if process.prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(process.scheduler.config)
    # Trailing spacing starts from the last training timestep, which matters with few steps.
    return DDIMScheduler.from_config(process.scheduler.config, timestep_spacing="trailing")


@torch.no_grad()
def sample(
    pipe: Pipeline, captions: list[str], noise: torch.Tensor, steps: int = 10, batch_size: int = 256, progress=None
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for ``captions``, starting from the given initial ``noise``."""
    device = pipe.unet.device
    images = []
    for start in range(0, len(captions), batch_size):
        sampler = sampler_for(pipe)
        sampler.set_timesteps(steps)
        cond = pipe.text(captions[start : start + batch_size], device)
        x = noise[start : start + batch_size].to(device) * sampler.init_noise_sigma
        for t in sampler.timesteps:
            pred = pipe.unet(sampler.scale_model_input(x, t), t, cond).sample
            x = sampler.step(pred, t, x).prev_sample
        images.append((pipe.decode(x) / 2 + 0.5).clamp(0, 1).cpu())
        if progress is not None:
            progress.update(len(cond))
    return torch.cat(images)
