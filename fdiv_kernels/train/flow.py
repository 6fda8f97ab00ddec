"""Flow-matching transformer pipelines (Stable Diffusion 3 layout) for the training loop.

An SD3 pipeline folder (``StableDiffusion3Pipeline.save_pretrained``) has ``transformer`` (an
``SD3Transformer2DModel``), a ``FlowMatchEulerDiscreteScheduler``, ``vae`` (latents shifted and scaled by its
``shift_factor`` / ``scaling_factor``), two CLIP text encoders with projection and optionally T5. Prompts are
encoded by diffusers' own ``StableDiffusion3Pipeline.encode_prompt`` (CLIP states concatenated and padded to
T5's width, then T5 appended; the pooled CLIP projections as ``pooled_projections``), so conditioning is
exactly what the diffusers SD3 pipeline and training scripts feed the transformer. The target is the flow
``noise - latents`` (see :class:`fdiv_kernels.train.model.NoiseProcess`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .pipeline import Pipeline, PipelineError, read_json

# What the SD3 pipeline needs; text_encoder_3 / tokenizer_3 (T5) are optional, as in diffusers.
SD3_COMPONENTS = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# diffusers' SD3 training scripts encode prompts for T5 at this length (their --max_sequence_length default).
MAX_SEQUENCE_LENGTH = 77


class SD3TextConditioner:
    """Captions -> ``{"encoder_hidden_states", "pooled_projections"}`` through diffusers' SD3 ``encode_prompt``."""

    def __init__(self, pipe):
        self._pipe = pipe
        # One module holding every frozen text encoder, so that Pipeline.frozen_parts_to moves and casts them all.
        self.encoder = nn.ModuleList(
            [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
        )

    def __call__(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        states, _, pooled, _ = self._pipe.encode_prompt(
            prompt=list(captions),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return {"encoder_hidden_states": states, "pooled_projections": pooled}


def load_sd3_pipeline(path: Path, index: dict, transformer: str | Path | None = None) -> Pipeline:
    """An SD3-layout pipeline folder as a :class:`Pipeline` whose denoiser (``.unet``) is the transformer."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    missing = [c for c in SD3_COMPONENTS if not index.get(c) or index[c][0] is None]
    transformer_dir = Path(transformer) if transformer is not None else path / "transformer"
    denoiser = read_json(transformer_dir / "config.json", "the transformer's config").get("_class_name")
    if denoiser != "SD3Transformer2DModel":
        raise PipelineError(
            f"{transformer_dir / 'config.json'}: the denoiser is {denoiser!r}; this trainer fine-tunes "
            "UNet2DConditionModel and SD3Transformer2DModel (Flux and other transformers are not supported yet)"
        )
    if missing:
        raise PipelineError(
            f"{path / 'model_index.json'}: an SD3 pipeline needs {list(SD3_COMPONENTS)}; it lacks {missing}"
        )
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "the noise scheduler's config")
    model = SD3Transformer2DModel.from_pretrained(transformer_dir).float()
    # Components the folder lists as absent (T5, image encoder) must be passed as None explicitly.
    absent = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **{**absent, "transformer": model})
    return Pipeline(
        path=path, unet=model, scheduler_config=scheduler_config, text=SD3TextConditioner(pipe), vae=pipe.vae.float()
    )
