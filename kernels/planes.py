"""Typed views of the three planes of a layer's cache tensor, shared by every launcher."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .page_format import PageLayout, padded_head_dim

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class PlaneViews:
    """``k``/``v``: uint8 views (quantized) or model-dtype views (16-bit); ``params``: fp16 view.

    Each is ``[num_blocks, num_heads, ...]`` starting at its plane; ``*_row`` are row sizes in elements
    of that view, so a kernel addresses ``plane + block * stride0 + head * stride1 + slot * row``.
    ``head_pad`` is the power of two the kernels' tiles span; ``k_group``/``v_group`` are channels per
    group as the kernels see them: one group per head spans the padded head. ``format_constants`` and
    ``strides`` are what every kernel over these planes takes, under the same names.
    """

    layout: PageLayout
    k: torch.Tensor
    v: torch.Tensor
    params: torch.Tensor
    k_row: int
    v_row: int
    p_row: int
    head_pad: int
    k_group: int
    v_group: int

    def format_constants(self) -> dict[str, int]:
        """The page format as the kernels' compile-time constants."""
        return dict(HEAD_DIM=self.layout.head_dim, HEAD_PAD=self.head_pad, BLOCK_SIZE=self.layout.block_size,
                    K_BITS=self.layout.k_bits, V_BITS=self.layout.v_bits, K_GROUP=self.k_group,
                    V_GROUP=self.v_group, K_ROW=self.k_row, V_ROW=self.v_row, P_ROW=self.p_row,
                    V_PAR_OFFSET=2 * self.layout.k_groups)

    def strides(self) -> dict[str, int]:
        """Block and head strides of the three planes, in elements of each view."""
        return dict(stride_k_block=self.k.stride(0), stride_k_head=self.k.stride(1),
                    stride_v_block=self.v.stride(0), stride_v_head=self.v.stride(1),
                    stride_p_block=self.params.stride(0), stride_p_head=self.params.stride(1))

    def pointers(self) -> dict[str, torch.Tensor]:
        return dict(k_plane_ptr=self.k, v_plane_ptr=self.v, par_ptr=self.params)


def as_runs(cache: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """``cache`` as ``[num_blocks, num_heads, run_bytes]`` uint8, checking the contract."""
    if cache.dtype != torch.uint8:
        raise TypeError(f"the INT4 KV cache must be uint8 bytes, got {cache.dtype}")
    if cache.dim() == 4:  # [blocks, heads, tokens, slot_bytes]
        if cache.shape[2:] != (layout.block_size, layout.slot_bytes) or cache.stride(2) != layout.slot_bytes:
            raise ValueError(f"cache {tuple(cache.shape)} does not hold [.., {layout.block_size}, "
                             f"{layout.slot_bytes}] contiguous runs for this layout")
        cache = cache.flatten(2)
    if cache.dim() != 3 or cache.shape[2] != layout.run_bytes or cache.stride(2) != 1:
        raise ValueError(f"cache {tuple(cache.shape)} is not [num_blocks, num_heads, "
                         f"{layout.run_bytes}] with contiguous runs (layout {layout})")
    if cache.stride(0) % 4 or cache.stride(1) % 4 or cache.storage_offset() % 4:
        raise ValueError("cache runs must be 4-byte aligned")
    return cache


def plane_views(cache: torch.Tensor, layout: PageLayout, kv_dtype: torch.dtype,
                num_heads: int | None = None) -> PlaneViews:
    if kv_dtype not in KV_DTYPES:
        raise TypeError(f"KV dtype {kv_dtype} not supported; use one of {KV_DTYPES}")
    if kv_dtype.itemsize != layout.elem_bytes:
        raise ValueError(f"layout elem_bytes={layout.elem_bytes} does not match the model dtype {kv_dtype}")
    runs = as_runs(cache, layout)
    if num_heads is not None and runs.shape[1] != num_heads:
        raise ValueError(f"cache holds {runs.shape[1]} KV heads, the tensors {num_heads}")

    def plane(start: int, bits: int, row_bytes: int):
        view = runs[..., start:]
        if bits == 16:
            return view.view(kv_dtype), row_bytes // layout.elem_bytes
        return view, row_bytes

    k, k_row = plane(0, layout.k_bits, layout.k_row_bytes)
    v, v_row = plane(layout.v_plane_offset, layout.v_bits, layout.v_row_bytes)
    p_start = layout.param_plane_offset if layout.param_row_bytes else 0
    params = runs[..., p_start:].view(torch.float16)
    head_pad = padded_head_dim(layout.head_dim)

    def kernel_group(group: int) -> int:
        return head_pad if group == layout.head_dim else group

    return PlaneViews(layout, k, v, params, k_row, v_row, layout.param_row_bytes // 2, head_pad,
                      kernel_group(layout.k_group), kernel_group(layout.v_group))
