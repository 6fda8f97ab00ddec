import os

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, request):
    """The training tests' tiny pipelines and dataset, built once per module (tests copy before they change)."""
    from train_helpers import make_dataset, make_pipeline

    root = tmp_path_factory.mktemp(request.module.__name__)
    return {
        "pipeline": make_pipeline(root / "pipe"),
        "pixel_pipeline": make_pipeline(root / "pixel_pipe", vae=False),
        "dataset": make_dataset(root / "data"),
        "root": root,
    }
