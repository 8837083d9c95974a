"""Loaded by every Python process of a test run under ``VLLM_INT4KV_TEST_CPU=avx2`` (the test set-up puts
this folder on PYTHONPATH): engine and quality-worker subprocesses then see the CPU that the test process
pretends to be. See ``tests/conftest.py``."""
import os

if os.environ.get("VLLM_INT4KV_TEST_CPU") == "avx2":
    import torch.cpu

    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
