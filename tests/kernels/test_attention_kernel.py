"""Unified paged-attention kernel vs the torch reference (tight) and vs full precision (error budget)."""
import random

import pytest
import torch

from kernel_utils import (EXTREME_CASES, alibi_oracle, alibi_slopes, assert_within_rounding, attention_f64,
                          full_precision_attention, make_case, make_extreme_case, rewrite_cache)
from vllm_int4kv.kernels import attention
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
    assert error_ratio(run_kernel(case), expected) < 1e-6


def test_contract_errors_are_clear():
    case = make_case(**DECODE)
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        paged_attention(case.query[:, :3], case.cache, case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=1, max_seq_len=130)
    with pytest.raises(TypeError, match="uint8"):
        paged_attention(case.query, case.cache.float(), case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=1, max_seq_len=130)
    with pytest.raises(ValueError, match="num_splits must be a power of two"):
        run_kernel(case, num_splits=3)
    with pytest.raises(ValueError, match="num_warps must be"):
        run_kernel(case, num_warps=3)
    with pytest.raises(ValueError, match="num_stages must be 1 to 8"):
        run_kernel(case, num_stages=0)
    assert error_ratio(run_kernel(case, num_stages=1), run_reference(case)) < 1e-6  # a launch option only


def test_more_contract_errors_are_clear():
    """What the host can check without a device sync: devices, dtypes, strides, and that the block table
    has a column for each block of max_seq_len tokens."""
    case = make_case(**DECODE)  # blocks of 16, at most 130 tokens: 9 blocks, a table of 10 columns
    with pytest.raises(ValueError, match="max_seq_len 161 needs 11 blocks of 16; block_table has 10 columns"):
        paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=1, max_seq_len=161)
    with pytest.raises(ValueError, match="seq_lens must be 1-D with contiguous entries"):
        paged_attention(case.query, case.cache, case.layout, case.block_table,
                        torch.stack((case.seq_lens, case.seq_lens), 1)[:, 0], case.query_start_loc,
                        max_query_len=1, max_seq_len=130)
    with pytest.raises(TypeError, match="block_table must be an int32/int64 tensor"):
        paged_attention(case.query, case.cache, case.layout, case.block_table.float(), case.seq_lens,
                        case.query_start_loc, max_query_len=1, max_seq_len=130)
    with pytest.raises(ValueError, match="out must be torch.float32"):
        run_kernel(case, out=torch.empty_like(case.query, dtype=torch.float16))


def _bad_entry(case, seq: int, entry: int, block_id: int):
    case.block_table = case.block_table.clone()
    case.block_table[seq, entry] = block_id
    return case


