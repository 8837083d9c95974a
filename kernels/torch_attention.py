"""Paged attention over the quantized cache in batched torch ops: the CPU serving path.

The reference (``reference.paged_attention_reference``) walks the batch one sequence at a time and
dequantizes every row, which is what makes it obvious, and slow to serve with. Here every decode sequence
(one query token) of the batch is served at once: their pages are gathered together, padded to the
longest, masked past each length, and attended with batched matmuls on the stored codes. A (scale, zero)
per row is applied where it costs least: ``q.(s*c + z) = s*(q.c) + z*sum(q)`` on the scores and
``sum p*(s*c + z) = sum (p*s)*c + sum p*z`` on the probabilities, so no dequantized copy of the context
is built; per-group key parameters are applied to the codes. Channels stay as even/odd halves (the two
nibbles of a byte), as in the Triton kernel. Sequences with several query tokens (prefill) are few and
long, so they keep the per-sequence reference. The result equals the reference up to fp32 rounding
(~1e-5 relative: the score-side form rounds in another order).
"""
from __future__ import annotations

import math

import torch

from .page_format import PageLayout
from .reference import _run_views, paged_attention_reference

MAX_GATHERED_VALUES = 1 << 22  # positions x KV heads x head_dim gathered at once (bounds fp32 temporaries)


def _halves(rows: torch.Tensor, bits: int, kv_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Plane rows ``[B, H, S, row_bytes]`` -> even and odd channels ``[B, H, S, D/2]`` (fp32): the codes,
    or the values at 16 bits."""
    if bits == 4:
        return (rows & 0xF).float(), (rows >> 4).float()
    values = rows.contiguous().view(kv_dtype).float() if bits == 16 else rows.float()
    return values[..., 0::2], values[..., 1::2]


def _dequantize_groups(even, odd, params, group: int):
    """Apply per-group ``params`` ``[B, H, S, 2 * groups]`` to the halves (channels 2j, 2j+1 share a group)."""
    scale, zero = (params[..., i::2].repeat_interleave(group // 2, -1) for i in (0, 1))
    return even * scale + zero, odd * scale + zero


def _decode_chunk(query, cache, layout, block_table, seq_lens, sm_scale, sliding_window, softcap, kv_dtype):
    """``query`` ``[B, Hq, D]``, one token per sequence at position ``seq_lens - 1`` -> fp32 ``[B, Hq, D]``."""
    num_seqs, num_q_heads, head_dim = query.shape
    num_kv_heads, n = cache.shape[1], layout.block_size
    num_blocks = -(-int(seq_lens.max()) // n)
    ids = block_table[:, :num_blocks].long()
    positions = torch.arange(num_blocks * n)
    valid = positions[None, :] < seq_lens[:, None].long()  # [B, S]
    if sliding_window:
        valid &= positions[None, :] > seq_lens[:, None].long() - 1 - sliding_window
    used = valid.view(num_seqs, num_blocks, n).any(-1)
    # entries past a sequence's end (or before its window) may hold anything: read its last block there
    last = ids.gather(1, ((seq_lens.long() - 1) // n)[:, None])
    ids = torch.where(used, ids, last)

    def by_sequence(plane):  # [B * blocks, H, N, row] -> [B, H, S, row]
        return plane.view(num_seqs, num_blocks, num_kv_heads, n, -1).transpose(1, 2).flatten(2, 3)

    k_rows, v_rows, p_rows = (by_sequence(x) for x in _run_views(cache[ids.flatten()], layout))
    params = p_rows.contiguous().view(torch.float16).float() if layout.param_row_bytes else None
    nk = 2 * layout.k_groups
    q = query.float().view(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [B, H, G, D]

    k_even, k_odd = _halves(k_rows, layout.k_bits, kv_dtype)
    if layout.k_bits != 16 and layout.k_groups > 1:
        k_even, k_odd = _dequantize_groups(k_even, k_odd, params[..., :nk], layout.k_group)
    scores = (torch.einsum("bhgd,bhsd->bhgs", q[..., 0::2], k_even)
              + torch.einsum("bhgd,bhsd->bhgs", q[..., 1::2], k_odd))  # [B, H, G, S]
    if layout.k_bits != 16 and layout.k_groups == 1:  # q.(s*c + z) = s*(q.c) + z*sum(q)
        scores = scores * params[..., None, :, 0] + q.sum(-1, keepdim=True) * params[..., None, :, 1]
    scores = scores * sm_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    invalid = ~valid[:, None, :]  # [B, 1, S]
    probs = scores.masked_fill(invalid[:, :, None, :], float("-inf")).softmax(-1)  # hides NaN keys too

    v_even, v_odd = _halves(v_rows, layout.v_bits, kv_dtype)
    offset = 0.0
    if layout.v_bits == 16 or layout.v_groups > 1:
        if layout.v_bits != 16:
            v_even, v_odd = _dequantize_groups(v_even, v_odd, params[..., nk:], layout.v_group)
        v_even, v_odd = (x.masked_fill(invalid[..., None], 0.0) for x in (v_even, v_odd))  # unwritten NaN
    else:  # sum p*(s*c + z) = sum (p*s)*c + sum p*z; zeroed parameters past a length hide unwritten NaN
        v_scale, v_zero = (params[..., nk + i].masked_fill(invalid, 0.0)[:, :, None, :] for i in (0, 1))
        offset = (probs * v_zero).sum(-1, keepdim=True)
        probs = probs * v_scale
    out_even = torch.einsum("bhgs,bhsd->bhgd", probs, v_even) + offset
    out_odd = torch.einsum("bhgs,bhsd->bhgd", probs, v_odd) + offset
    return torch.stack((out_even, out_odd), -1).reshape(num_seqs, num_q_heads, head_dim)


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
