"""Builders shared by the kernel tests: poisoned caches, random block tables, error ratios."""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
import torch

from vllm_int4kv.kernels.page_format import FP16_MAX, PageLayout
from vllm_int4kv.kernels.reference import _run_views, unpack_int4, write_cache_reference

POISON = 0xFF  # every fp16/fp32 parameter or raw element made of 0xFF bytes is NaN


@dataclass
class PagedCase:
    layout: PageLayout
    cache: torch.Tensor  # [num_blocks, H, run_bytes], unwritten bytes poisoned
    key: torch.Tensor  # [total tokens, H, D]: every token of every sequence, in sequence order
    value: torch.Tensor
    query: torch.Tensor  # [sum(q_lens), Hq, D]
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    slot_mapping: torch.Tensor  # slot of each row of key/value

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())


def make_case(seq_lens, q_lens, num_kv_heads=2, group=4, head_dim=64, block_size=16, k_bits=4, v_bits=4,
              k_group=None, v_group=None, dtype=torch.float32, extra_blocks=7, seed=0, kv_scale=1.0,
              adversarial=0.0) -> PagedCase:
    """Random sequences whose pages are scattered over a poisoned cache (non-contiguous tables).

    ``adversarial``: the fraction of K and V rows replaced by ``adversarial_rows`` (at least one if > 0).
    """
    gen = torch.Generator().manual_seed(seed)
    elem = torch.empty((), dtype=dtype).element_size()
    layout = PageLayout(head_dim, block_size, k_bits, v_bits, k_group, v_group, elem)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    cache = torch.full((num_blocks, num_kv_heads, layout.run_bytes), POISON, dtype=torch.uint8)
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    slots, start = [], 0
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        table[s, :nb] = order[start:start + nb]
        start += nb
        pos = torch.arange(n)
        slots.append(table[s, pos // block_size].long() * block_size + pos % block_size)
    slot_mapping = torch.cat(slots)
    total = int(sum(seq_lens))
    key = (torch.randn(total, num_kv_heads, head_dim, generator=gen) * kv_scale).to(dtype)
    value = (torch.randn(total, num_kv_heads, head_dim, generator=gen) * kv_scale).to(dtype)
    query = torch.randn(int(sum(q_lens)), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    if adversarial:
        adversarial_rows(key, adversarial, gen)
        adversarial_rows(value, adversarial, gen)
    write_cache_reference(cache, key, value, slot_mapping, layout)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return PagedCase(layout, cache, key, value, query, table, torch.tensor(seq_lens, dtype=torch.int32),
                     qsl, slot_mapping)


def rewrite_cache(case: PagedCase) -> PagedCase:
    """Poison ``case.cache`` and write ``case.key``/``case.value`` into it again (after editing them)."""
    case.cache.fill_(POISON)
    write_cache_reference(case.cache, case.key, case.value, case.slot_mapping, case.layout)
    return case


def full_precision_attention(case: PagedCase, sliding_window=None, softcap=None) -> torch.Tensor:
    """Attention on the original (never quantized) K/V, fp32: the quality oracle."""
    out, row, qrow = [], 0, 0
    group = case.query.shape[1] // case.key.shape[1]
    for s, n in enumerate(case.seq_lens.tolist()):
        q_len = int(case.query_start_loc[s + 1] - case.query_start_loc[s])
        k = case.key[row:row + n].float().repeat_interleave(group, 1)
        v = case.value[row:row + n].float().repeat_interleave(group, 1)
        q = case.query[qrow:qrow + q_len].float()
        scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(n - q_len, n)[:, None]
        k_pos = torch.arange(n)[None, :]
        visible = k_pos <= q_pos
        if sliding_window:
            visible &= k_pos > q_pos - sliding_window
        out.append(torch.einsum("hts,shd->thd", scores.masked_fill(~visible, -torch.inf).softmax(-1), v))
        row, qrow = row + n, qrow + q_len
    return torch.cat(out)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Bloom's ALiBi slopes (a geometric series per head), fp32 ``[num_heads]``, for a power of two."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])


def alibi_oracle(case: PagedCase, slopes: torch.Tensor) -> torch.Tensor:
    """Attention with an ALiBi bias on the original K/V by torch's SDPA and an explicit float mask: an
    oracle written apart from the reference (``slope * (key pos - query pos)``, -inf above the diagonal)."""
    out, row, qrow = [], 0, 0
    for s, n in enumerate(case.seq_lens.tolist()):
        q_len = int(case.query_start_loc[s + 1] - case.query_start_loc[s])
        q_pos = torch.arange(n - q_len, n)[:, None]
        k_pos = torch.arange(n)[None, :]
        bias = (slopes[:, None, None] * (k_pos - q_pos)).masked_fill(k_pos > q_pos, -torch.inf)
        q = case.query[qrow:qrow + q_len].float().transpose(0, 1)[None]
        k, v = (x[row:row + n].float().transpose(0, 1)[None] for x in (case.key, case.value))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], enable_gqa=True)
        out.append(attn[0].transpose(0, 1))
        row, qrow = row + n, qrow + q_len
    return torch.cat(out)


def assert_tight_fp16_params(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                             group: int) -> None:
    """(scale, zero) ``[..., D // group]`` of ``x`` ``[..., D]`` are the tightest fp16 pair: ``zero`` the
    largest fp16 at most each group's minimum, ``scale`` the smallest positive fp16 whose ``2**bits - 1``
    steps from ``zero`` reach its maximum (both compared exactly, in float64; fp16 steps from NumPy)."""
    levels = 2 ** bits - 1
    g = x.double().clamp(-FP16_MAX, FP16_MAX).unflatten(-1, (-1, group))
    lo, hi = g.amin(-1), g.amax(-1)
    z16, s16 = zero.numpy(), scale.numpy()
    z, s = torch.from_numpy(z16.astype(np.float64)), torch.from_numpy(s16.astype(np.float64))
    with np.errstate(over="ignore"):  # (above 65504: inf)
        above_zero = torch.from_numpy(np.nextafter(z16, np.float16(np.inf)).astype(np.float64))
    below_scale = torch.from_numpy(np.nextafter(s16, np.float16(0)).astype(np.float64))
    assert (z <= lo).all() and (above_zero > lo).all(), "zero is not the largest fp16 <= the minimum"
    assert (s > 0).all() and (z + s * levels >= hi).all(), "the coded range misses the maximum"
    assert ((below_scale == 0) | (z + below_scale * levels < hi)).all(), "a smaller fp16 scale covers"


# Rows whose quantization parameters sit at the edges of fp16: its maximum (and past it: clamped), zeros
# of both signs, constants (the scale must stay a positive fp16), subnormals and values below them,
# large common offsets (Qwen2's keys), an outlier.
EXTREME_ROWS = {
    "fp16_max": torch.full((64,), 65504.0),
    "minus_fp16_max": torch.full((64,), -65504.0),
    "both_signs_at_the_limit": torch.tensor([65504.0, -65504.0] * 32),
    "past_the_fp16_range": torch.tensor([1e6, -3e5] + [1.0] * 62),
    "zeros": torch.zeros(64),
    "negative_zeros": torch.full((64,), -0.0),
    "constant": torch.full((64,), 7.25),
    "negative_constant": torch.full((64,), -3.1),
    "fp16_subnormals": torch.linspace(-3e-6, 5e-6, 64),
    "below_the_smallest_subnormal": torch.linspace(-1e-9, 2e-9, 64),
    "one_tiny_negative": torch.tensor([-1e-9] + [0.0] * 63),
    "offset": 1000.7 + 0.21 * torch.linspace(0, 1, 64),
    "negative_offset": -1000.7 - 0.21 * torch.linspace(0, 1, 64),
    "outlier": torch.tensor([1e4] + [0.5] * 63),
}


# Rows the cache write accepts (it saturates at +-FP16_MAX) that push a 16-bit dequantization to its limits:
# a 1e4 outlier channel (Qwen2-like keys), values at and near the fp16 maximum with both signs (a coded range
# of 2 * 65504: scale * code overflows fp16), all at the maximum, a constant row, zeros, tiny values.
ADVERSARIAL_KINDS = ("outlier", "fp16_max_both_signs", "fp16_max", "constant", "zero", "tiny")


def adversarial_rows(x: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Replace ``fraction`` of the token rows of ``x`` ``[T, H, D]`` (at least one) with extreme rows, in
    place, cycling through ``ADVERSARIAL_KINDS``; which kinds land where depends on ``gen``."""
    tokens, heads, dim = x.shape
    count = max(1, round(fraction * tokens))
    rows = torch.randperm(tokens, generator=gen)[:count]
    for i, t in enumerate(rows.tolist()):
        kind = ADVERSARIAL_KINDS[(i + int(torch.randint(len(ADVERSARIAL_KINDS), (1,), generator=gen))) %
                                 len(ADVERSARIAL_KINDS)]
        signs = torch.where(torch.rand(heads, dim, generator=gen) < 0.5, -1.0, 1.0)
        if kind == "outlier":
            x[t, :, int(torch.randint(dim, (1,), generator=gen))] = 1e4
        elif kind == "fp16_max_both_signs":
            x[t] = (signs * (FP16_MAX - 600 * torch.rand(heads, dim, generator=gen))).to(x.dtype)
            x[t, :, 0], x[t, :, 1] = FP16_MAX, -FP16_MAX
        elif kind == "fp16_max":
            x[t] = FP16_MAX
        elif kind == "constant":
            x[t] = 7.25
        elif kind == "zero":
            x[t] = 0.0
        else:
            x[t] = (torch.randn(heads, dim, generator=gen) * 1e-6).to(x.dtype)
    return x


# Cases with extreme rows that together cover head sizes 48-240, GQA 1-16, block sizes 48 and 144,
# decode-only and mixed batches and every (K, V) bits pair (the CPU tests run them in fp16, the GPU tests
# in fp16 and bf16): name -> (head_dim, k_bits, v_bits, k_group, num_kv_heads, group, block_size, shape,
# adversarial fraction, split counts).
DECODE_LONG = dict(seq_lens=[75, 130, 1, 20], q_lens=[1, 1, 1, 1])
MIXED_LONG = dict(seq_lens=[90, 1, 150, 33], q_lens=[30, 1, 7, 33])
EXTREME_CASES = {
    # the case an independent check found (inf before the fix)
    "d192_k8v8_mha_bs64": (192, 8, 8, None, 2, 1, 64, dict(seq_lens=[133, 63, 1, 62], q_lens=[45, 1, 1, 1]),
                           0.02, (1,)),
    "d48_k4v4_gqa3_bs48_decode": (48, 4, 4, None, 2, 3, 48, DECODE_LONG, 0.05, (1, 4)),
    "d48_k16v4_gqa16_bs144_mixed": (48, 16, 4, None, 1, 16, 144, MIXED_LONG, 0.05, (1,)),
    "d80_k4v8_gqa5_bs144_mixed": (80, 4, 8, None, 1, 5, 144, MIXED_LONG, 0.05, (1,)),
    "d80_k16v8_gqa3_bs48_decode": (80, 16, 8, None, 2, 3, 48, DECODE_LONG, 0.05, (1,)),
    "d112_k4v16_gqa7_bs48_decode": (112, 4, 16, None, 1, 7, 48, DECODE_LONG, 0.05, (1,)),
    "d112_k16v16_gqa5_bs144_mixed": (112, 16, 16, None, 1, 5, 144, MIXED_LONG, 0.05, (1,)),
    "d160_k8v4_gqa16_bs144_decode": (160, 8, 4, None, 1, 16, 144, DECODE_LONG, 0.05, (1, 4)),
    "d192_k4v4g32_gqa7_bs48_mixed": (192, 4, 4, 32, 1, 7, 48, MIXED_LONG, 0.05, (1,)),
    "d240_k8v16_mha_bs48_mixed": (240, 8, 16, None, 2, 1, 48, MIXED_LONG, 0.05, (1,)),
    "d240_k4v4_gqa5_bs144_decode": (240, 4, 4, None, 1, 5, 144, DECODE_LONG, 0.1, (1, 4)),
}


def make_extreme_case(name: str, dtype: torch.dtype, seed: int = 0) -> tuple[PagedCase, tuple[int, ...]]:
    """``EXTREME_CASES[name]`` built in ``dtype``, and the split counts to run it with."""
    head_dim, k_bits, v_bits, k_group, kv_heads, group, block_size, shape, fraction, splits = \
        EXTREME_CASES[name]
    case = make_case(**shape, num_kv_heads=kv_heads, group=group, head_dim=head_dim, block_size=block_size,
                     k_bits=k_bits, v_bits=v_bits, k_group=k_group, dtype=dtype, adversarial=fraction,
                     seed=seed)
    return case, splits


# -- an independent float64 reference ---------------------------------------------------------------------
def dequantized_cache_f64(cache: torch.Tensor, layout: PageLayout, kv_dtype: torch.dtype,
                          round_to: torch.dtype | None = None):
    """K and V of every slot, float64 ``[num_blocks * N, H, D]``: the planes as ``reference`` reads them
    (codes, fp16 (scale, zero) per group, raw 16-bit values), but ``code * scale + zero`` in float64, exact.
    ``round_to`` (fp16, bf16): each quantized value as a dequantization in that dtype makes it: scale and
    zero in it, ``code * scale`` rounded, then the sum (see ``_rounding``)."""
    k_plane, v_plane, p_plane = _run_views(cache, layout)
    params = p_plane.contiguous().view(torch.float16).double() if layout.param_row_bytes else None
    rnd = _rounding(round_to)

    def plane(rows, bits, group, first_param):
        if bits == 16:
            return rows.contiguous().view(kv_dtype).double()
        codes = (unpack_int4(rows) if bits == 4 else rows).double()
        groups = layout.head_dim // group
        scale = rnd(params[..., first_param:first_param + 2 * groups:2, None])
        zero = rnd(params[..., first_param + 1:first_param + 2 * groups:2, None])
        return rnd(rnd(codes.unflatten(-1, (groups, group)) * scale) + zero).flatten(-2)

    k = plane(k_plane, layout.k_bits, layout.k_group, 0)
    v = plane(v_plane, layout.v_bits, layout.v_group, 2 * layout.k_groups)
    return tuple(x.transpose(1, 2).flatten(0, 1) for x in (k, v))  # [B, H, N, D] -> [B * N, H, D]


def _rounding(dtype: torch.dtype | None):
    """float64 -> float64 rounded to ``dtype``; fp16 in quarters, as the kernel's fp16 tiles hold values
    (``attention.code_bias``: quarters), saturating: fp16 precision with 4x its range."""
    if dtype is None:
        return lambda x: x
    if dtype == torch.float16:
        return lambda x: (x / 4).clamp(-FP16_MAX, FP16_MAX).half().double() * 4
    return lambda x: x.to(dtype).double()


def _attention_f64(case: PagedCase, options: dict, round_to: torch.dtype | None):
    """Attention over the dequantized cache in float64, its 16-bit operands rounded to ``round_to`` (if
    given), and the bound on what fp32 score errors move each output by (see ``rounding_allowance``)."""
    options = {name: x.cpu() if torch.is_tensor(x) else x for name, x in options.items()}
    sm_scale, softcap = options.get("sm_scale"), options.get("softcap")
    window, slopes, sinks = options.get("sliding_window"), options.get("alibi_slopes"), options.get("sinks")
    query, table, starts = case.query.cpu(), case.block_table.cpu(), case.query_start_loc.cpu().tolist()
    k_all, v_all = dequantized_cache_f64(case.cache.cpu(), case.layout, query.dtype, round_to)
    tokens, heads, dim = query.shape
    group = heads // case.cache.shape[1]
    sm_scale = sm_scale if sm_scale is not None else dim ** -0.5
    bs = case.layout.block_size
    out = torch.full((tokens, heads, dim), math.nan, dtype=torch.float64)
    slack = torch.zeros_like(out)
    for s, seq_len in enumerate(case.seq_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        if q0 == q1:
            continue
        pos = torch.arange(seq_len)
        slots = table[s, pos // bs].long() * bs + pos % bs
        k = k_all[slots].repeat_interleave(group, 1)  # [S, Hq, D]
        v = v_all[slots].repeat_interleave(group, 1)
        q = query[q0:q1].double()
        logits = torch.einsum("thd,shd->hts", q, k) * sm_scale
        # an fp32 sum of D products is off by at most D * u * sum |products| (u = 2**-23: tensor cores
        # truncate); a bias added in fp32 by u of each term
        score_error = dim * 2.0 ** -23 * torch.einsum("thd,shd->hts", q.abs(), k.abs()) * sm_scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        q_pos = torch.arange(seq_len - (q1 - q0), seq_len)[:, None]
        if slopes is not None:
            bias = slopes.double()[:, None, None] * (pos[None, :] - q_pos)
            logits = logits + bias
            score_error = score_error + 2.0 ** -23 * (bias.abs() + logits.abs())
        hidden = pos[None, :] > q_pos
        if window:
            hidden |= pos[None, :] <= q_pos - window
        logits = logits.masked_fill(hidden, -math.inf)
        if sinks is not None:
            logits = torch.cat((logits, sinks.double()[:, None, None].expand(-1, q1 - q0, 1)), -1)
        probs = logits.softmax(-1)[..., :seq_len]
        p_operand = probs.to(round_to).double() if round_to else probs
        out[q0:q1] = torch.einsum("hts,shd->thd", p_operand, v)
        weight = probs * score_error  # first order: sum_n p_n e_n |v_n - o| <= sum_n p_n e_n (|v_n| + |o|)
        slack[q0:q1] = (torch.einsum("hts,shd->thd", weight, v.abs())
                        + weight.sum(-1).transpose(0, 1)[..., None] * out[q0:q1].abs())
    return out, slack


def attention_f64(case: PagedCase, **options) -> torch.Tensor:
    """Attention over the dequantized cache in float64, float64 ``[T, Hq, D]`` (NaN rows: no query token),
    written apart from ``reference.paged_attention_reference``. ``options``: ``sm_scale``,
    ``sliding_window``, ``softcap``, ``alibi_slopes``, ``sinks``, as the launchers take them."""
    return _attention_f64(case, options, None)[0]


ROUNDING_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1).sqrt()


def rounding_allowance(case: PagedCase, dtype: torch.dtype, exact: torch.Tensor, **options) -> torch.Tensor:
    """The rms error per (token, head) row that 16-bit rounding alone explains (see
    ``assert_within_rounding``)."""
    rounded, slack = _attention_f64(case, options, dtype)
    return _rms(rounded - exact) + _rms(slack) + ROUNDING_UNIT[dtype] * _rms(exact) + 2.0 ** -24


# "Within 16-bit rounding", what a kernel with 16-bit operands can promise, measured on the case itself
# (its extreme rows included) rather than as one tolerance for all: K, V and P reach tl.dot in 16 bits,
# a dequantized value rounded twice (code * scale, then + zero; the interpreter does not fuse them), which
# rounding_allowance reproduces in float64 (round_to); each score is an fp32 sum, off by at most
# D * 2**-23 * sum |q_d k_d| (a first-order bound on what that moves the output by); the output is rounded
# once more, saturating (2**-11 of it in fp16, 2**-8 in bf16, or half fp16's smallest step). ``factor``
# (3) covers rounding in another order (fused on a GPU), P taken against the online softmax's running
# maximum and the split reduction; an overflow (inf, NaN) or a misapplied scale, zero or bias is off by
# orders of magnitude, and a 1 % error on ordinary rows fails (test_rounding_allowance_can_fail).
def assert_within_rounding(out: torch.Tensor, case: PagedCase, factor: float = 3.0, **options) -> None:
    """``out``, a kernel's fp16/bf16 output for ``case``, is finite and per (token, head) row within
    ``factor`` times ``rounding_allowance`` of the float64 attention over the same cache (rms over D)."""
    out = out.cpu()
    exact = attention_f64(case, **options)
    rows = ~exact.isnan().any(-1)  # rows of query tokens (q_len 0 sequences own none)
    allowed = factor * rounding_allowance(case, out.dtype, exact, **options)[rows]
    big = torch.finfo(out.dtype).max
    out = out.double()
    assert torch.isfinite(out[rows]).all(), "non-finite output from a finite cache"
    err = _rms(out - exact.clamp(-big, big))[rows]
    worst = int((err / allowed).argmax())
    assert (err <= allowed).all(), (f"row {worst}: rms error {err[worst]:.3g} over {allowed[worst]:.3g} "
                                    f"(ratio {(err / allowed).max():.2f})")