@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
def test_block_ids_outside_the_cache_are_refused(shape):
    """A block id past the end of the cache (or negative) was read without a word (the output changed; a
    probe crashed the interpreter): on CPU every block a sequence reads is checked before the launch."""
    case = make_case(**shape)
    num_blocks = case.cache.shape[0]
    with pytest.raises(ValueError, match=rf"block_table\[1, 2\] = {num_blocks} is not a block of the "
                                         rf"cache \(0 <= id < {num_blocks}\): sequence 1 reads it for its "
                                         "tokens 32 to 47"):
        run_kernel(_bad_entry(make_case(**shape), 1, 2, num_blocks))
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1 is not a block"):
        run_kernel(_bad_entry(make_case(**shape), 0, 0, -1))
    # entries past a sequence's blocks, and those before every row's window, are never read: anything goes
    expected = run_reference(case, sliding_window=16)
    case.block_table = case.block_table.clone()
    for s, n in enumerate(case.seq_lens.tolist()):
        case.block_table[s, -(-n // 16):] = (10 ** 6, -5)[s % 2]
    case.block_table[1, 0] = num_blocks  # 50 or 130 tokens, a window of 16 from the first new row
    assert error_ratio(run_kernel(case, sliding_window=16), expected) < 1e-6


def test_lengths_and_offsets_the_launch_cannot_follow_are_refused():
    """A length past the block table's columns (the kernel would read the next row as block ids), more
    query tokens than max_query_len (decode tiles drop the causal mask) or than the sequence holds."""
    case = make_case(**MIXED)
    seq_lens = case.seq_lens.clone()
    seq_lens[3] = 16 * case.block_table.shape[1] + 1  # max_seq_len (70) is what the caller says
    with pytest.raises(ValueError, match="sequence 3 has 97 tokens, 7 blocks of 16; block_table has 6 col"):
        paged_attention(case.query, case.cache, case.layout, case.block_table, seq_lens, case.query_start_loc,
                        max_query_len=19, max_seq_len=70)
    with pytest.raises(ValueError, match="sequence 2 has 19 query tokens, more than max_query_len 13"):
        paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=13, max_seq_len=70)
    case.seq_lens = case.seq_lens.clone()
    case.seq_lens[1] = 12
    with pytest.raises(ValueError, match=r"sequence 1 has 13 query tokens but seq_lens\[1\] = 12"):
        run_kernel(case)
    case = make_case(**MIXED)
    starts = case.query_start_loc.clone()
    starts[2] = 40  # sequence 2 would run from 40 to 33
    with pytest.raises(ValueError, match="query_start_loc falls at sequence 2: 40 to 33"):
        paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens, starts,
                        max_query_len=19, max_seq_len=70)
    with pytest.raises(ValueError, match="query_start_loc runs from 0 to 36, outside the 35 query tokens"):
        paged_attention(case.query[:35], case.cache, case.layout, case.block_table, case.seq_lens,
                        case.query_start_loc, max_query_len=19, max_seq_len=70)


