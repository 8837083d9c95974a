"""The kernels on a CUDA GPU, across what the CPU suite covers only under the interpreter.

The interpreter runs bf16 arithmetic wrongly and never uses the GPU code paths (tensor-core ``tl.dot``,
the launcher's GPU tile sizes and split counts), so these run each policy, dtype, head size and masking
option on the device against the fp32 torch reference on the same cache bytes.
"""
from __future__ import annotations

import pytest
import torch

from kernel_utils import alibi_slopes, make_case
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
