"""f-DPO fine-tuning of diffusers text-to-image models (UNet, SDXL, SD3 flow; LoRA; Accelerate).

Modules: ``loop`` (the training loop, Accelerate + ``fused_fdpo_loss``), ``data`` and ``datasets_io``
(Pick-a-Pic preference tables), ``pipeline`` (the pipeline type the loaders return), ``model`` (pipeline
folders, the noise process, sampling, the embedded text encoder), ``sdxl`` and ``flow`` (SDXL and SD3 layouts),
``lora``, ``timesteps``, ``config``, ``io``, ``cli`` (``fdpo-train`` / ``python -m fdiv_kernels.train``). The
divergence study that uses this loop is the repository's ``fdpo_study`` package. See docs/training.md.
"""
