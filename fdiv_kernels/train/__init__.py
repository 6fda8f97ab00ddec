"""f-DPO fine-tuning of diffusers text-to-image models, and the embedded text-to-image default with its study.

Modules: ``loop`` (the training loop, Accelerate + ``fused_fdpo_loss``), ``data`` (Pick-a-Pic preference
tables), ``model`` (pipeline folders, the noise process, sampling, the embedded text encoder), ``task`` (the
embedded prompts, renderer and programmatic reward), ``pretrain`` (the embedded base model), ``study`` (the
divergence study), ``cli`` (``fdpo-train`` / ``python -m fdiv_kernels.train``). See docs/training.md.
"""
