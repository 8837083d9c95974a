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

LOG2E = tl.constexpr(1.4426950408889634)  # globals read inside @jit must be constexpr on the GPU
BF16_128 = tl.constexpr(0x4300)  # the bits of 128.0 in bf16: OR-ing a code < 128 in gives 128 + code
FP16_1024 = tl.constexpr(0x6400)  # the bits of 1024.0 in fp16: OR-ing a code < 1024 in gives 1024 + code
FP16_256 = tl.constexpr(0x5C00)  # the bits of 256.0 in fp16, whose last bit is 1/4: 256 + code / 4
QUARTERS = tl.constexpr(256)  # the CODE_BIAS of fp16 tiles dequantized in quarters (``_load_tile``)
FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: exact products (tf32 would round them)
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _split_channels(x):
    """``[R, D]`` -> even channels ``[R, D/2]``, odd channels ``[R, D/2]``."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def _code_values(codes, CODE_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """uint8 codes -> ``codes + CODE_BIAS`` in the dot's dtype, exactly.

    With a bias the code is OR-ed into the mantissa of the bias (``BF16_128``, ``FP16_1024``): one integer
    op per value instead of an int->float conversion, which runs at a quarter of the rate of integer ops,
    and a float->16-bit pack. (``FP16_256``, CODE_BIAS ``QUARTERS``: ``256 + codes / 4``.)
    """
    if CODE_BIAS == 0:  # (if/else, not an early return: Triton compiles the code after a return too)
        values = codes.to(DOT_DTYPE)
    else:
        bits = codes.to(tl.uint16) | (BF16_128 if CODE_BIAS == 128 else
                                      (FP16_256 if CODE_BIAS == QUARTERS else FP16_1024))
        values = bits.to(DOT_DTYPE, bitcast=True)
    return values


def _nibbles_ptx(bias_high_byte: int) -> str:
    """PTX for 4 packed bytes ``$4`` -> low nibbles ``$0, $1`` and high nibbles ``$2, $3`` as 16-bit floats
    whose high byte is ``bias_high_byte`` (two per register, element i in byte/lane i)."""
    bias = "0x" + f"{bias_high_byte:02X}" * 4
    return ("{ .reg .b32 lo, hi;\n"
            "and.b32 lo, $4, 0x0F0F0F0F;\n"
            "shr.u32 hi, $4, 4;\n"
            "and.b32 hi, hi, 0x0F0F0F0F;\n"
            f"prmt.b32 $0, lo, {bias}, 0x4140;\n"  # bytes (lo.0, bias, lo.1, bias): two values
            f"prmt.b32 $1, lo, {bias}, 0x4342;\n"
            f"prmt.b32 $2, hi, {bias}, 0x4140;\n"
            f"prmt.b32 $3, hi, {bias}, 0x4342; }}")


NIBBLES_TO_BF16_PTX = tl.constexpr(_nibbles_ptx(BF16_128.value >> 8))
NIBBLES_TO_FP16_PTX = tl.constexpr(_nibbles_ptx(FP16_1024.value >> 8))
NIBBLES_TO_FP16_QUARTERS_PTX = tl.constexpr(_nibbles_ptx(FP16_256.value >> 8))
COPY_PTX = tl.constexpr("mov.b32 $0, $1;")  # two 16-bit values, unchanged (``_once_per_program``)


@triton.jit
def _nibble_values(packed, CODE_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PTX: tl.constexpr):
    """uint8 ``packed`` -> (low nibble + CODE_BIAS, high nibble + CODE_BIAS) in ``DOT_DTYPE`` (with
    CODE_BIAS ``QUARTERS``: 256 + nibble / 4).

    With ``PTX`` (NVIDIA GPUs; the launcher's PTX_UNPACK) and a bias, 7 instructions per 4 bytes instead
    of the ~22 the compiler makes of ``_code_values`` (sm_90): the nibbles of 4 bytes are masked at once
    and one byte permute per two codes writes the bias's high byte (its low byte is 0) above each code.
    The interpreter runs the generic code; a test runs the PTX text through an emulator.
    """
    # (two calls that differ in their constant: @jit cannot pick a string constexpr into a local)
    if PTX and CODE_BIAS == 128:  # (the bias is the dtype's: code_bias in the launcher)
        even, odd = tl.inline_asm_elementwise(NIBBLES_TO_BF16_PTX, "=r,=r,=r,=r,r", [packed],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    elif PTX and CODE_BIAS == 1024:
        even, odd = tl.inline_asm_elementwise(NIBBLES_TO_FP16_PTX, "=r,=r,=r,=r,r", [packed],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    elif PTX and CODE_BIAS == QUARTERS:
        even, odd = tl.inline_asm_elementwise(NIBBLES_TO_FP16_QUARTERS_PTX, "=r,=r,=r,=r,r", [packed],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        even = _code_values(packed & 0xF, CODE_BIAS, DOT_DTYPE)
        odd = _code_values(packed >> 4, CODE_BIAS, DOT_DTYPE)
    return even, odd


@triton.jit
def _once_per_program(values, SHARE: tl.constexpr):
    """``values`` unchanged; with ``SHARE`` (NVIDIA GPUs, 16-bit values) computed once per program.

    Triton computes the elementwise producers of a ``tl.dot`` operand in the operand's register layout,
    reading the stored bytes from shared memory straight into it: for 8-bit data that means narrow loads,
    each with its own address math, and where several warps multiply by the same tile (sm_80 prefill: the
    rows split over 4 warps) every one of them unpacks and dequantizes all of it. An impure op cannot be
    recomputed in another layout, so this identity ``mov`` keeps the work in the load's layout, split
    between the warps, and the 16-bit values reach the dot through shared memory (STS, then LDSM). SASS
    per tile and warp, Llama-3-8B K4V4: sm_90 decode 673 -> 511 instructions; sm_80 prefill 2273 -> 913
    (BF16 pages 1257 -> 910).
    """
    if SHARE:
        values = tl.inline_asm_elementwise(COPY_PTX, "=r,r", [values], dtype=values.dtype, is_pure=False,
                                           pack=2)
    return values


@triton.jit
def _channel_params(par_ptrs, mask, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, QUARTER_ZERO: tl.constexpr = False):
    """Each even (= each odd) channel's (scale, zero) ``[TILE_N, HEAD_PAD // 2]`` in ``DOT_DTYPE`` (the
    dot's 16-bit dtype, or fp32 where values are dequantized in fp32); 0 for groups past HEAD_DIM.
    ``QUARTER_ZERO``: zero / 4 (exact, short of fp16's subnormal range), for tiles in quarters.

    One contiguous load of a token's (scale, zero) pairs, converted per group, then broadcast over the
    group's channels (2j and 2j+1 share group 2j // GROUP): per-channel loads converted per channel took
    ~30 % more of the loop (sm_90, 32-channel key groups). For bf16 the fp16 parameters round to bf16,
    an error of at most 2**-9 of each, far below the 4-bit step they scale.
    """
    NG: tl.constexpr = HEAD_PAD // GROUP
    offs = tl.arange(0, 2 * NG)
    if HEAD_PAD != HEAD_DIM and NG > 1:  # a padded head: its last groups hold no channel
        mask = mask & (offs < 2 * ((HEAD_DIM + GROUP - 1) // GROUP))[None, :]
    pairs = tl.load(par_ptrs[:, None] + offs[None, :], mask=mask, other=0)
    rows: tl.constexpr = pairs.shape[0]
    scale, zero = tl.split(tl.reshape(pairs.to(DOT_DTYPE), (rows, NG, 2)))
    if QUARTER_ZERO:
        zero = zero * 0.25
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (rows, NG, GROUP // 2)), (rows, HEAD_PAD // 2))
    zero = tl.reshape(tl.broadcast_to(zero[:, :, None], (rows, NG, GROUP // 2)), (rows, HEAD_PAD // 2))
    return scale, zero


@triton.jit
def _load_tile(plane_ptrs, par_ptrs, valid, BITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
               HEAD_PAD: tl.constexpr, FOLD: tl.constexpr, CODE_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
               PTX: tl.constexpr, SHARE: tl.constexpr):
    """Even and odd channels ``[TILE_N, HEAD_PAD // 2]`` of a tile of cache rows, in ``DOT_DTYPE``, and
    the ``[TILE_N]`` (scale, zero) the caller still has to apply. Channels past HEAD_DIM (a padded head)
    are not read; they hold finite values that the query's zero channels cancel or the store drops.

    ``plane_ptrs``/``par_ptrs`` ``[TILE_N]`` point at each token's plane row and its parameter row.
    16-bit planes: the stored values (scale 1, zero 0). ``FOLD`` (one (scale, zero) per row):
    ``codes + CODE_BIAS`` and the row's scale and ``zero - CODE_BIAS * scale`` (the same values,
    ``scale * code + zero``), which the caller applies once per score or probability instead of once per
    channel. Otherwise (prefill tiles, channel groups, fp16 values) the values, dequantized here: for a
    16-bit dot in its dtype from the biased codes (HFMA2, two values per instruction), else in fp32.

    fp16 tiles dequantized here hold the values in quarters (the launcher's CODE_BIAS ``QUARTERS``: codes
    OR-ed into 256.0, whose last bit is 1/4), which the caller multiplies back in fp32: a row the cache
    write saturated at +-65504 has a scale of up to 2 * 65504 / levels, rounded up, so ``code * scale``
    reaches 2 * 65504 and even the value can pass 65504 (the scale is rounded up): both were inf. In
    quarters nothing passes 33000, at no extra instruction (``zero / 4`` is once per token and group).
    """
    offs_j = tl.arange(0, HEAD_PAD // 2)
    offs_d = tl.arange(0, HEAD_PAD)
    mask = valid[:, None]
    mask_j = mask
    mask_d = mask
    if HEAD_PAD != HEAD_DIM:
        mask_j = mask & (offs_j < HEAD_DIM // 2)[None, :]
        mask_d = mask & (offs_d < HEAD_DIM)[None, :]
    rows = plane_ptrs[:, None]
    if BITS == 4:
        packed = tl.load(rows + offs_j[None, :], mask=mask_j, other=0)
        even = packed & 0xF
        odd = packed >> 4
    else:  # contiguous row load (vectorizes on the GPU), then split into even/odd channels
        even, odd = _split_channels(tl.load(rows + offs_d[None, :], mask=mask_d, other=0))
    row_scale = tl.full(valid.shape, 1.0, tl.float32)
    row_zero = tl.zeros(valid.shape, tl.float32)
    if BITS == 16:
        pass
    elif FOLD or CODE_BIAS != 0:  # codes + CODE_BIAS (or the codes, converted) in the dot's dtype
        if FOLD:
            if HEAD_PAD <= 128:
                # (scale, zero) as one 4-byte load per token: Triton pipelines it with the tile's async
                # copies, where two 2-byte loads are plain loads the loop waits for (sm_90 SASS; at D 256
                # the extra registers spill, so it keeps the two loads)
                pair = tl.load(par_ptrs[:, None] + tl.arange(0, 2)[None, :], mask=mask, other=0)
                row_scale, row_zero = tl.split(pair.to(tl.float32))
            else:
                row_scale = tl.load(par_ptrs, mask=valid, other=0).to(tl.float32)
                row_zero = tl.load(par_ptrs + 1, mask=valid, other=0).to(tl.float32)
            tl.static_assert(CODE_BIAS != QUARTERS, "folded tiles take whole codes")
            row_zero -= CODE_BIAS * row_scale
        if BITS == 4:  # values straight from the bytes
            even, odd = _nibble_values(packed, CODE_BIAS, DOT_DTYPE, PTX)
        else:
            even = _code_values(even, CODE_BIAS, DOT_DTYPE)
            odd = _code_values(odd, CODE_BIAS, DOT_DTYPE)
        if not FOLD:  # a 16-bit dot: dequantize in its dtype, two values per instruction
            scale, zero = _channel_params(par_ptrs, mask, GROUP, HEAD_DIM, HEAD_PAD, DOT_DTYPE,
                                          CODE_BIAS == QUARTERS)
            even = (even - CODE_BIAS) * scale + zero  # (the subtraction is exact: bias and code are)
            odd = (odd - CODE_BIAS) * scale + zero
    else:  # prefill with fp32 queries or bf16 8-bit codes (no bias holds them): int->float, fp32 math
        scale, zero = _channel_params(par_ptrs, mask, GROUP, HEAD_DIM, HEAD_PAD, tl.float32)
        even = (even.to(tl.float32) * scale + zero).to(DOT_DTYPE)
        odd = (odd.to(tl.float32) * scale + zero).to(DOT_DTYPE)
    return _once_per_program(even, SHARE), _once_per_program(odd, SHARE), row_scale, row_zero


@triton.jit
def _saturate(x, DTYPE: tl.constexpr):
    """fp32 ``x`` in ``DTYPE``; for fp16 clamped to +-65504 first, the cache write's saturation: the values
    of a row written at the fp16 maximum dequantize up to ~0.3 % past it (the scale is rounded up), and
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
    skip it (per score, a compare and a select: ~10 % of a prefill loop on sm_90).
    """
    dot_dtype = q_even.dtype
    offs_n = tile * TILE_N + tl.arange(0, TILE_N)  # logical KV positions
    n_valid = (offs_n < kv_hi) & (offs_n >= kv_lo)
    # Unsigned index math: // and % by BLOCK_SIZE become a shift and a mask, and block numbers
    # widen to 64 bits for free (signed: ~4 more instructions per token per use on sm_90).
    pos = offs_n.to(tl.uint32)
    block = tl.load(block_table_row + pos // BLOCK_SIZE, mask=n_valid, other=0)
    block = block.to(tl.uint32).to(tl.uint64)
    slot = pos % BLOCK_SIZE
    par_rows = p_head_ptr + block * p_block_stride + slot * P_ROW
    k_even, k_odd, k_scale, k_zero = _load_tile(k_head_ptr + block * k_block_stride + slot * K_ROW,
                                                 par_rows, n_valid, K_BITS, K_GROUP, HEAD_DIM, HEAD_PAD,
                                                 K_FOLD, K_CODE_BIAS, dot_dtype, PTX_UNPACK, K_SHARE)
    # [BLOCK_M, D/2] @ [D/2, TILE_N] -> [BLOCK_M, TILE_N], twice (even and odd channels)
    scores = _dot(q_even, tl.trans(k_even), IEEE)
    scores += _dot(q_odd, tl.trans(k_odd), IEEE)
    if K_FOLD:  # q.(scale * code + zero) = scale * q.code + zero * sum(q)
        scores = scores * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
    # (Natural units, scaled after the sum, as the reference and the torch path: folding sm_scale *
    # log2(e) into the K scales saved 2 % of the decode loop and moved an engine test's logprobs by
    # 6e-4 in fp32. Keys in quarters: the caller's sm_scale has the 4, exactly.)
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
    v_even, v_odd, v_scale, v_zero = _load_tile(v_head_ptr + block * v_block_stride + slot * V_ROW,
                                                 par_rows + V_PAR_OFFSET, n_valid, V_BITS, V_GROUP,
                                                 HEAD_DIM, HEAD_PAD, V_FOLD, V_CODE_BIAS, dot_dtype,
                                                 PTX_UNPACK, V_SHARE)
    if V_FOLD:  # sum p * (scale * code + zero) = (p * scale).code + p.zero
        acc_zero = acc_zero * alpha + tl.sum(p * v_zero[None, :], axis=1)
        p *= v_scale[None, :]
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
                tile, m_i, l_i, acc_even, acc_odd, acc_zero, q_even, q_odd, q_sum, row_valid, q_pos,
                alibi_slope, kv_lo, kv_hi, block_table_row, k_head_ptr, v_head_ptr, p_head_ptr,
                k_block_stride, v_block_stride, p_block_stride, sm_scale, softcap, sliding_window, HEAD_DIM,
                HEAD_PAD, BLOCK_SIZE, TILE_N, K_BITS, V_BITS, K_GROUP, V_GROUP, K_ROW, V_ROW, P_ROW,
                V_PAR_OFFSET, DECODE, K_FOLD, V_FOLD,
                K_CODE_BIAS, V_CODE_BIAS, USE_SOFTCAP, USE_WINDOW, IEEE, PTX_UNPACK, K_SHARE, V_SHARE,
                USE_ALIBI, masked == 1)

    tok = (q_start + q_tok).to(tl.int64)
    acc = tl.reshape(tl.join(acc_even, acc_odd), (BLOCK_M, HEAD_PAD))  # interleave channels back
    if V_FOLD:
        acc += acc_zero[:, None]
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
