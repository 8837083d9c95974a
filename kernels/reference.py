"""Slow, obvious torch references for the page format and the kernels.

Every fast kernel in this package is tested against these functions. They are also the quantizer used by
calibration (so the policy measures exactly what the cache stores) and, for the CPU serving path, the
cache write and the dequantization of prompts (whole tensors at a time).

Shapes: ``x`` rows are ``[..., D]``; ``cache`` is ``[num_blocks, num_kv_heads, block_size * slot_bytes]``
uint8; queries ``[num_tokens, num_q_heads, D]``.
"""
from __future__ import annotations

import math

import torch

from .block_checks import check_slots
from .page_format import FP16_MAX, PageLayout

# The fp16 parameters are rounded in a direction (the Triton cache write takes the same steps): round
# to nearest, then one fp16 step down (the zero) or up (the scale) where that landed on the wrong side.
# Sign-magnitude bits order fp16 values: a step toward -inf is bits - 1 for a positive value, bits + 1 for
# a negative one, and from +-0 the smallest negative subnormal.
FP16_MIN_NEG_BITS = 0x8001  # -2**-24
FP16_MIN_POS_BITS = 0x0001  # 2**-24, the smallest scale


def _fp16_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16).int() & 0xFFFF


def _fp16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.float16)


def fp16_at_most(x: torch.Tensor) -> torch.Tensor:
    """The largest fp16 ``<= x`` (fp32, within +-65504): the zero point of a group whose minimum is x.
    (-0 comes out as +0: which of the two a group's minimum is depends on the order of the reduction.)"""
    near = x.to(torch.float16)
    bits = _fp16_bits(near) & torch.where(near == 0, 0, 0xFFFF)
    down = torch.where(bits == 0, FP16_MIN_NEG_BITS, torch.where(bits >= 0x8000, bits + 1, bits - 1))
    return _fp16_from_bits(torch.where(near.float() > x, down, bits))


