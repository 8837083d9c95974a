"""Shared test set-up. Keep the environment block first: it must run before anything imports triton.

Without a GPU the Triton kernels run under the interpreter (exact for fp32/fp16, wrong for bf16
arithmetic, so CPU tests compute in fp32/fp16). Tests that need a GPU carry the ``gpu`` marker.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run the suite on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
