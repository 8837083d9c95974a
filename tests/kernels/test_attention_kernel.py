"""Unified paged-attention kernel vs the torch reference (tight) and vs full precision (error budget).

The launcher's checks and the GPU-only code paths are in test_attention_launch.py, which imports
``MIXED``, ``DECODE``, ``run_kernel`` and ``run_reference`` from here.
"""
import random

import pytest
import torch

from kernel_utils import (EXTREME_CASES, alibi_oracle, alibi_slopes, assert_within_rounding, attention_f64,
                          full_precision_attention, make_case, make_extreme_case, rewrite_cache)
from vllm_int4kv.kernels.attention import paged_attention
from vllm_int4kv.kernels.page_format import FP16_MAX
from vllm_int4kv.kernels.reference import error_ratio, paged_attention_reference

# Mixed batch: a decode (1 query token), a chunked prefill (query after cached context), a full
# prefill and a 3-token speculative verification; no length is a multiple of the block size.
MIXED = dict(seq_lens=[37, 50, 19, 70], q_lens=[1, 13, 19, 3])
DECODE = dict(seq_lens=[45, 130, 7], q_lens=[1, 1, 1])


def run_kernel(case, **kw):
    return paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                           case.query_start_loc, max_query_len=case.max_query_len,
                           max_seq_len=case.max_seq_len, **kw)


def run_reference(case, **kw):
    return paged_attention_reference(case.query, case.cache, case.layout, case.block_table,
                                     case.seq_lens, case.query_start_loc, **kw)


# A decode-only batch takes the other path of the kernel: (scale, zero) applied to scores and probabilities.
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("k_bits,v_bits,k_group", [(4, 4, None), (8, 4, None), (16, 4, None), (8, 8, None),
                                                   (16, 16, None), (4, 4, 16)],
                         ids=["k4v4", "k8v4", "k16v4", "k8v8", "k16v16", "k4v4_g16"])
def test_matches_reference_on_the_dequantized_cache(k_bits, v_bits, k_group, shape):
    case = make_case(**shape, k_bits=k_bits, v_bits=v_bits, k_group=k_group)
    out = run_kernel(case)
    assert not out.isnan().any(), "a poisoned (unwritten) cache byte was read"
    assert error_ratio(out, run_reference(case)) < 1e-6


@pytest.mark.parametrize("num_kv_heads,group", [(4, 1), (2, 2), (2, 4), (1, 7), (1, 8)],
                         ids=["mha_4q_4kv", "gqa2_4q_2kv", "gqa4_8q_2kv", "gqa7_7q_1kv", "gqa8_8q_1kv"])
def test_gqa_ratios(num_kv_heads, group):
    case = make_case(**MIXED, num_kv_heads=num_kv_heads, group=group)
    assert error_ratio(run_kernel(case), run_reference(case)) < 1e-6


@pytest.mark.parametrize("head_dim,block_size", [(64, 32), (128, 16), (256, 16), (64, 48), (128, 192)],
                         ids=["smollm2_d64_bs32", "llama3_d128_bs16", "gemma_d256_bs16", "d64_bs48",
                              "hybrid_d128_bs192"])
def test_head_dims_and_block_sizes(head_dim, block_size):
    case = make_case(**MIXED, head_dim=head_dim, block_size=block_size, num_kv_heads=1, group=2)
    assert error_ratio(run_kernel(case), run_reference(case)) < 1e-6


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("num_splits", [2, 8])
def test_split_kv_equals_unsplit(shape, num_splits):
    case = make_case(**shape)
    unsplit = run_kernel(case, num_splits=1)
    split = run_kernel(case, num_splits=num_splits)
    assert not split.isnan().any()
    assert error_ratio(split, unsplit) < 1e-6