def test_block_checks_are_opt_in_on_a_gpu(monkeypatch):
    """On a GPU reading the ids is a device sync per call: only with validate_blocks=True or
    VLLM_INT4KV_CHECK_BLOCKS=1; on CPU always, unless a caller turns them off."""
    from vllm_int4kv.kernels.block_checks import CHECK_BLOCKS_ENV, checks_blocks

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(CHECK_BLOCKS_ENV, raising=False)
    assert not checks_blocks(cuda, None) and checks_blocks(cuda, True)
    assert checks_blocks(cpu, None) and not checks_blocks(cpu, False)
    for value, checks in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(CHECK_BLOCKS_ENV, value)
        assert checks_blocks(cuda, None) == checks, value
    assert not checks_blocks(cuda, False)
    calls = []
    monkeypatch.setattr(attention, "check_block_table", lambda *args, **kw: calls.append(kw["num_blocks"]))
    case = make_case(**DECODE)
    run_kernel(case, validate_blocks=False)
    assert not calls
    run_kernel(case)
    assert calls == [case.cache.shape[0]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check is for CPU runs")
def test_an_interpreter_that_cannot_run_the_loop_is_named_before_the_launch(monkeypatch):
    """Triton 3.6's interpreter with NumPy 2.4 fails inside the tile loop (triton-lang/triton#9171);
    the launcher must say so, and what to install, instead of an InterpreterError from the kernel."""
    import numpy
    from triton.runtime.errors import InterpreterError

    from vllm_int4kv.kernels import interpreter

    class FailsLikeNumpy24:
        def __getitem__(self, grid):
            def launch(*args):
                raise InterpreterError(repr(TypeError("only 0-dimensional arrays can be converted")))
            return launch

    case = make_case(**DECODE)
    assert interpreter.interpreter_problem() is None  # this environment: every kernel test runs
    monkeypatch.setattr(interpreter, "_count_to_loaded_bound", FailsLikeNumpy24())
    try:
        for numpy_version, advice in (("2.4.6", True), ("2.3.5", False)):  # NumPy is blamed only from 2.4
            monkeypatch.setattr(numpy, "__version__", numpy_version)
            interpreter.interpreter_problem.cache_clear()
            with pytest.raises(RuntimeError, match="cannot run a loop with a run-time bound") as raised:
                run_kernel(case)
            assert ("pip install 'numpy<2.4'" in str(raised.value)) == advice, str(raised.value)
    finally:
        interpreter.interpreter_problem.cache_clear()


def test_gpu_tile_choices_run_here_too(monkeypatch):
    """On a GPU, fp32 queries get 16-token tiles and 16 prefill rows (ptxas spills at the 16-bit sizes);
    the CPU normally keeps the larger tiles, so run the GPU choices under the interpreter as well."""
    monkeypatch.setattr(attention, "_is_gpu", lambda device: True)
    for kw in (dict(num_kv_heads=2, group=4), dict(num_kv_heads=1, group=7, head_dim=128),
               dict(num_kv_heads=1, group=8, head_dim=256)):
        case = make_case(**MIXED, **kw)
        assert error_ratio(run_kernel(case), run_reference(case)) < 1e-6, kw
    case = make_case(**DECODE)  # num_splits given: choosing it would ask the (absent) GPU for its SMs
    assert error_ratio(run_kernel(case, num_splits=4), run_reference(case)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k_bits,v_bits", [(4, 4), (8, 4)])
def test_16bit_queries_on_gpu(shape, dtype, k_bits, v_bits):
    """The GPU-only code: decode turns 4-bit codes into floats with inline PTX (``_nibble_values``)
    and bf16 codes by OR-ing them into 128.0; the interpreter runs neither."""
    case = make_case(**shape, dtype=dtype, k_bits=k_bits, v_bits=v_bits)
    for name in ("cache", "query", "block_table", "seq_lens", "query_start_loc"):
        setattr(case, name, getattr(case, name).cuda())
    out = run_kernel(case)
    ref = paged_attention_reference(case.query.cpu(), case.cache.cpu(), case.layout,
                                    case.block_table.cpu(), case.seq_lens.cpu(),
                                    case.query_start_loc.cpu())
    assert error_ratio(out.float().cpu(), ref) < 1e-2


@pytest.mark.parametrize("dtype,bits,fold", [(torch.bfloat16, 4, True), (torch.bfloat16, 4, False),
                                            (torch.float16, 4, True), (torch.float16, 8, True),
                                            (torch.float16, 4, False), (torch.float16, 8, False)])
def test_codes_become_floats_by_or_ing_them_into_the_bias(dtype, bits, fold):
    """The kernel turns a code into ``bias + code`` in the dot's dtype with one OR (no int->float
    conversion) and folds ``-bias * scale`` into the zero point: the constant must hold every code exactly.
    fp16 tiles dequantized value by value take 256.0, whose last bit is 1/4: ``256 + code / 4``.
    """
    from vllm_int4kv.kernels.attention_kernels import BF16_128, FP16_256, FP16_1024

    bias = attention.code_bias(bits, dtype, fold)
    pattern = {128: BF16_128, 256: FP16_256, 1024: FP16_1024}[bias].value
    assert torch.tensor(pattern, dtype=torch.int16).view(dtype).item() == bias
    codes = torch.arange(2 ** bits, dtype=torch.int16)
    unit = 0.25 if bias == 256 else 1.0
    assert torch.equal((codes | pattern).view(dtype).double(), bias + unit * codes.double())
    assert attention.code_bias(8, torch.bfloat16) == 0  # 128 + 255 needs 9 significant bits: converted
    assert attention.code_bias(4, torch.float32) == 0  # exact fp32 dot: converted


def _run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """A slow, obvious emulator of the few 32-bit PTX instructions our inline asm uses.

    ``prmt.b32 d, a, b, sel`` (default mode): result byte i is byte ``sel >> 4i & 7`` of the 8 bytes
    ``b:a`` (a = bytes 0-3), sign-replicated if bit 3 of that nibble is set (PTX ISA, prmt).
    """
    regs = dict(inputs)

    def value(operand: str) -> int:
        return int(operand, 0) if operand[0].isdigit() else regs[operand]

    for line in asm.replace("{", "").replace("}", "").split(";"):
        words = line.replace(",", " ").split()
        if not words or words[0] == ".reg":
            continue
        op, dest, *src = words
        if op == "and.b32":
            regs[dest] = value(src[0]) & value(src[1])
        elif op == "mov.b32":
            regs[dest] = value(src[0])
        elif op == "shr.u32":
            regs[dest] = value(src[0]) >> value(src[1])
        elif op == "prmt.b32":
            pool = value(src[0]) | value(src[1]) << 32
            selector, out = value(src[2]), 0
            for i in range(4):
                nibble = selector >> 4 * i & 0xF
                byte = pool >> 8 * (nibble & 7) & 0xFF
                if nibble & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << 8 * i
            regs[dest] = out
        else:
            raise AssertionError(f"the emulator does not know {op!r}: extend it with the new instruction")
    return regs


@pytest.mark.parametrize("dtype,fold", [(torch.bfloat16, True), (torch.float16, True), (torch.float16, False)],
                         ids=["bf16", "fp16", "fp16_quarters"])
def test_ptx_nibble_unpack_gives_bias_plus_code(dtype, fold):
    """``_nibble_values`` (GPU only) against its definition, for every byte in every position.

    Triton passes the 4 bytes of one call in ``$4`` (element i = byte i) and reads each output's elements
    i from register ``$(2k + i // 2)``, lane ``i % 2`` (seen in the PTX it generates).
    """
    from vllm_int4kv.kernels import attention_kernels as ak

    bias = attention.code_bias(4, dtype, fold)
    asm = {128: ak.NIBBLES_TO_BF16_PTX, 1024: ak.NIBBLES_TO_FP16_PTX,
           256: ak.NIBBLES_TO_FP16_QUARTERS_PTX}[bias].value
    unit = 0.25 if bias == 256 else 1.0
    for first in range(0, 256, 4):
        packed = [first, first + 1, first + 2, (first * 7 + 3) % 256]
        out = _run_ptx(asm, {"$4": int.from_bytes(bytes(packed), "little")})
        lanes = torch.tensor([out[f"${r}"] >> 16 * lane & 0xFFFF for r in range(4) for lane in (0, 1)],
                             dtype=torch.int32).to(torch.int16).view(dtype).double()
        low = torch.tensor([b & 0xF for b in packed], dtype=torch.float64)
        high = torch.tensor([b >> 4 for b in packed], dtype=torch.float64)
        assert torch.equal(lanes[:4], bias + unit * low), (packed, lanes)
        assert torch.equal(lanes[4:], bias + unit * high), (packed, lanes)


def test_ptx_copy_changes_no_bit():
    """``_once_per_program``'s asm (GPU only) must return its two 16-bit values exactly as they came."""
    from vllm_int4kv.kernels import attention_kernels as ak

    for word in (0, 0x43004F0F, 0xFFFF8000, 0x12345678):
        assert _run_ptx(ak.COPY_PTX.value, {"$1": word})["$0"] == word


def test_tiles_are_shared_through_shared_memory_only_where_it_pays(monkeypatch):
    """On NVIDIA GPUs quantized tiles always go to the dot through shared memory, 16-bit planes only in
    prefill (decode loads them into the dot as they are); never for fp32 queries, or on CPU, where
    asking for it is an error."""
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    assert not attention.shares_tiles_by_default(4, True, bf16)  # CPU: the interpreter runs no PTX
    case = make_case(**DECODE)
    with pytest.raises(ValueError, match="share_tiles=True needs an NVIDIA GPU"):
        run_kernel(case, share_tiles=True)
    assert error_ratio(run_kernel(case, share_tiles=False), run_reference(case)) < 1e-6
    monkeypatch.setattr(attention, "_is_gpu", lambda device: True)
    assert attention.shares_tiles_by_default(4, True, bf16) and attention.shares_tiles_by_default(8, False, bf16)
    assert attention.shares_tiles_by_default(16, False, bf16)
    assert not attention.shares_tiles_by_default(16, True, bf16)
    assert attention.shares_tiles_by_default(4, True, torch.empty(1, dtype=torch.float16))
    assert not attention.shares_tiles_by_default(4, False, torch.empty(1, dtype=torch.float32))
