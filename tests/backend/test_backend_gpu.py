"""The backend's layer steps on a CUDA GPU (no vLLM needed: ``attention_ops`` is vLLM-free).

The Triton path against the torch path on CPU, and the claim behind the builder's CUDA-graph support
(``UNIFORM_SINGLE_TOKEN_DECODE``): a decode step captured once, with vLLM's capture-time
``max_seq_len`` (max_model_len), stays right when replayed with other lengths and block tables.
"""
from __future__ import annotations

import pytest
import torch

from vllm_int4kv import attention as ops
from vllm_int4kv.policy import parse_policy

pytestmark = pytest.mark.gpu

BLOCK, HEADS_Q, HEADS_KV, D = 16, 8, 2, 128


def _meta(seq_lens, q_lens, block_table, device, max_seq_len=None):
    q_lens = torch.tensor(q_lens)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    slots = torch.cat([block_table[s, (torch.arange(n - q, n, device=device) // BLOCK)].long() * BLOCK
                       + torch.arange(n - q, n, device=device) % BLOCK
                       for s, (n, q) in enumerate(zip(seq_lens, q_lens.tolist()))])
    return ops.Int4KVMetadata(
        num_actual_tokens=int(q_lens.sum()), max_query_len=int(q_lens.max()),
        max_seq_len=max_seq_len or max(seq_lens),
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).int()]).to(device),
        seq_lens=seq_lens_t, block_table=block_table, slot_mapping=slots)


def _cache(layout, num_blocks, device):
    return torch.zeros(num_blocks, HEADS_KV, layout.run_bytes, dtype=torch.uint8, device=device)


@pytest.mark.parametrize("policy", ["k4v4", "k8v4-rot", "k16v16"])
def test_triton_path_matches_torch_path(policy):
    p, dev = parse_policy(policy), "cuda"
    layout = p.layout(D, BLOCK, elem_bytes=2)
    gen = torch.Generator().manual_seed(0)
    seq_lens, num_blocks = [300, 17, 1000], 200
    block_table = torch.randperm(num_blocks, generator=gen)[: 3 * 63].view(3, 63).int()
    k = torch.randn(sum(seq_lens), HEADS_KV, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(sum(seq_lens), HEADS_KV, D, generator=gen).to(torch.bfloat16)
    q = torch.randn(sum(seq_lens), HEADS_Q, D, generator=gen).to(torch.bfloat16)
    outs = {}
    for impl, device in (("torch", "cpu"), ("triton", dev)):
        cache = _cache(layout, num_blocks, device)
        meta = _meta(seq_lens, seq_lens, block_table.to(device), device)  # a whole-prompt prefill
        ops.write_kv(k.to(device), v.to(device), cache, meta.slot_mapping, layout, impl=impl, rotated=p.rotate)
        out = torch.full_like(q, float("nan"), device=device)
        ops.attend(q.to(device), cache, layout, meta, out, impl=impl, rotated=p.rotate, sm_scale=D ** -0.5,
                   sliding_window=None, softcap=None)
        outs[impl] = out.float().cpu()
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=3e-2, rtol=3e-2)


def test_decode_step_replays_correctly_from_a_cuda_graph():
    p, dev = parse_policy("k4v4"), "cuda"
    layout = p.layout(D, BLOCK, elem_bytes=2)
    max_model_len, num_seqs, num_blocks = 2048, 4, 600
    gen = torch.Generator().manual_seed(1)
    cache = _cache(layout, num_blocks, dev)
    k = torch.randn(num_blocks * BLOCK, HEADS_KV, D, generator=gen).to(dev, torch.bfloat16)
    all_slots = torch.arange(num_blocks * BLOCK, device=dev)
    ops.write_kv(k, k.flip(0), cache, all_slots, layout, impl="triton", rotated=False)  # fill every page

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(1, max_model_len, (num_seqs,), generator=g).tolist()
        table = torch.randperm(num_blocks, generator=g)[: num_seqs * 128].view(num_seqs, 128).int().to(dev)
        q = torch.randn(num_seqs, HEADS_Q, D, generator=g).to(dev, torch.bfloat16)
        return lens, table, q

    lens, table, q = batch(0)
    static = _meta(lens, [1] * num_seqs, table, dev, max_seq_len=max_model_len)  # as vLLM captures
    static_q, static_out = q.clone(), torch.empty_like(q)
    kwargs = dict(impl="triton", rotated=False, sm_scale=D ** -0.5, sliding_window=None, softcap=None)
    ops.attend(static_q, cache, layout, static, static_out, **kwargs)  # warm up (compile)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.attend(static_q, cache, layout, static, static_out, **kwargs)
    for seed in (2, 3, 4):
        lens, table, q = batch(seed)
        static.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        static.block_table.copy_(table)
        static_q.copy_(q)
        graph.replay()
        eager_out = torch.empty_like(q)
        ops.attend(q, cache, layout, _meta(lens, [1] * num_seqs, table, dev), eager_out, **kwargs)
        torch.testing.assert_close(static_out.float(), eager_out.float(), atol=1e-2, rtol=1e-2)
