"""The kernels on a CUDA GPU, across what the CPU suite covers only under the interpreter.

The interpreter runs bf16 arithmetic wrongly and never uses the GPU code paths (tensor-core ``tl.dot``,
the launcher's GPU tile sizes and split counts), so these run each policy, dtype, head size and masking
option on the device against the fp32 torch reference on the same cache bytes.
"""
from __future__ import annotations

import pytest
import torch

from kernel_utils import (EXTREME_CASES, alibi_slopes, assert_within_rounding, make_case, make_extreme_case,
                          rewrite_cache)
from vllm_int4kv.kernels.attention import paged_attention
from vllm_int4kv.kernels.cache_write import write_kv_cache
from vllm_int4kv.kernels.reference import (error_ratio, paged_attention_reference, read_cache_reference,
                                           write_cache_reference)

pytestmark = pytest.mark.gpu

MIXED = dict(seq_lens=[37, 50, 19, 700], q_lens=[1, 13, 19, 3])  # decode, prefill, chunked prefill
LONG_DECODE = dict(seq_lens=[3000, 1500], q_lens=[1, 1])  # few programs: the launcher splits the context
# many 64-row query tiles, each with tiles it sees in full (unmasked loop) and a diagonal (masked loop)
LONG_PREFILL = dict(seq_lens=[900, 640], q_lens=[500, 640])
POLICIES = {"k4v4": (4, 4, None), "k8v4": (8, 4, None), "k16v4": (16, 4, None), "k8v8": (8, 8, None),
            "k16v16": (16, 16, None), "k4v4-g32": (4, 4, 32)}
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}  # vs the fp32 reference


def _on_gpu(case):
    for name in ("cache", "query", "block_table", "seq_lens", "query_start_loc"):
        setattr(case, name, getattr(case, name).cuda())
    return case


