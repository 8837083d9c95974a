"""Reading a KV tile from the pages into ``tl.dot``'s operands (``attention_kernels`` walks the tiles).

Codes become floats with integer ops, not int->float conversions, which run at an eighth of the issue
rate: a code OR-ed into the mantissa of a bias constant is ``bias + code`` exactly (``_code_values``; on
NVIDIA GPUs inline PTX, ``_nibble_values``). A tile is converted once per program, its work split between
the warps (``_once_per_program``). Decode tiles hand back the codes and each token's (scale, zero) for the
caller to apply per score or probability; the rest dequantize here (``_load_tile``).
"""
from __future__ import annotations

import triton
import triton.language as tl

BF16_128 = tl.constexpr(0x4300)  # the bits of 128.0 in bf16: OR-ing a code < 128 in gives 128 + code
FP16_1024 = tl.constexpr(0x6400)  # the bits of 1024.0 in fp16: OR-ing a code < 1024 in gives 1024 + code
FP16_256 = tl.constexpr(0x5C00)  # the bits of 256.0 in fp16, whose last bit is 1/4: 256 + code / 4
QUARTERS = tl.constexpr(256)  # the CODE_BIAS of fp16 tiles dequantized in quarters (``_load_tile``)


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
# two fp32 -> the pair as packed bf16 ($0, element 0 in the low half) and both rounded values back in
# fp32 ($1, $2): a bf16 is the high half of the fp32 it rounds to (``_rounded_for_dot``)
ROUND_TO_BF16_PTX = tl.constexpr("cvt.rn.bf16x2.f32 $0, $4, $3;\n"
                                 "shl.b32 $1, $0, 16;\n"
                                 "and.b32 $2, $0, 0xFFFF0000;")
COPY_PTX = tl.constexpr("mov.b32 $0, $1;")  # two 16-bit values, unchanged (``_once_per_program``)


@triton.jit
def _nibble_values(packed, CODE_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PTX: tl.constexpr):
    """uint8 ``packed`` -> (low nibble + CODE_BIAS, high nibble + CODE_BIAS) in ``DOT_DTYPE`` (with
    CODE_BIAS ``QUARTERS``: 256 + nibble / 4).

    With ``PTX`` (NVIDIA GPUs; the launcher's PTX_UNPACK) and a bias, a third of the instructions the
    compiler makes of ``_code_values`` (docs/performance.md): the nibbles of 4 bytes are masked at once
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
def _rounded_for_dot(x, DOT_DTYPE: tl.constexpr, PTX: tl.constexpr):
    """fp32 ``x`` in ``DOT_DTYPE`` and that rounded value back in fp32. With ``PTX`` and bf16, one
    conversion per two values and a shift or mask per value, where the compiler's own code converted
    some values one by one on the slow conversion unit (F2F) and repacked them."""
    if PTX and DOT_DTYPE == tl.bfloat16:
        rounded, back = tl.inline_asm_elementwise(ROUND_TO_BF16_PTX, "=r,=r,=r,r,r", [x],
                                                  dtype=(tl.bfloat16, tl.float32), is_pure=True, pack=2)
    else:
        rounded = x.to(DOT_DTYPE)
        back = rounded.to(tl.float32)
    return rounded, back


@triton.jit
def _once_per_program(values, SHARE: tl.constexpr):
    """``values`` unchanged; with ``SHARE`` (NVIDIA GPUs, 16-bit values) computed once per program.

    Triton computes the elementwise producers of a ``tl.dot`` operand in the operand's register layout,
    reading the stored bytes from shared memory straight into it: for 8-bit data that means narrow loads,
    each with its own address math, and where several warps multiply by the same tile (sm_80 prefill: the
    rows split over 4 warps) every one of them unpacks and dequantizes all of it. An impure op cannot be
    recomputed in another layout, so this identity ``mov`` keeps the work in the load's layout, split
    between the warps, and the 16-bit values reach the dot through shared memory (STS, then LDSM); the
    instruction counts before and after are in docs/performance.md.
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
    group's channels (2j and 2j+1 share group 2j // GROUP), fewer instructions than per-channel loads
    converted per channel. For bf16 the fp16 parameters round to bf16,
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
    ``codes + CODE_BIAS`` and the row's scale and zero, which the caller applies once per score or
    probability instead of once per channel (taking the bias's share, ``CODE_BIAS * scale``, back). Otherwise (prefill tiles, channel groups, fp16 values) the values, dequantized here: for a
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
                # copies, where two 2-byte loads are plain loads the loop waits for (at D 256 the extra
                # registers spill, so it keeps the two loads)
                pair = tl.load(par_ptrs[:, None] + tl.arange(0, 2)[None, :], mask=mask, other=0)
                row_scale, row_zero = tl.split(pair.to(tl.float32))
            else:
                row_scale = tl.load(par_ptrs, mask=valid, other=0).to(tl.float32)
                row_zero = tl.load(par_ptrs + 1, mask=valid, other=0).to(tl.float32)
            tl.static_assert(CODE_BIAS != QUARTERS, "folded tiles take whole codes")
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
