import os

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
if not torch.cuda.is_available():
    # No GPU: Triton kernels run in its interpreter on CPU tensors. Must be set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