def test_long_prefill_skips_the_mask_only_where_every_row_sees_the_tile():
    """Tiles at or before a query tile's first position run unmasked (``_attend_tile``, MASKED=False);
    several query tiles, a chunk after cached context, splits and a window cross that boundary."""
    case = make_case(seq_lens=[300, 200, 130], q_lens=[150, 200, 1], num_kv_heads=1, group=2)
    reference = run_reference(case)
    assert error_ratio(run_kernel(case), reference) < 1e-6
    assert error_ratio(run_kernel(case, num_splits=4), reference) < 1e-6
    assert error_ratio(run_kernel(case, sliding_window=70), run_reference(case, sliding_window=70)) < 1e-6


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_sliding_window_and_softcap(shape):
    case = make_case(**shape)
    for kw in (dict(sliding_window=16), dict(softcap=5.0), dict(sliding_window=8, softcap=2.0)):
        out = run_kernel(case, **kw)
        assert error_ratio(out, run_reference(case, **kw)) < 1e-6, kw
        split = run_kernel(case, num_splits=4, **kw)
        assert error_ratio(split, out) < 1e-6, kw


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("k_bits,v_bits,k_group", [(4, 4, None), (8, 8, None), (4, 4, 16)],
                         ids=["k4v4", "k8v8", "k4v4_g16"])
def test_fp16_queries_and_output(shape, k_bits, v_bits, k_group):
    """fp16 values (and grouped keys) are dequantized in fp16 arithmetic from the biased codes."""
    case = make_case(**shape, dtype=torch.float16, k_bits=k_bits, v_bits=v_bits, k_group=k_group)
    out = run_kernel(case)
    assert out.dtype == torch.float16
    assert error_ratio(out.float(), run_reference(case)) < 2e-3  # fp16 operands of tl.dot


def test_float64_reference_agrees_with_the_reference():
    """``kernel_utils.attention_f64``, the oracle of the fp16 tests, is written apart from the reference:
    both must read the same cache the same way (fp32 queries, every option)."""
    case = make_case(**MIXED, k_bits=4, v_bits=8, k_group=16)
    sinks = torch.randn(case.query.shape[1], generator=torch.Generator().manual_seed(3))
    for kw in ({}, dict(alibi_slopes=alibi_slopes(case.query.shape[1])),
               dict(sinks=sinks, sliding_window=20, softcap=5.0)):
        assert error_ratio(attention_f64(case, **kw), run_reference(case, **kw)) < 1e-6, kw


@pytest.mark.parametrize("name", list(EXTREME_CASES))
def test_fp16_extreme_rows_stay_finite_and_within_rounding(name):
    """Rows the cache write accepts and saturates (a 1e4 outlier channel, values at +-65504, constant,
    zero and tiny rows) among ordinary ones: in fp16 ``code * scale`` and even the dequantized value passed
    65504 and gave inf or NaN (``_load_tile`` now holds quarters), and outputs past 65504 are stored
    saturated. Every (K, V) pair, head sizes 48-240, GQA 1-16, blocks of 48 and 144, decode and mixed."""
    case, splits = make_extreme_case(name, torch.float16)
    for num_splits in splits:
        out = run_kernel(case, num_splits=num_splits)
        assert out.dtype == torch.float16
        assert_within_rounding(out, case)


@pytest.mark.parametrize("q_lens", [[2, 61, 1], [1, 1, 1]], ids=["mixed", "decode"])
def test_fp16_alibi_at_long_context(q_lens):
    """ALiBi over ~1000 positions in fp16 (Bloom's slopes, 16 query heads on one KV head, K8V8): biases
    of up to ~700 are added in fp32 to scores taken in natural units, so fp16 stays within rounding."""
    case = make_case(seq_lens=[2, 61, 1000], q_lens=q_lens, num_kv_heads=1, group=16, head_dim=80,
                     block_size=32, k_bits=8, v_bits=8, dtype=torch.float16)
    slopes = alibi_slopes(16)
    for num_splits in (1, 4) if max(q_lens) == 1 else (1,):
        assert_within_rounding(run_kernel(case, alibi_slopes=slopes, num_splits=num_splits), case,
                               alibi_slopes=slopes)


@pytest.mark.parametrize("q_lens", [[1, 1], [1, 2]], ids=["decode", "mixed"])
def test_fp16_output_saturates_like_the_cache_write(q_lens):
    """Rows of +-65504 are written with zero -65504 and a scale rounded up, so the top code reads back as
    65566: attention over them alone must give the saturated 65504, not inf."""
    case = make_case(seq_lens=[1, 2], q_lens=q_lens, num_kv_heads=1, group=2, head_dim=64, k_bits=8,
                     v_bits=8, dtype=torch.float16)
    signs = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)
    case.key[:] = (FP16_MAX * signs).half()
    case.value[:] = (FP16_MAX * signs).half()
    out = run_kernel(rewrite_cache(case), num_splits=1 if max(q_lens) > 1 else 2)
    assert torch.equal(out.float(), (FP16_MAX * signs).expand_as(out)), out
    assert_within_rounding(out, case)


