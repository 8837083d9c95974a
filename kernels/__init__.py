"""Triton kernels, their launchers and torch references for the quantized paged KV cache.

Nothing in this subpackage imports vLLM.
"""
from .page_format import PageLayout, slot_bytes

__all__ = ["PageLayout", "slot_bytes"]
