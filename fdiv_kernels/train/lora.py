"""LoRA fine-tuning through peft, as diffusers' Diffusion-DPO scripts do it.

The adapters go on the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of the denoiser (UNet
or transformer). The reference model is the same model with its adapters disabled, so LoRA training holds one
copy of the base weights, and the first step starts exactly at the reference (peft initialises ``B = 0``).
Weights are saved in diffusers' LoRA format (``pytorch_lora_weights.safetensors``, keys prefixed ``unet.`` or
``transformer.``), which ``pipeline.load_lora_weights(folder)`` reads.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# diffusers' train_diffusion_dpo*.py adapt these UNet modules; train_dreambooth_lora_sd3.py adds the SD3
# transformer's text-stream projections.
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TRANSFORMER_TARGET_MODULES = TARGET_MODULES + ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("--lora-rank needs the peft package (pip install peft, or fdiv_kernels[train])") from err
    return peft


def check_lora_flags(rank: int | None, alpha: float | None) -> None:
    """Flag-level checks, run before anything is loaded or written."""
    if rank is None:
        if alpha is not None:
            raise ValueError("--lora-alpha needs --lora-rank (without it the whole model is fine-tuned)")
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer; got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"--lora-alpha must be > 0; got {alpha!r}")
    _peft()


def add_lora(
    model: nn.Module, rank: int, alpha: float | None = None, where: str = "the model", seed: int = 0
) -> nn.Module:
    """Freeze ``model`` and add trainable LoRA adapters (``lora_alpha`` defaults to ``rank``, as diffusers' scripts).

    The random initialisation of the ``A`` matrices is drawn from ``seed`` (not the global generator), so a run
    is repeatable and every process starts from the same adapters.

    Raises a ``ValueError`` naming ``where`` if the model has none of the target modules.
    """
    from .model import denoiser_name

    peft = _peft()
    targets = TARGET_MODULES if denoiser_name(model) == "unet" else TRANSFORMER_TARGET_MODULES
    # peft's own matching rule: a module name equal to a target or ending in "." + target.
    names = [name for name, _ in model.named_modules()]
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise ValueError(f"--lora-rank: {where} has no attention projections {targets} to adapt")
    model.requires_grad_(False)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(config)
    # The adapters train in fp32 whatever the frozen weights' dtype (diffusers' cast_training_params).
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: ``model`` (unwrapped from DDP / compile) with its LoRA adapters off, for the reference."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def save_lora(model: nn.Module, folder: Path, prefix: str) -> None:
    """``folder/pytorch_lora_weights.safetensors`` in diffusers' format (keys ``{prefix}.…``; peft config in the
    metadata)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    peft = _peft()
    layers = peft.get_peft_model_state_dict(model)
    if prefix == "unet":  # the UNet DPO scripts write diffusers' own key names; the SD3 scripts keep peft's
        layers = convert_state_dict_to_diffusers(layers)
    layers = {k: v.detach().float().contiguous() for k, v in layers.items()}
    metadata = model.peft_config["default"].to_dict()
    if prefix == "unet":
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, safe_serialization=True
        )
    elif prefix == "transformer":
        StableDiffusion3Pipeline.save_lora_weights(
            folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata, safe_serialization=True
        )
    else:
        raise ValueError(f"no LoRA format for a {prefix!r} component")


def load_lora(model: nn.Module, folder: str | Path, prefix: str) -> nn.Module:
    """Load what :func:`save_lora` wrote into ``model`` (the base weights), as its active adapter."""
    _peft()
    file = Path(folder) / WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a LoRA folder written by training has {WEIGHT_NAME}")
    model.load_lora_adapter(str(folder), prefix=prefix, weight_name=WEIGHT_NAME)
    return model


def lora_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