def test_rounding_allowance_can_fail():
    """The fp16 tolerance (~0.3 % of an ordinary row here) sees a 1 % error, and inf."""
    case = make_case(**MIXED, dtype=torch.float16, adversarial=0.05)
    out = run_kernel(case)
    assert_within_rounding(out, case)
    off = out.clone()
    off[3] *= 1.01
    with pytest.raises(AssertionError, match="rms error"):
        assert_within_rounding(off, case)
    off = out.clone()
    off[5, 1, 7] = float("inf")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_rounding(off, case)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_fp16_extreme_rows_random_sweep(seed):
    """Random shapes, policies, options and fractions of extreme rows (~1 minute per seed)."""
    rng = random.Random(seed)
    for i in range(20):
        head_dim = rng.choice([32, 48, 64, 80, 96, 112, 128, 160, 192, 240, 256])
        k_bits, v_bits = rng.choice([4, 8, 16]), rng.choice([4, 8, 16])
        group = rng.choice([1, 2, 3, 5, 7, 8, 16])
        decode = rng.random() < 0.5
        seq_lens = [rng.choice([1, rng.randint(2, 80), rng.randint(80, 300)]) for _ in range(rng.randint(1, 4))]
        q_lens = [1 if decode else rng.choice([1, rng.randint(1, s), s]) for s in seq_lens]
        case = make_case(seq_lens, q_lens, num_kv_heads=rng.choice([1, 2]), group=group, head_dim=head_dim,
                         block_size=rng.choice([16, 32, 48, 64, 144]), k_bits=k_bits, v_bits=v_bits,
                         k_group=16 if k_bits != 16 and rng.random() < 0.2 else None, dtype=torch.float16,
                         adversarial=rng.choice([0.0, 0.02, 0.05, 0.1]), seed=100 * seed + i)
        heads = case.query.shape[1]
        kw = rng.choice([{}, {}, dict(alibi_slopes=torch.linspace(0.7, 2 ** -8, heads)), dict(softcap=20.0),
                         dict(sliding_window=30), dict(sinks=torch.linspace(-1.0, 2.0, heads))])
        splits = rng.choice([1, 4]) if decode else 1
        assert_within_rounding(run_kernel(case, num_splits=splits, **kw), case, **kw)


# Error budget against attention on the original, never-quantized K/V (relative RMS of the output,
# random Gaussian K/V). Measured over 3 seeds: k4v4 0.105-0.111, k8v4/k16v4 0.085-0.092 (values dominate),
# k8v8 0.0064; bounds sit ~20 % above, so a scale or zero-point bug fails.
BUDGET = {(4, 4): 0.13, (8, 4): 0.11, (16, 4): 0.11, (8, 8): 0.008, (16, 16): 1e-6}


@pytest.mark.parametrize("bits", list(BUDGET), ids=[f"k{k}v{v}" for k, v in BUDGET])
def test_quantized_vs_full_precision_budget(bits):
    case = make_case(**MIXED, k_bits=bits[0], v_bits=bits[1])
    err = error_ratio(run_kernel(case), full_precision_attention(case))
    assert err < BUDGET[bits], f"k{bits[0]}v{bits[1]} error ratio {err:.4f} over budget {BUDGET[bits]}"


# Heads that are not a power of two (Phi-2: 80, Phi-3: 96): tiles span the next power of two and mask the
# channels past head_dim; key groups that divide the head (96: 32, 80: 16).
PADDED_HEADS = [(96, 4, 4, None), (96, 4, 4, 32), (80, 8, 4, 16), (80, 16, 16, None), (48, 8, 8, None),
                (112, 16, 4, None)]


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("head_dim,k_bits,v_bits,k_group", PADDED_HEADS,
                         ids=["d96_k4v4", "d96_k4v4_g32", "d80_k8v4_g16", "d80_k16v16", "d48_k8v8",
                              "d112_k16v4"])
