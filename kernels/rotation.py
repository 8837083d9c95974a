"""Orthonormal Hadamard rotation of the head dimension.

Rotating keys and values before they are quantized spreads an outlier channel over all channels, so a
per-(token, head) scale no longer has to cover one huge channel. Because H is orthonormal,
``q.k = (qH).(kH)`` and ``sum p v = (sum p vH) H^T``: the cache stores ``kH``/``vH``, the query is rotated
before attention and the output rotated back after it. Nothing else changes.

A head dim that is not a power of two (80, 96, ...) is rotated block-diagonally, in blocks of the largest
power of two dividing it (96: three blocks of 32), as vLLM's INT4 cache does: still orthonormal, but an
outlier spreads only over its own block.
"""
from __future__ import annotations

import functools

import torch


def hadamard_block(dim: int) -> int:
    """The size of the Hadamard blocks on the diagonal: the largest power of two dividing ``dim``."""
    return dim & -dim


@functools.lru_cache(maxsize=None)
def _hadamard_on(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dim < 1:
        raise ValueError(f"Hadamard rotation needs a positive head_dim, got {dim}")
    # built on the device itself (no host-to-device copy) in fp32 whatever the default dtype. Still, build
    # it before any CUDA-graph capture (the backend does when it sets a layer's layout): inside a capture
    # these kernels would only be recorded, and the cached matrix left unfilled until a replay.
    block = hadamard_block(dim)
    h = torch.ones(1, 1, device=device, dtype=torch.float32)
    while h.shape[0] < block:  # Sylvester construction
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    if block < dim:
        h = torch.block_diag(*[h] * (dim // block))
    return (h / block ** 0.5).to(dtype)


def hadamard(dim: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The symmetric orthonormal ``[dim, dim]`` Hadamard matrix (its own inverse); block-diagonal where
    ``dim`` is not a power of two.

    Cached per device and dtype: rotation runs for every layer at every step, where building it again
    would cost kernels (and a host copy, a sync) each time.
    """
    return _hadamard_on(dim, dtype, torch.device(device))


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` over the last dimension, computed in fp32, returned in ``x``'s dtype."""
    h = hadamard(x.shape[-1], device=x.device)
    return (x.float() @ h).to(x.dtype)


unrotate = rotate  # H is symmetric and orthonormal, so H^-1 = H
