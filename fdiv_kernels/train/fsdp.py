"""``--fsdp``: the trained model sharded with torch's FSDP2 (``fully_shard``), one unit per block, instead of
Accelerate's DDP wrapping. (Accelerate 1.16 ignores its FSDP plugin under ``--cpu``, so the loop shards the model
itself; this runs on CPU with gloo as on GPUs with NCCL.)

Checkpoints and the final save hold the full weights, gathered on the main process: a checkpoint records the full
model and optimizer states (``custom_checkpoint_0.pkl``, keyed by parameter name) and resumes into the sharded
model; the final ``unet/`` is an ordinary diffusers folder that one process loads. The frozen reference copy is not
sharded: every process holds it whole (or pass ``--ref-errors``)."""

from __future__ import annotations

import torch

# torch.distributed's modules are imported where used: builds without distributed support still train without
# --fsdp.

# Blocks sharded one unit each (UNet2DConditionModel's and SD3's transformer's), then the root holds the rest.
_BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
_BLOCKS = ("mid_block",)


def _options(gather: bool = True):
    """Full (unsharded) state dicts; gathered onto the main process's CPU, or (loading) given to every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=gather)


def check_fsdp_flags(cfg) -> None:
    """What ``--fsdp`` runs with, refused before anything is loaded (the process count is checked later)."""
    if not cfg.fsdp:
        return
    for name, value, why in (
        ("--lora-rank", cfg.lora_rank is not None, "adapters are small: train them under DDP"),
        ("--mixed-precision", cfg.mixed_precision != "no", "FSDP2's own mixed precision is not wired in"),
        ("--compile", cfg.compile, "torch.compile of a sharded model is untested here"),
    ):
        if value:
            raise ValueError(f"--fsdp does not run with {name} ({why}); drop one of the two")


def check_fsdp_launch(accelerator) -> None:
    """``--fsdp`` needs several processes of a plain (DDP-type) launch: the loop shards the model itself."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes < 2:
        raise ValueError(
            "--fsdp shards the model over processes and this run has one: launch it with accelerate launch "
            "--multi_gpu --num_processes N (N >= 2; with --cpu, gloo processes), or drop --fsdp"
        )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"--fsdp shards the model itself, and this launch is Accelerate's {accelerator.distributed_type.value}: "
            "launch with a plain multi-process config (examples/accelerate/ddp.yaml), or drop --fsdp"
        )


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place over all processes: each block its own unit, then the root (parameters become
    DTensors, so the optimizer is made afterwards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for name in _BLOCK_LISTS:
        for block in getattr(model, name, None) or []:
            fully_shard(block, mesh=mesh)
    for name in _BLOCKS:
        if getattr(model, name, None) is not None:
            fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights, on the CPU of the main process (an empty dict elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def unsharded_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) model of ``model``'s class and config holding ``state``, to save as diffusers does."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    plain = cls.from_config(model.config)
    plain.load_state_dict(state, strict=True)
    return plain


class FullCheckpointState:
    """The sharded model's and optimizer's full states as one Accelerate checkpointing object
    (``accelerator.register_for_checkpointing``): ``state_dict`` gathers (every process calls it; the main one
    writes), ``load_state_dict`` gives each process its shards of the full states every process reads."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {
            "model": full_model_state(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=_options()),
        }

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        options = _options(gather=False)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
