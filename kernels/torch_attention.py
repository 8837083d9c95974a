"""Paged attention over the quantized cache in batched torch ops: the CPU serving path.

The reference (``reference.paged_attention_reference``) walks the batch one sequence at a time, which is
what makes it obvious, and slow to serve with: a decode step of 32 sequences runs ~10 small torch ops
per sequence per layer. Here every decode sequence (one query token) of the batch is served at once:
their pages are gathered and dequantized together into ``[B, S_max, H, D]``, masked past each length,
and attended with batched matmuls. Sequences with several query tokens (prefill, chunked prefill) are
few and long, so they keep the per-sequence path. The result equals the reference up to fp32 rounding.
"""
from __future__ import annotations

import math

import torch

from .page_format import PageLayout
from .reference import paged_attention_reference, read_cache_reference

MAX_GATHERED_VALUES = 1 << 22  # positions x KV heads x head_dim dequantized at once (bounds fp32 temporaries)


def _decode_chunk(query, cache, layout, block_table, seq_lens, sm_scale, sliding_window, softcap, kv_dtype):
    """``query`` ``[B, Hq, D]``, one token per sequence at position ``seq_lens - 1`` -> fp32 ``[B, Hq, D]``."""
    num_seqs, num_q_heads, head_dim = query.shape
    num_kv_heads = cache.shape[1]
    max_len = int(seq_lens.max())
    num_blocks = -(-max_len // layout.block_size)
    ids = block_table[:, :num_blocks].long()
    positions = torch.arange(num_blocks * layout.block_size)
    valid = positions[None, :] < seq_lens[:, None].long()  # [B, S]
    if sliding_window:
        valid &= positions[None, :] > seq_lens[:, None].long() - 1 - sliding_window
    used = valid.view(num_seqs, num_blocks, layout.block_size).any(-1)
    # entries past a sequence's end (or before its window) may hold anything: read its last block there
    last = ids.gather(1, ((seq_lens.long() - 1) // layout.block_size)[:, None])
    ids = torch.where(used, ids, last)
    k, v = read_cache_reference(cache, layout, ids.flatten(), kv_dtype)  # [B * S, H, D] fp32
    k = k.view(num_seqs, -1, num_kv_heads, head_dim)
    v = v.view(num_seqs, -1, num_kv_heads, head_dim).masked_fill(~valid[:, :, None, None], 0.0)
    q = query.float().view(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,bshd->bhgs", q, k) * sm_scale  # [B, Hkv, G, S]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))  # also hides unwritten NaN keys
    out = torch.einsum("bhgs,bshd->bhgd", scores.softmax(-1), v)  # values past a length are zero
    return out.reshape(num_seqs, num_q_heads, head_dim)


def paged_attention_torch(query: torch.Tensor, cache: torch.Tensor, layout: PageLayout,
                          block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                          sm_scale: float | None = None, sliding_window: int | None = None,
                          softcap: float | None = None, kv_dtype=None) -> torch.Tensor:
    """Same contract and result as ``paged_attention_reference`` (fp32 ``[T, Hq, D]``), batched."""
    kv_dtype = kv_dtype or query.dtype
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(query.shape[-1])
    num_seqs = seq_lens.shape[0]
    q_lens = query_start_loc[1:num_seqs + 1] - query_start_loc[:num_seqs]
    decode = torch.nonzero(q_lens == 1).flatten()
    out = torch.full(query.shape, float("nan"), dtype=torch.float32)
    if decode.numel():  # chunks of decode sequences, longest first so each chunk pads little
        decode = decode[seq_lens[decode].argsort(descending=True)]
        start = 0
        while start < decode.numel():
            per_seq = (-(-int(seq_lens[decode[start]]) // layout.block_size) * layout.block_size
                       * cache.shape[1] * layout.head_dim)
            chunk = decode[start:start + max(1, MAX_GATHERED_VALUES // per_seq)]
            rows = query_start_loc[chunk].long()
            out[rows] = _decode_chunk(query[rows], cache, layout, block_table[chunk], seq_lens[chunk],
                                      sm_scale, sliding_window, softcap, kv_dtype)
            start += chunk.numel()
    for s in torch.nonzero(q_lens > 1).flatten().tolist():  # prefill: the per-sequence path
        q0, q1 = int(query_start_loc[s]), int(query_start_loc[s + 1])
        one = torch.tensor([0, q1 - q0], dtype=query_start_loc.dtype)
        out[q0:q1] = paged_attention_reference(query[q0:q1], cache, layout, block_table[s:s + 1],
                                               seq_lens[s:s + 1], one, sm_scale, sliding_window, softcap,
                                               kv_dtype)
    return out