def test_heads_that_are_not_a_power_of_two(head_dim, k_bits, v_bits, k_group, shape):
    """Query and output live inside wider rows whose gaps hold NaN: a channel read past head_dim would
    poison the scores, one stored past it would overwrite the gap."""
    case = make_case(**shape, head_dim=head_dim, k_bits=k_bits, v_bits=v_bits, k_group=k_group, block_size=32)
    tokens, heads, _ = case.query.shape
    wide = torch.full((tokens, heads, head_dim + 16), float("nan"))
    wide[..., :head_dim] = case.query
    expected = run_reference(case)
    case.query = wide[..., :head_dim]
    for num_splits in (1, 4):
        out_wide = torch.full_like(wide, 7.0)
        out = run_kernel(case, num_splits=num_splits, out=out_wide[..., :head_dim])
        assert error_ratio(out, expected) < 1e-6, num_splits
        assert (out_wide[..., head_dim:] == 7.0).all(), "a store past head_dim"
    assert error_ratio(expected, full_precision_attention(case)) < BUDGET[(k_bits, v_bits)]


@pytest.mark.parametrize("head_dim,k_group", [(96, None), (80, 16)])
def test_heads_that_are_not_a_power_of_two_in_fp16(head_dim, k_group):
    """fp16: values dequantized in fp16 from the biased codes, and (g16) per-group parameters, padded."""
    case = make_case(**MIXED, head_dim=head_dim, k_group=k_group, dtype=torch.float16)
    assert error_ratio(run_kernel(case).float(), run_reference(case)) < 2e-3


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (16, 16)])
def test_attention_sinks(shape, k_bits, v_bits):
    """gpt-oss's per-head sink logit joins every row's softmax once, split or not (split 0 carries it)."""
    case = make_case(**shape, k_bits=k_bits, v_bits=v_bits)
    sinks = torch.randn(case.query.shape[1], generator=torch.Generator().manual_seed(3)) + 2.0
    expected = run_reference(case, sinks=sinks)
    assert error_ratio(expected, run_reference(case)) > 0.3  # the sinks take a real share
    for num_splits in (1, 4):
        assert error_ratio(run_kernel(case, sinks=sinks, num_splits=num_splits), expected) < 1e-6, num_splits
    window = dict(sliding_window=20, softcap=5.0)
    expected = run_reference(case, sinks=sinks, **window)
    assert error_ratio(run_kernel(case, sinks=sinks, **window), expected) < 1e-6
    with pytest.raises(ValueError, match="sinks must be a contiguous float32"):
        run_kernel(case, sinks=sinks.double())


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (16, 16)])
def test_alibi(shape, k_bits, v_bits):
    """Bloom's and Falcon's ALiBi: each score gains slope * (key position - query position), in every
    split and in both loops (tiles seen in full by every row, and the masked ones)."""
    case = make_case(**shape, k_bits=k_bits, v_bits=v_bits)
    slopes = alibi_slopes(case.query.shape[1])
    expected = run_reference(case, alibi_slopes=slopes)
    assert error_ratio(expected, run_reference(case)) > 0.3  # the bias moves the output
    if k_bits == 16:  # the reference's bias, against an oracle written apart from it
        assert error_ratio(expected, alibi_oracle(case, slopes)) < 1e-3
    for num_splits in (1, 4):
        out = run_kernel(case, alibi_slopes=slopes, num_splits=num_splits)
        assert error_ratio(out, expected) < 1e-6, num_splits
    window = dict(sliding_window=20, softcap=5.0)
    expected = run_reference(case, alibi_slopes=slopes, **window)
    assert error_ratio(run_kernel(case, alibi_slopes=slopes, **window), expected) < 1e-6
    with pytest.raises(ValueError, match="alibi_slopes must be a contiguous float32"):
        run_kernel(case, alibi_slopes=slopes[:-1])


def test_large_block_index_does_not_overflow():
    """Blocks past 2**31 bytes into the cache: 32-bit address arithmetic would wrap."""
    case = make_case(seq_lens=[40], q_lens=[1], num_kv_heads=1, group=4)
    run = case.layout.run_bytes
    num_blocks = (2 ** 31) // run + 64
    big = torch.empty(num_blocks, 1, run, dtype=torch.uint8)  # untouched pages cost no memory
    top = torch.arange(num_blocks - case.cache.shape[0], num_blocks)
    big[top] = case.cache
    case.block_table = (case.block_table + int(top[0])).to(torch.int32)
    case.cache = big
    expected = run_reference(case)
    # (a wrapped address reads another block: orders of magnitude off; fp32 rounding of a 40-token decode
    # with (scale, zero) applied per token is ~1e-6 here, over seeds 0.8-1.2e-6)
    assert error_ratio(run_kernel(case), expected) < 3e-6