def fp16_scale_covering(zero: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """The smallest positive fp16 ``scale`` with ``zero + scale * levels >= hi``, compared exactly (in
    float64; the fp32 quotient is within a step of it)."""
    near = ((hi - zero.float()) / levels).to(torch.float16)
    bits = torch.where(near.float() > 0, _fp16_bits(near), FP16_MIN_POS_BITS)
    covers = zero.double() + _fp16_from_bits(bits).double() * levels >= hi.double()
    return _fp16_from_bits(torch.where(covers, bits, bits + 1))


def quant_params(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) of each group of ``group`` channels: ``[..., D // group]`` each.

    ``zero`` is the largest fp16 at most the group's minimum, ``scale`` the smallest positive fp16 whose
    ``levels`` steps from ``zero`` reach its maximum: every input lies in ``[zero, zero + levels * scale]``.
    """
    g = x.float().clamp(-FP16_MAX, FP16_MAX).unflatten(-1, (-1, group))
    zero = fp16_at_most(g.amin(-1))
    return fp16_scale_covering(zero, g.amax(-1), 2 ** bits - 1), zero


def quantize(x: torch.Tensor, bits: int, group: int):
    """Codes (uint8, one per channel, unpacked), scale and zero of ``x`` ``[..., D]``."""
    scale, zero = quant_params(x, bits, group)
    g = x.float().clamp(-FP16_MAX, FP16_MAX).unflatten(-1, (-1, group))
    codes = torch.floor((g - zero.float()[..., None]) / scale.float()[..., None] + 0.5)
    codes = codes.clamp(0, 2 ** bits - 1).nan_to_num(0).to(torch.uint8).flatten(-2)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    g = codes.float().unflatten(-1, (-1, group))
    return (g * scale.float()[..., None] + zero.float()[..., None]).flatten(-2)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Channel 2j in the low nibble of byte j, channel 2j+1 in the high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def fake_quantize(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """What the cache returns for ``x`` after a write and a read (16 bits: ``x`` unchanged)."""
    if bits == 16:
        return x
    return dequantize(*quantize(x, bits, group), group).to(x.dtype)


# -- rows <-> bytes ---------------------------------------------------------------------------------
def _encode_plane(x: torch.Tensor, bits: int, group: int):
    """Row bytes ``[T, H, row_bytes]`` and params ``[T, H, 2 * groups]`` fp16 (empty for 16 bits)."""
    if bits == 16:
        raw = x.contiguous().view(torch.uint8)
        return raw, x.new_empty(*x.shape[:-1], 0, dtype=torch.float16)
    codes, scale, zero = quantize(x, bits, group)
    row = pack_int4(codes) if bits == 4 else codes
    return row, torch.stack((scale, zero), dim=-1).flatten(-2)


def _decode_plane(row: torch.Tensor, params: torch.Tensor, bits: int, group: int, kv_dtype) -> torch.Tensor:
    if bits == 16:
        return row.contiguous().view(kv_dtype).float()
    codes = unpack_int4(row) if bits == 4 else row
    scale, zero = params.unflatten(-1, (-1, 2)).unbind(-1)
    return dequantize(codes, scale, zero, group)


def _run_views(cache: torch.Tensor, layout: PageLayout):
    """Split ``cache`` ``[B, H, run_bytes]`` into its K, V and parameter planes ``[B, H, N, row]``."""
    n = layout.block_size
    kb, vb, pb = layout.k_row_bytes, layout.v_row_bytes, layout.param_row_bytes
    k = cache[..., : n * kb].unflatten(-1, (n, kb))
    v = cache[..., layout.v_plane_offset: layout.param_plane_offset].unflatten(-1, (n, vb))
    p = cache[..., layout.param_plane_offset: layout.run_bytes].unflatten(-1, (n, pb))
    return k, v, p


def write_cache_reference(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          slot_mapping: torch.Tensor, layout: PageLayout) -> None:
    """Quantize ``key``/``value`` ``[T, H, D]`` into ``cache`` at ``slot_mapping`` (< 0: skipped)."""
    check_slots(slot_mapping, slot_mapping.shape[0], cache.shape[0], layout.block_size)
    keep = slot_mapping >= 0
    key, value, slots = key[keep], value[keep], slot_mapping[keep].long()
    blocks, offsets = slots // layout.block_size, slots % layout.block_size
    k_plane, v_plane, p_plane = _run_views(cache, layout)
    k_row, k_par = _encode_plane(key, layout.k_bits, layout.k_group)
    v_row, v_par = _encode_plane(value, layout.v_bits, layout.v_group)
    params = torch.cat((k_par, v_par), dim=-1).contiguous().view(torch.uint8)
    heads = torch.arange(cache.shape[1])
    b, h, o = blocks[:, None], heads[None, :], offsets[:, None]
    k_plane[b, h, o] = k_row
    v_plane[b, h, o] = v_row
    if layout.param_row_bytes:
        p_plane[b, h, o] = params


def read_cache_reference(cache: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor,
                         kv_dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V (fp32) of the given blocks, as ``[len(block_ids) * N, H, D]``."""
    k_plane, v_plane, p_plane = _run_views(cache[block_ids.long()], layout)
    params = (p_plane.contiguous().view(torch.float16) if layout.param_row_bytes
              else p_plane.new_empty(*p_plane.shape, dtype=torch.float16))
    nk = 2 * layout.k_groups
    k = _decode_plane(k_plane, params[..., :nk], layout.k_bits, layout.k_group, kv_dtype)
    v = _decode_plane(v_plane, params[..., nk:], layout.v_bits, layout.v_group, kv_dtype)
    # [blocks, H, N, D] -> [blocks * N, H, D]
    return k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1)


def paged_attention_reference(query: torch.Tensor, cache: torch.Tensor, layout: PageLayout,
                              block_table: torch.Tensor, seq_lens: torch.Tensor,
                              query_start_loc: torch.Tensor, sm_scale: float | None = None,
                              sliding_window: int | None = None, softcap: float | None = None,
                              kv_dtype=None, sinks: torch.Tensor | None = None,
                              alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its whole paged context.

    Sequence ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s+1]``, which are the last
    tokens of its ``seq_lens[s]`` tokens; its cache blocks are ``block_table[s]``. ``sinks``
    ``[num_q_heads]`` (gpt-oss): one more logit per head in every row's softmax, with no value.
    ``alibi_slopes`` ``[num_q_heads]`` (Bloom, Falcon): each score gains ``slope * (key pos - query pos)``.
    Returns fp32 ``[num_tokens, num_q_heads, D]``.
    """
    kv_dtype = kv_dtype or query.dtype
    num_tokens, num_q_heads, head_dim = query.shape
    group = num_q_heads // cache.shape[1]
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.full((num_tokens, num_q_heads, head_dim), float("nan"), dtype=torch.float32)
    for s in range(len(seq_lens)):
        q0, q1, seq_len = int(query_start_loc[s]), int(query_start_loc[s + 1]), int(seq_lens[s])
        if q1 == q0:
            continue
        n_blocks = -(-seq_len // layout.block_size)
        k, v = read_cache_reference(cache, layout, block_table[s, :n_blocks], kv_dtype)
        k = k[:seq_len].repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v[:seq_len].repeat_interleave(group, dim=1)
        q = query[q0:q1].float()
        scores = torch.einsum("thd,shd->hts", q, k) * sm_scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - (q1 - q0), seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None, None] * (k_pos - q_pos)
        visible = k_pos <= q_pos
        if sliding_window:
            visible &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:  # a column of sink logits joins the softmax, then is dropped
            sink_column = sinks.float()[:, None, None].expand(-1, q1 - q0, 1)
            probs = torch.cat((scores, sink_column), -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out[q0:q1] = torch.einsum("hts,shd->thd", probs, v)
    return out


def fake_quantize_kv(key: torch.Tensor, value: torch.Tensor, k_bits: int, v_bits: int,
                     k_group: int, v_group: int, rotated: bool = False):
    """K and V ``[..., D]`` as attention sees them through the cache (rotation undone afterwards).

    The calibration of the precision policy measures exactly this, so it measures what the cache stores.
    """
    from .rotation import rotate, unrotate

    if rotated:
        key, value = rotate(key), rotate(value)
    key = fake_quantize(key, k_bits, k_group)
    value = fake_quantize(value, v_bits, v_group)
    if rotated:
        key, value = unrotate(key), unrotate(value)
    return key, value


def error_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of the difference over RMS of the expectation, how kernels are compared with these references
    (unlike a cosine, a scale error shows up; NaN anywhere gives NaN)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-30)).item()
