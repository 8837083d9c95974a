"""Cache write: quantize new K/V rows and pack them into their page slots (one kernel, all bit widths)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_checks import check_slots, checks_blocks
from .page_format import FP16_MAX as _FP16_MAX, PageLayout
from .planes import plane_views

# Globals read inside @jit must be tl.constexpr: the interpreter accepts plain floats, the GPU compiler
# refuses them. The nudges are the directed rounding of reference.quant_params (see there for why).
NUDGE_REL = tl.constexpr(2.0 ** -10)
NUDGE_ABS = tl.constexpr(2.0 ** -24)
FP16_MAX = tl.constexpr(_FP16_MAX)


@triton.jit
def _encode_row(src_ptr, dst_ptr, par_ptr, BITS: tl.constexpr, GROUP: tl.constexpr,
                HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Quantize one head's row of HEAD_DIM channels from ``src_ptr`` into its plane row ``dst_ptr``.

    Channels are handled as even/odd halves, the two nibbles of each INT4 byte; a group of GROUP
    channels is GROUP // 2 consecutive entries of each half. Tiles span HEAD_PAD (a power of two)
    channels; past HEAD_DIM nothing is read or stored, and no group's range includes them.
    """
    HALF: tl.constexpr = HEAD_PAD // 2
    offs_j = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_PAD)
    in_d = offs_d < HEAD_DIM  # (all true unless the head is padded)
    in_j = offs_j < HEAD_DIM // 2
    if BITS == 16:
        tl.store(dst_ptr + offs_d, tl.load(src_ptr + offs_d, mask=in_d), mask=in_d)
    else:
        LEVELS: tl.constexpr = 2 ** BITS - 1
        NUM_GROUPS: tl.constexpr = HEAD_PAD // GROUP
        x_even, x_odd = tl.split(tl.reshape(tl.load(src_ptr + offs_d, mask=in_d, other=0).to(tl.float32),
                                            (HALF, 2)))
        x_even = tl.minimum(tl.maximum(x_even, -FP16_MAX), FP16_MAX)
        x_odd = tl.minimum(tl.maximum(x_odd, -FP16_MAX), FP16_MAX)
        g_even = tl.reshape(x_even, (NUM_GROUPS, GROUP // 2))
        g_odd = tl.reshape(x_odd, (NUM_GROUPS, GROUP // 2))
        lo_even, lo_odd, hi_even, hi_odd = g_even, g_odd, g_even, g_odd
        if HEAD_PAD != HEAD_DIM:  # padding channels must not widen a group's range
            g_in = tl.reshape(in_j, (NUM_GROUPS, GROUP // 2))
            lo_even = tl.where(g_in, g_even, FP16_MAX)
            lo_odd = tl.where(g_in, g_odd, FP16_MAX)
            hi_even = tl.where(g_in, g_even, -FP16_MAX)
            hi_odd = tl.where(g_in, g_odd, -FP16_MAX)
        lo = tl.minimum(tl.min(lo_even, axis=1), tl.min(lo_odd, axis=1))  # [NUM_GROUPS]
        hi = tl.maximum(tl.max(hi_even, axis=1), tl.max(hi_odd, axis=1))
        zero = tl.maximum(lo - tl.abs(lo) * NUDGE_REL - NUDGE_ABS, -FP16_MAX).to(tl.float16)
        step = (hi - zero.to(tl.float32)) / LEVELS
        scale = (step + tl.abs(step) * NUDGE_REL + NUDGE_ABS).to(tl.float16)
        z = zero.to(tl.float32)[:, None]
        s = scale.to(tl.float32)[:, None]
        c_even = tl.minimum(tl.maximum(tl.floor((g_even - z) / s + 0.5), 0.0), LEVELS)
        c_odd = tl.minimum(tl.maximum(tl.floor((g_odd - z) / s + 0.5), 0.0), LEVELS)
        c_even = tl.reshape(c_even.to(tl.int32), (HALF,))
        c_odd = tl.reshape(c_odd.to(tl.int32), (HALF,))
        if BITS == 4:
            tl.store(dst_ptr + offs_j, (c_even | (c_odd << 4)).to(tl.uint8), mask=in_j)
        else:
            codes = tl.reshape(tl.join(c_even, c_odd), (HEAD_PAD,)).to(tl.uint8)
            tl.store(dst_ptr + offs_d, codes, mask=in_d)
        offs_g = tl.arange(0, NUM_GROUPS)
        in_g = offs_g < (HEAD_DIM + GROUP - 1) // GROUP  # one group spanning a padded head is stored
        tl.store(par_ptr + 2 * offs_g, scale, mask=in_g)
        tl.store(par_ptr + 2 * offs_g + 1, zero, mask=in_g)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, slot_mapping_ptr,
    k_plane_ptr, v_plane_ptr, par_ptr,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_k_block, stride_k_head, stride_v_block, stride_v_head, stride_p_block, stride_p_head,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    K_ROW: tl.constexpr, V_ROW: tl.constexpr, P_ROW: tl.constexpr, V_PAR_OFFSET: tl.constexpr,
):
    """One program per (token, kv head). Row sizes are in elements of each plane's pointer type."""
    token = tl.program_id(0).to(tl.int64)  # token * stride passes 2^31 past ~350k tokens of a fused QKV
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    par_row = par_ptr + block * stride_p_block + head * stride_p_head + offset * P_ROW
    _encode_row(key_ptr + token * stride_key_t + head * stride_key_h,
                k_plane_ptr + block * stride_k_block + head * stride_k_head + offset * K_ROW,
                par_row, K_BITS, K_GROUP, HEAD_DIM, HEAD_PAD)
    _encode_row(value_ptr + token * stride_value_t + head * stride_value_h,
                v_plane_ptr + block * stride_v_block + head * stride_v_head + offset * V_ROW,
                par_row + V_PAR_OFFSET, V_BITS, V_GROUP, HEAD_DIM, HEAD_PAD)


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
        key, value, slot_mapping,
        planes.k, planes.v, planes.params,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *planes.k.stride()[:2], *planes.v.stride()[:2], *planes.params.stride()[:2],
        HEAD_DIM=head_dim, HEAD_PAD=planes.head_pad, BLOCK_SIZE=layout.block_size,
        K_BITS=layout.k_bits, V_BITS=layout.v_bits, K_GROUP=planes.k_group, V_GROUP=planes.v_group,
        K_ROW=planes.k_row, V_ROW=planes.v_row, P_ROW=planes.p_row, V_PAR_OFFSET=2 * layout.k_groups,
    )
