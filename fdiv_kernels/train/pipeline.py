"""The pipeline the loaders return (:class:`Pipeline`), and what every loader shares: the error type, reading a
folder's JSON, placing modules. ``model`` (UNet folders), ``sdxl`` and ``flow`` (SD3) build it; nothing here
imports them, so they import this and ``model`` imports them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn


def place(module: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Move and cast a module. Casts go through ``.float()``/``.half()``/``.bfloat16()``: diffusers' ``.to(dtype)``
    warns about fp32-pinned modules even for models that have none."""
    if device is not None:
        module.to(device)
    if dtype is not None:
        getattr(module, {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}[dtype])()
    return module


class PipelineError(ValueError):
    """A pipeline folder that cannot be used for training; the message names the file and the fix."""


@dataclass
class Pipeline:
    """The components of a local pipeline folder that training and sampling use."""

    path: Path
    unet: nn.Module  # the denoiser: a UNet2DConditionModel, or SD3Transformer2DModel (flow.py)
    scheduler_config: dict
    text: Callable  # captions, device -> conditioning: model.TextConditioner, sdxl's or flow's
    vae: AutoencoderKL | None

    @property
    def vae_scale(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Default training image size: the UNet's native sample size in pixels."""
        return self.unet.config.sample_size * self.vae_scale

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this for the UNet's down/up-sampling (a transformer's patches) to
        line up."""
        if "patch_size" in self.unet.config:
            return self.vae_scale * self.unet.config.patch_size
        return self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def frozen_parts_to(self, device: torch.device, dtype: torch.dtype) -> None:
        for module in (self.text.encoder, self.vae):
            if module is not None:
                place(module.requires_grad_(False).eval(), device, dtype)

    def encode(self, pixels: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the UNet's input space (VAE latents, scaled; or the pixels themselves)."""
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator=generators)
        shift = self.vae.config.shift_factor or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`, to images in [-1, 1]."""
        if self.vae is None:
            return latents
        shift = self.vae.config.shift_factor or 0.0
        return self.vae.decode((latents / self.vae.config.scaling_factor + shift).to(self.vae.dtype)).sample.float()


def read_json(path: Path, what: str) -> dict:
    """A pipeline folder's JSON file (``what`` says what it should be when it is missing)."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path} is not valid JSON ({err})") from err
