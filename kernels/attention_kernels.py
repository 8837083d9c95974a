"""Unified paged attention over the quantized cache: decode, chunked prefill and multi-token queries.

Grid ``(query tiles, kv heads, splits)``. A program owns BLOCK_Q query tokens of one sequence times the
G query heads of one KV head (rows of ``tl.dot``), so each KV byte is read once per group. It walks the
sequence's KV positions in tiles of TILE_N tokens, dequantizes each tile in registers (nothing is written
back) and runs an online softmax in fp32. With NUM_SPLITS > 1 (flash-decoding) each program covers one
slice of the context and writes (max, sum, acc) partials that ``_reduce_splits_kernel`` combines.

Channels travel as even/odd halves (the two nibbles of an INT4 byte), so no interleave is ever needed:
``q.k = q_even.k_even + q_odd.k_odd`` and the output's even/odd channels are accumulated separately.

Decode tiles (launcher's K_FOLD/V_FOLD) feed the stored codes to ``tl.dot`` and apply each token's
(scale, zero) to its scores, ``scale * q.code + zero * sum(q)``, and to its probabilities,
``(p * scale).code + p.zero``: per token instead of per channel. Prefill tiles, with 4x the rows, instead
dequantize each value in the dot's 16-bit dtype, two per instruction. Both turn codes into floats with
integer ops (``_code_values``; on NVIDIA GPUs inline PTX, ``_nibble_values``), not int->float conversions,
which run at an eighth of the issue rate. And each tile is converted once per program, its work split
between the warps, not once by every warp that multiplies by it (``_once_per_program``). That is what
lets a decode loop over 4-bit pages issue few enough instructions per byte to keep up with memory, and a
prefill loop cost what BF16's does (``benchmarks/sass.py`` counts both).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tile_loads import QUARTERS, _load_tile, _rounded_for_dot, _split_channels

LOG2E = tl.constexpr(1.4426950408889634)  # globals read inside @jit must be constexpr on the GPU
FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: exact products (tf32 would round them)
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _saturate(x, DTYPE: tl.constexpr):
    """fp32 ``x`` in ``DTYPE``; for fp16 clamped to +-65504 first, the cache write's saturation: the values
    of a row written at the fp16 maximum dequantize up to 0.1 % past it (the scale is rounded up), and
    an output among them would otherwise be stored as inf. (Two instructions per stored value.)"""
    if DTYPE == tl.float16:
        x = tl.minimum(tl.maximum(x, -FP16_MAX), FP16_MAX)
    return x.to(DTYPE)


@triton.jit
def _find_sequence(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning query tile ``q_tile``; sequence s owns tiles from start[s] // BLOCK_Q + s on."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(tile, m_i, l_i, acc_even, acc_odd, acc_zero, q_even, q_odd, q_sum, row_valid, q_pos,
                 alibi_slope, kv_lo, kv_hi, block_table_row, k_head_ptr, v_head_ptr, p_head_ptr,
                 k_block_stride, v_block_stride, p_block_stride, sm_scale, softcap, sliding_window,
                 HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 TILE_N: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr,
                 V_GROUP: tl.constexpr,
                 K_ROW: tl.constexpr, V_ROW: tl.constexpr, P_ROW: tl.constexpr, V_PAR_OFFSET: tl.constexpr,
                 DECODE: tl.constexpr, K_FOLD: tl.constexpr, V_FOLD: tl.constexpr,
                 K_CODE_BIAS: tl.constexpr, V_CODE_BIAS: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                 USE_WINDOW: tl.constexpr, IEEE: tl.constexpr, PTX_UNPACK: tl.constexpr,
                 K_SHARE: tl.constexpr, V_SHARE: tl.constexpr, USE_ALIBI: tl.constexpr,
                 MASKED: tl.constexpr):
    """One KV tile into the online softmax: the updated (max, sum, even/odd accumulators, zero sum).

    ``MASKED``: apply the causal, window and bounds mask to the scores; tiles every row sees in full
    skip it (per score, a compare and a select).
    """
    dot_dtype = q_even.dtype
    offs_n = tile * TILE_N + tl.arange(0, TILE_N)  # logical KV positions
    n_valid = (offs_n < kv_hi) & (offs_n >= kv_lo)
    # Unsigned index math: // and % by BLOCK_SIZE become a shift and a mask, and block numbers
    # widen to 64 bits for free (signed math costs instructions per token per use).
    pos = offs_n.to(tl.uint32)
    block = tl.load(block_table_row + pos // BLOCK_SIZE, mask=n_valid, other=0)
    block = block.to(tl.uint32).to(tl.uint64)
    slot = pos % BLOCK_SIZE
    par_rows = p_head_ptr + block * p_block_stride + slot * P_ROW
    k_even, k_odd, k_scale, k_zero = _load_tile(
        plane_ptrs=k_head_ptr + block * k_block_stride + slot * K_ROW, par_ptrs=par_rows, valid=n_valid,
        BITS=K_BITS, GROUP=K_GROUP, HEAD_DIM=HEAD_DIM, HEAD_PAD=HEAD_PAD, FOLD=K_FOLD, CODE_BIAS=K_CODE_BIAS,
        DOT_DTYPE=dot_dtype, PTX=PTX_UNPACK, SHARE=K_SHARE)
    # [BLOCK_M, D/2] @ [D/2, TILE_N] -> [BLOCK_M, TILE_N], twice (even and odd channels)
    scores = _dot(q_even, tl.trans(k_even), IEEE)
    scores += _dot(q_odd, tl.trans(k_odd), IEEE)
    if K_FOLD:  # q.(scale * code + zero) = scale * q.(code + bias) + (zero - bias * scale) * sum(q)
        if K_CODE_BIAS != 0:
            k_zero -= K_CODE_BIAS * k_scale
        scores = scores * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
    # (Natural units, scaled after the sum, as the reference and the torch path: folding sm_scale *
    # log2(e) into the K scales saves little and moves logprobs away from theirs. Keys in quarters: the
    # caller's sm_scale has the 4, exactly.)
    scores *= sm_scale
    if USE_SOFTCAP:  # softcap * tanh(s / softcap), with tanh from exp (no libdevice needed)
        scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
    if USE_ALIBI:  # (Bloom, Falcon) slope * (key position - query position): 0 at the row's own token
        # Positions converted per column and per row, then subtracted in fp32 (exact below 2**24): a
        # conversion per score would run on the quarter-rate conversion unit.
        scores += alibi_slope[:, None] * (offs_n.to(tl.float32)[None, :] - q_pos.to(tl.float32)[:, None])
    if MASKED:
        if DECODE:
            # A decode row's token is its sequence's last, so it sees every valid position. Rows that
            # hold no query token (padding) see finite values and are never stored.
            visible = n_valid[None, :]
        else:
            visible = row_valid[:, None] & n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible &= offs_n[None, :] > q_pos[:, None] - sliding_window
        scores = tl.where(visible, scores, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    p = tl.exp2((scores - m_safe[:, None]) * LOG2E)
    alpha = tl.exp2((m_i - m_safe) * LOG2E)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_even, v_odd, v_scale, v_zero = _load_tile(
        plane_ptrs=v_head_ptr + block * v_block_stride + slot * V_ROW, par_ptrs=par_rows + V_PAR_OFFSET,
        valid=n_valid, BITS=V_BITS, GROUP=V_GROUP, HEAD_DIM=HEAD_DIM, HEAD_PAD=HEAD_PAD, FOLD=V_FOLD,
        CODE_BIAS=V_CODE_BIAS, DOT_DTYPE=dot_dtype, PTX=PTX_UNPACK, SHARE=V_SHARE)
    if V_FOLD:  # sum p * (scale * code + zero) = p_s.(code + bias) + sum(p * zero - bias * p_s)
        # p_s = p * scale as the dot takes it, rounded to its 16-bit dtype: the bias's share is taken
        # back with that same rounded value, else its rounding error comes back bias / code times over
        # (bf16: 3-9 % of the output, against ~0.5 % for values dequantized one by one)
        if V_CODE_BIAS == 0:
            acc_zero = acc_zero * alpha + tl.sum(p * v_zero[None, :], axis=1)
            p *= v_scale[None, :]
        else:  # acc_zero holds -sum(p * zero - bias * p_s) / bias: one FFMA per probability
            v_zero_per_bias = v_zero * (1.0 / V_CODE_BIAS)  # (exact: a power of two)
            p_zero = p * v_zero_per_bias[None, :]
            p, p_back = _rounded_for_dot(p * v_scale[None, :], dot_dtype, PTX_UNPACK)
            acc_zero = acc_zero * alpha + tl.sum(p_back - p_zero, axis=1)
    p = p.to(dot_dtype)
    # [BLOCK_M, TILE_N] @ [TILE_N, D/2] -> [BLOCK_M, D/2]
    acc_even = acc_even * alpha[:, None] + _dot(p, v_even, IEEE)
    acc_odd = acc_odd * alpha[:, None] + _dot(p, v_odd, IEEE)
    return m_new, l_i, acc_even, acc_odd, acc_zero


@triton.jit
def paged_attention_kernel(
    q_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, sinks_ptr, alibi_ptr,
    k_plane_ptr, v_plane_ptr, par_ptr,
    block_table_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_seqs, num_q_heads, sm_scale, softcap, sliding_window,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_bt,
    stride_k_block, stride_k_head, stride_v_block, stride_v_head, stride_p_block, stride_p_head,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUERIES_PER_KV: tl.constexpr,
    GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    K_ROW: tl.constexpr, V_ROW: tl.constexpr, P_ROW: tl.constexpr, V_PAR_OFFSET: tl.constexpr,
    DECODE: tl.constexpr, K_FOLD: tl.constexpr, V_FOLD: tl.constexpr,
    K_CODE_BIAS: tl.constexpr, V_CODE_BIAS: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr, PTX_UNPACK: tl.constexpr, K_SHARE: tl.constexpr, V_SHARE: tl.constexpr,
    USE_SINKS: tl.constexpr, USE_ALIBI: tl.constexpr,
):
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_q = (q_tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query token of this tile
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Rows: BLOCK_Q query tokens x GROUP_PAD query heads of this kv head (padding rows masked).
    offs_m = tl.arange(0, BLOCK_M)
    q_tok = first_q + offs_m // GROUP_PAD
    q_head = kv_head * QUERIES_PER_KV + offs_m % GROUP_PAD
    row_valid = (offs_m // GROUP_PAD < BLOCK_Q) & (q_tok < q_len) & (offs_m % GROUP_PAD < QUERIES_PER_KV)
    q_pos = context_len + q_tok  # absolute position of each row's token
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = row_valid[:, None]  # [BLOCK_M, HEAD_PAD]: the rows to read and store, their channels
    if HEAD_PAD != HEAD_DIM:  # zero query channels past HEAD_DIM: the padded K channels add nothing
        d_mask = d_mask & (offs_d < HEAD_DIM)[None, :]
    q_rows = q_ptr + (q_start + q_tok).to(tl.int64)[:, None] * stride_q_t + q_head[:, None] * stride_q_h
    q_even, q_odd = _split_channels(tl.load(q_rows + offs_d[None, :], mask=d_mask, other=0))

    # KV positions this tile needs: [kv_lo, kv_hi); this split takes an equal share of the tiles.
    kv_hi = context_len + tl.minimum(first_q + BLOCK_Q, q_len)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(context_len + first_q - sliding_window + 1, 0)
    tile_lo = kv_lo // TILE_N
    tiles_per_split = tl.cdiv(tl.cdiv(kv_hi, TILE_N) - tile_lo, NUM_SPLITS)
    tile_begin = tile_lo + split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(kv_hi, TILE_N))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if USE_SINKS:  # (gpt-oss) a per-head logit with no value joins the softmax, once: in split 0
        with_sink = row_valid & (split == 0)
        m_i = tl.load(sinks_ptr + q_head, mask=with_sink, other=float("-inf"))  # fp32, from the launcher
        l_i = tl.where(with_sink, 1.0, 0.0)  # e^(sink - m_i)
    alibi_slope = tl.zeros([BLOCK_M], tl.float32)
    if USE_ALIBI:
        alibi_slope = tl.load(alibi_ptr + q_head, mask=row_valid, other=0.0)  # fp32, from the launcher
    acc_even = tl.zeros([BLOCK_M, HEAD_PAD // 2], tl.float32)
    acc_odd = tl.zeros([BLOCK_M, HEAD_PAD // 2], tl.float32)
    acc_zero = tl.zeros([BLOCK_M], tl.float32)  # sum of p * (V zero point), the same for every channel
    q_sum = tl.zeros([BLOCK_M], tl.float32)  # (used by K_FOLD only)
    if K_FOLD:
        q_sum = tl.sum(q_even.to(tl.float32), axis=1) + tl.sum(q_odd.to(tl.float32), axis=1)
    if K_CODE_BIAS == QUARTERS:  # K tiles hold the keys in quarters (``_load_tile``)
        sm_scale = sm_scale * 4
    k_head_ptr = k_plane_ptr + kv_head * stride_k_head
    v_head_ptr = v_plane_ptr + kv_head * stride_v_head
    p_head_ptr = par_ptr + kv_head * stride_p_head
    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    # (strides are below 2**31: the launcher checks; zero-extended they multiply in one IMAD.WIDE.U32)
    k_block_stride = stride_k_block.to(tl.uint32).to(tl.uint64)
    v_block_stride = stride_v_block.to(tl.uint32).to(tl.uint64)
    p_block_stride = stride_p_block.to(tl.uint32).to(tl.uint64)
    # Tiles wholly at or before the first row's position (and inside any window) are seen in full by
    # every row: a first loop runs them without the mask, a second the rest (the diagonal, the last
    # partial tile, window edges). static_range makes the two loops, each with its own MASKED constant.
    full_tiles = (context_len + first_q + 1) // TILE_N
    if USE_WINDOW:
        full_tiles = 0
    unmasked_end = tl.minimum(tl.maximum(full_tiles, tile_begin), tile_end)
    for masked in tl.static_range(2):
        loop_begin = tile_begin if masked == 0 else unmasked_end
        loop_end = unmasked_end if masked == 0 else tile_end
        for tile in range(loop_begin, loop_end):
            m_i, l_i, acc_even, acc_odd, acc_zero = _attend_tile(
                tile=tile, m_i=m_i, l_i=l_i, acc_even=acc_even, acc_odd=acc_odd, acc_zero=acc_zero,
                q_even=q_even, q_odd=q_odd, q_sum=q_sum, row_valid=row_valid, q_pos=q_pos,
                alibi_slope=alibi_slope, kv_lo=kv_lo, kv_hi=kv_hi, block_table_row=block_table_row,
                k_head_ptr=k_head_ptr, v_head_ptr=v_head_ptr, p_head_ptr=p_head_ptr,
                k_block_stride=k_block_stride, v_block_stride=v_block_stride, p_block_stride=p_block_stride,
                sm_scale=sm_scale, softcap=softcap, sliding_window=sliding_window,
                HEAD_DIM=HEAD_DIM, HEAD_PAD=HEAD_PAD, BLOCK_SIZE=BLOCK_SIZE, TILE_N=TILE_N,
                K_BITS=K_BITS, V_BITS=V_BITS, K_GROUP=K_GROUP, V_GROUP=V_GROUP, K_ROW=K_ROW, V_ROW=V_ROW,
                P_ROW=P_ROW, V_PAR_OFFSET=V_PAR_OFFSET, DECODE=DECODE, K_FOLD=K_FOLD, V_FOLD=V_FOLD,
                K_CODE_BIAS=K_CODE_BIAS, V_CODE_BIAS=V_CODE_BIAS, USE_SOFTCAP=USE_SOFTCAP,
                USE_WINDOW=USE_WINDOW, IEEE=IEEE, PTX_UNPACK=PTX_UNPACK, K_SHARE=K_SHARE, V_SHARE=V_SHARE,
                USE_ALIBI=USE_ALIBI, MASKED=masked == 1)

    tok = (q_start + q_tok).to(tl.int64)
    acc = tl.reshape(tl.join(acc_even, acc_odd), (BLOCK_M, HEAD_PAD))  # interleave channels back
    if V_FOLD:
        acc += (acc_zero if V_CODE_BIAS == 0 else acc_zero * -V_CODE_BIAS)[:, None]
    if V_CODE_BIAS == QUARTERS:  # V tiles held the values in quarters (``_load_tile``)
        acc *= 4
    if NUM_SPLITS == 1:
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = out_ptr + tok[:, None] * stride_o_t + q_head[:, None] * stride_o_h
        tl.store(o_rows + offs_d[None, :], _saturate(acc, out_ptr.dtype.element_ty), mask=d_mask)
    else:  # partials [T, Hq, NUM_SPLITS(, D)], contiguous
        part = (tok * num_q_heads + q_head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=d_mask)


@triton.jit
def _reduce_splits_kernel(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, num_q_heads,
                          stride_o_t, stride_o_h, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                          NUM_SPLITS: tl.constexpr):
    """Combine the splits of one (token, query head) in a fixed order (deterministic)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (token * num_q_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    m = tl.load(part_max_ptr + part)
    l = tl.load(part_sum_ptr + part)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    weight = tl.exp2((m - m_all) * LOG2E)  # empty splits have m = -inf -> weight 0
    total = tl.sum(weight * l, axis=0)
    offs_d = tl.arange(0, HEAD_PAD)
    in_d = offs_d < HEAD_DIM  # (all true unless the head is padded)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=in_d[None, :],
                  other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d,
             _saturate(out, out_ptr.dtype.element_ty), mask=in_d)
