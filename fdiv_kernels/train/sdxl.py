"""Stable Diffusion XL pipelines for the training loop: two text encoders, pooled embeddings, micro-conditioning.

As diffusers' ``train_diffusion_dpo_sdxl.py``: prompts go through both CLIP encoders (penultimate hidden states,
concatenated; the second encoder's pooled projection as ``text_embeds``), here by diffusers' own
``StableDiffusionXLPipeline.encode_prompt``; the micro-conditioning ``time_ids`` are
``original_size + crops_coords_top_left + target_size`` = ``(R, R, 0, 0, R, R)`` for the training side ``R``
(images are resized and centre-cropped to ``R`` squares before encoding, so that is what the model sees).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .pipeline import Pipeline, PipelineError, read_json

SDXL_COMPONENTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class SDXLTextConditioner:
    """Captions -> ``{"encoder_hidden_states", "added_cond_kwargs": {"text_embeds", "time_ids"}}``."""

    def __init__(self, pipe, resolution: int):
        self._pipe = pipe
        self.resolution = resolution  # set to the run's training side by the loop
        self.encoder = nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2])  # moved and cast as one

    def __call__(self, captions: list[str], device: torch.device) -> dict:
        states, _, pooled, _ = self._pipe.encode_prompt(
            prompt=list(captions), device=device, do_classifier_free_guidance=False
        )
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=states.dtype).repeat(len(captions), 1)
        return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def load_sdxl_pipeline(path: Path, index: dict, unet: str | Path | None = None) -> Pipeline:
    """An SDXL-layout pipeline folder as a :class:`Pipeline` (its UNet conditioned on pooled text and time ids)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    missing = [c for c in SDXL_COMPONENTS if not index.get(c) or index[c][0] is None]
    if missing:
        raise PipelineError(
            f"{path / 'model_index.json'}: an SDXL pipeline needs {list(SDXL_COMPONENTS)}; it lacks {missing}"
        )
    unet_dir = Path(unet) if unet is not None else path / "unet"
    unet_config = read_json(unet_dir / "config.json", "the UNet's config")
    kind = (unet_config.get("_class_name"), unet_config.get("addition_embed_type"))
    if kind != ("UNet2DConditionModel", "text_time"):
        raise PipelineError(
            f"{unet_dir / 'config.json'}: a pipeline with two text encoders (SDXL) needs a UNet2DConditionModel with "
            f"addition_embed_type 'text_time'; found {unet_config.get('_class_name')!r} with "
            f"{unet_config.get('addition_embed_type')!r}"
        )
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "the noise scheduler's config")
    model = UNet2DConditionModel.from_pretrained(unet_dir).float()
    absent = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}
    pipe = StableDiffusionXLPipeline.from_pretrained(path, **{**absent, "unet": model})
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return Pipeline(
        path=path,
        unet=model,
        scheduler_config=scheduler_config,
        text=SDXLTextConditioner(pipe, model.config.sample_size * vae_scale),
        vae=pipe.vae.float(),
    )
