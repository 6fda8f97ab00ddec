"""The divergence study: alignment vs diversity of f-DPO fine-tunes on an embedded text-to-image task.

A research harness of this repository, kept out of the kernel wheel with its base models (``assets/``). It
fine-tunes through the wheel's training loop, ``fdiv_kernels.train``. Modules: ``task`` (the embedded prompts,
renderer and programmatic reward), ``pretrain`` (the base models in ``assets/``), ``reward_model`` (a learned
labeller), ``study`` (one study), ``frontier`` (``study --frontier``: several strengths and seeds),
``bootstrap`` (seed x prompt statistics), ``study_report`` (the generated tables of
docs/training.md), ``fingerprint`` (a seconds-long check that the committed results match the code), ``cli``
(``python -m fdpo_study``; ``make study``). See docs/training.md.
"""