def _check(case, **kw):
    out = paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                          case.query_start_loc, max_query_len=case.max_query_len,
                          max_seq_len=case.max_seq_len, **kw)
    for launch_only in ("num_warps", "num_splits", "num_stages", "share_tiles"):
        kw.pop(launch_only, None)
    kw = {name: value.cpu() if torch.is_tensor(value) else value for name, value in kw.items()}
    ref = paged_attention_reference(case.query.cpu(), case.cache.cpu(), case.layout, case.block_table.cpu(),
                                    case.seq_lens.cpu(), case.query_start_loc.cpu(), **kw)
    return error_ratio(out.float().cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_and_dtype(policy, dtype):
    k_bits, v_bits, k_group = POLICIES[policy]
    case = _on_gpu(make_case(**MIXED, head_dim=128, k_bits=k_bits, v_bits=v_bits, k_group=k_group,
                             dtype=dtype))
    assert _check(case) < TOLERANCE[dtype]


@pytest.mark.parametrize("head_dim,num_kv_heads,group", [(64, 3, 3), (128, 8, 4), (128, 4, 7), (256, 1, 8),
                                                          (128, 2, 1), (96, 4, 1)])
def test_shapes_and_split_decode(head_dim, num_kv_heads, group):
    for shape in (MIXED, LONG_DECODE):
        case = _on_gpu(make_case(**shape, head_dim=head_dim, num_kv_heads=num_kv_heads, group=group,
                                 dtype=torch.bfloat16))
        assert _check(case) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("policy", ["k4v4", "k8v4", "k16v16", "k4v4-g32"])
def test_long_prefill(policy):
    k_bits, v_bits, k_group = POLICIES[policy]
    case = _on_gpu(make_case(**LONG_PREFILL, head_dim=128, k_bits=k_bits, v_bits=v_bits, k_group=k_group,
                             dtype=torch.bfloat16))
    assert _check(case) < TOLERANCE[torch.bfloat16]
    assert _check(case, sliding_window=100) < TOLERANCE[torch.bfloat16]


def test_softcap_sliding_window_warps_and_stages():
    case = _on_gpu(make_case(**MIXED, dtype=torch.bfloat16))
    assert _check(case, softcap=20.0, sliding_window=24) < TOLERANCE[torch.bfloat16]
    assert _check(case, num_warps=8) < TOLERANCE[torch.bfloat16]
    for stages in (1, 2):
        assert _check(case, num_stages=stages) < TOLERANCE[torch.bfloat16]
    long = _on_gpu(make_case(**LONG_DECODE, dtype=torch.bfloat16))
    assert _check(long, sliding_window=500, num_splits=8) < TOLERANCE[torch.bfloat16]
    sinks = (torch.randn(case.query.shape[1]) + 2.0).cuda()  # gpt-oss's attention sinks, split or not
    assert _check(case, sinks=sinks) < TOLERANCE[torch.bfloat16]
    assert _check(long, sinks=sinks, num_splits=8) < TOLERANCE[torch.bfloat16]
    slopes = alibi_slopes(case.query.shape[1]).cuda()  # Bloom's ALiBi, split or not
    assert _check(case, alibi_slopes=slopes) < TOLERANCE[torch.bfloat16]
    assert _check(long, alibi_slopes=slopes, num_splits=8) < TOLERANCE[torch.bfloat16]
    hybrid = _on_gpu(make_case(**MIXED, block_size=192, dtype=torch.bfloat16))  # a block that is no power of 2
    assert _check(hybrid) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("policy,dtype", [("k4v4", torch.bfloat16), ("k4v4", torch.float16),
                                          ("k8v8", torch.bfloat16), ("k16v16", torch.bfloat16),
                                          ("k4v4-g32", torch.bfloat16)], ids=str)
def test_tiles_converted_per_warp_or_once_per_program(policy, dtype):
    """Both routes of a converted tile to the dot (``_once_per_program``), which the tuning sweep times,
    for decode, prefill and split decode."""
    k_bits, v_bits, k_group = POLICIES[policy]
    for shape in (MIXED, LONG_DECODE):
        case = _on_gpu(make_case(**shape, head_dim=128, k_bits=k_bits, v_bits=v_bits, k_group=k_group,
                                 dtype=dtype))
        for share in (True, False):
            assert _check(case, share_tiles=share) < TOLERANCE[dtype], share


@pytest.mark.parametrize("policy,head_dim", [("k4v4", 128), ("k8v4", 128), ("k16v16", 128), ("k4v4-g32", 128),
                                             ("k4v4-g32", 96)])
def test_cache_write_on_gpu_decodes_like_the_reference(policy, head_dim):
    """Values, not bytes: the GPU's fp32 division may put a rare code one rounding step away."""
    k_bits, v_bits, k_group = POLICIES[policy]
    case = make_case(seq_lens=[40, 77], q_lens=[1, 1], head_dim=head_dim, k_bits=k_bits, v_bits=v_bits,
                     k_group=k_group, dtype=torch.bfloat16)
    ours = torch.zeros_like(case.cache).cuda()
    write_kv_cache(case.key.cuda(), case.value.cuda(), ours, case.slot_mapping.cuda(), case.layout)
    ref = torch.zeros_like(case.cache)
    write_cache_reference(ref, case.key, case.value, case.slot_mapping, case.layout)
    ids = torch.arange(ref.shape[0])
    mine = read_cache_reference(ours.cpu(), case.layout, ids, torch.bfloat16)
    expect = read_cache_reference(ref, case.layout, ids, torch.bfloat16)
    slots = case.slot_mapping
    for got, want in zip(mine, expect):
        assert error_ratio(got[slots].float(), want[slots].float()) < 1e-3


def _run(case, **kw):
    return paged_attention(case.query, case.cache, case.layout, case.block_table, case.seq_lens,
                           case.query_start_loc, max_query_len=case.max_query_len,
                           max_seq_len=case.max_seq_len, **kw)


EXTREME_PARAMS = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
                  for name in EXTREME_CASES for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("name,dtype", EXTREME_PARAMS)
def test_extreme_rows_within_rounding(name, dtype):
    """The CPU suite's extreme rows (``kernel_utils.EXTREME_CASES``) on the device, in bf16 too, which the
    interpreter computes wrongly: finite, and within 16-bit rounding of the float64 attention."""
    case, splits = make_extreme_case(name, dtype)
    case = _on_gpu(case)
    for num_splits in splits + (None,):  # None: the launcher's own split count
        kw = {} if num_splits is None else dict(num_splits=num_splits)
        assert_within_rounding(_run(case, **kw), case)
        if num_splits is None:
            for share in (True, False):  # both routes of a converted tile to the dot
                assert_within_rounding(_run(case, share_tiles=share), case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("q_lens", [[2, 61, 1], [1, 1, 1]], ids=["mixed", "decode"])
def test_alibi_at_long_context_within_rounding(q_lens, dtype):
    case = _on_gpu(make_case(seq_lens=[2, 61, 1000], q_lens=q_lens, num_kv_heads=1, group=16, head_dim=80,
                             block_size=32, k_bits=8, v_bits=8, dtype=dtype))
    slopes = alibi_slopes(16).cuda()
    assert_within_rounding(_run(case, alibi_slopes=slopes), case, alibi_slopes=slopes)


@pytest.mark.parametrize("q_lens", [[1, 1], [1, 2]], ids=["decode", "mixed"])
def test_fp16_output_saturates_like_the_cache_write(q_lens):
    case = make_case(seq_lens=[1, 2], q_lens=q_lens, num_kv_heads=1, group=2, head_dim=64, k_bits=8, v_bits=8,
                     dtype=torch.float16)
    signs = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)
    case.key[:] = (65504.0 * signs).half()
    case.value[:] = (65504.0 * signs).half()
    case = _on_gpu(rewrite_cache(case))
    out = _run(case).float().cpu()
    assert torch.equal(out, (65504.0 * signs).expand_as(out)), out


def test_block_ids_are_checked_on_request(monkeypatch):
    """On the device the ids are checked only when asked (a device sync per call)."""
    from vllm_int4kv.kernels.block_checks import CHECK_BLOCKS_ENV

    case = make_case(**MIXED)
    case.block_table[1, 2] = case.cache.shape[0]
    case = _on_gpu(case)
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        _run(case, validate_blocks=True)
    monkeypatch.setenv(CHECK_BLOCKS_ENV, "1")
    with pytest.raises(ValueError, match=r"block_table\[1, 2\]"):
        _run(case)
    key = torch.randn(3, case.cache.shape[1], case.layout.head_dim, device="cuda")
    slots = torch.tensor([0, case.cache.shape[0] * case.layout.block_size, 1], device="cuda")
    with pytest.raises(ValueError, match=r"slot_mapping\[1\]"):
        write_kv_cache(key, key, case.cache, slots, case.layout)
