"""Cache write: quantize new K/V rows into their page slots. The launcher: checks the contract, then one
program per (token, KV head) of ``cache_write_kernels._write_kv_kernel``."""
from __future__ import annotations

import torch

from .block_checks import check_slots, checks_blocks
from .cache_write_kernels import _write_kv_kernel
from .page_format import PageLayout
from .planes import plane_views


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
                   slot_mapping: torch.Tensor, layout: PageLayout, *,
                   validate_blocks: bool | None = None) -> None:
    """Quantize ``key``/``value`` ``[T, H, D]`` into ``cache`` at ``slot_mapping[T]`` (< 0: skipped).

    ``cache`` is the layer's uint8 tensor ``[num_blocks, H, block_size * layout.slot_bytes]``. Shapes,
    dtypes, devices and strides are checked on the host; that every slot lies in the cache
    (``< num_blocks * block_size``) on CPU always, on a GPU only with ``validate_blocks=True`` or
    ``VLLM_INT4KV_CHECK_BLOCKS=1`` (a device sync per call; ``block_checks``). Unchecked, a slot past the
    cache is written past it.
    """
    if key.dim() != 3:
        raise ValueError(f"key must be [tokens, heads, head_dim], got {tuple(key.shape)}")
    num_tokens, num_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} shapes differ")
    if value.dtype != key.dtype or value.device != key.device or cache.device != key.device:
        raise ValueError(f"key ({key.dtype} on {key.device}), value ({value.dtype} on {value.device}) and "
                         f"the cache (on {cache.device}) must agree")
    if (slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.device != key.device
            or slot_mapping.dim() != 1 or slot_mapping.stride(0) != 1):
        raise TypeError(f"slot_mapping must be a contiguous 1-D int32/int64 tensor on {key.device}, got "
                        f"{slot_mapping.dtype} {tuple(slot_mapping.shape)} on {slot_mapping.device}")
    if head_dim != layout.head_dim:
        raise ValueError(f"key head_dim {head_dim} does not match the page layout's {layout.head_dim}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a contiguous last dimension")
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens")
    if num_tokens == 0:
        return
    planes = plane_views(cache, layout, key.dtype, num_heads)
    if checks_blocks(key.device, validate_blocks):
        check_slots(slot_mapping, num_tokens, planes.k.shape[0], layout.block_size)
    _write_kv_kernel[(num_tokens, num_heads)](
        key_ptr=key, value_ptr=value, slot_mapping_ptr=slot_mapping, **planes.pointers(),
        stride_key_t=key.stride(0), stride_key_h=key.stride(1),
        stride_value_t=value.stride(0), stride_value_h=value.stride(1),
        **planes.strides(), **planes.format_constants(),
    )
