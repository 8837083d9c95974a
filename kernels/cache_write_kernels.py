"""The cache-write kernel: quantize new K/V rows and pack them into their page slots (all bit widths).

Launched by ``cache_write.write_kv_cache``; ``reference.quantize`` is the slow obvious version it must
match byte for byte.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import reference
from .page_format import FP16_MAX as _FP16_MAX

# Globals read inside @jit must be tl.constexpr: the interpreter accepts plain floats, the GPU compiler
# refuses them.
FP16_MAX = tl.constexpr(_FP16_MAX)
FP16_MIN_NEG_BITS = tl.constexpr(reference.FP16_MIN_NEG_BITS)
FP16_MIN_POS_BITS = tl.constexpr(reference.FP16_MIN_POS_BITS)


@triton.jit
def _fp16_from_bits(bits):
    return bits.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _fp16_at_most(x):
    """The largest fp16 ``<= x`` (fp32 within +-65504), as ``reference.fp16_at_most``."""
    near = x.to(tl.float16)
    bits = tl.where(near == 0, 0, near.to(tl.uint16, bitcast=True).to(tl.int32))  # -0 as +0
    down = tl.where(bits == 0, FP16_MIN_NEG_BITS, tl.where(bits >= 0x8000, bits + 1, bits - 1))
    return _fp16_from_bits(tl.where(near.to(tl.float32) > x, down, bits))


@triton.jit
def _fp16_scale_covering(zero, hi, LEVELS: tl.constexpr):
    """The smallest positive fp16 with ``zero + scale * LEVELS >= hi``, as ``reference.fp16_scale_covering``
    (float64 makes the comparison exact; the quotient, however the GPU rounds it, is within a step)."""
    near = ((hi - zero.to(tl.float32)) / LEVELS).to(tl.float16)
    bits = tl.where(near.to(tl.float32) > 0, near.to(tl.uint16, bitcast=True).to(tl.int32), FP16_MIN_POS_BITS)
    covers = zero.to(tl.float64) + _fp16_from_bits(bits).to(tl.float64) * LEVELS >= hi.to(tl.float64)
    return _fp16_from_bits(tl.where(covers, bits, bits + 1))


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
        zero = _fp16_at_most(lo)
        scale = _fp16_scale_covering(zero, hi, LEVELS)
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
    _encode_row(src_ptr=key_ptr + token * stride_key_t + head * stride_key_h,
                dst_ptr=k_plane_ptr + block * stride_k_block + head * stride_k_head + offset * K_ROW,
                par_ptr=par_row, BITS=K_BITS, GROUP=K_GROUP, HEAD_DIM=HEAD_DIM, HEAD_PAD=HEAD_PAD)
    _encode_row(src_ptr=value_ptr + token * stride_value_t + head * stride_value_h,
                dst_ptr=v_plane_ptr + block * stride_v_block + head * stride_v_head + offset * V_ROW,
                par_ptr=par_row + V_PAR_OFFSET, BITS=V_BITS, GROUP=V_GROUP, HEAD_DIM=HEAD_DIM,
                HEAD_PAD=HEAD_PAD)
