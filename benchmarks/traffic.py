"""Bytes and FLOPs each benchmarked operation must move/do, counted from the page layout and seq lens.

``bytes`` (the numerator of GB/s) counts what the operation cannot avoid moving through HBM once:
the KV rows of every token it attends to (K plane + V plane + scale/zero plane, exactly
``tokens * kv_heads * layout.slot_bytes``: the kernels load token rows and masked rows are not fetched),
the block-table entries, the query read and the output write. Split-KV partials are listed separately
(``partial_bytes``) and left out of GB/s: they are overhead of the schedule, not useful traffic.
"""
from __future__ import annotations

import math

from vllm_int4kv.kernels.attention import query_tokens_per_program
from vllm_int4kv.kernels.page_format import PageLayout

from .config import ModelShape

INDEX_BYTES = 4  # int32 block-table entries and seq lens


def _io_bytes(tokens: int, shape: ModelShape, elem_bytes: int) -> dict:
    per_token = shape.num_q_heads * shape.head_dim * elem_bytes
    return {"q": tokens * per_token, "out": tokens * per_token}


def decode_bytes(shape: ModelShape, layout: PageLayout, batch: int, context: int, num_splits: int,
                 elem_bytes: int = 2) -> dict:
    """One decode step (one query token per sequence) of ``batch`` sequences of ``context`` tokens."""
    h = shape.num_kv_heads
    parts = {
        "k_plane": batch * context * h * layout.k_row_bytes,
        "v_plane": batch * context * h * layout.v_row_bytes,
        "params": batch * context * h * layout.param_row_bytes,
        "block_table": batch * math.ceil(context / layout.block_size) * INDEX_BYTES,
        "seq_meta": batch * 2 * INDEX_BYTES,  # seq_lens + query_start_loc
        **_io_bytes(batch, shape, elem_bytes),
    }
    partial = 0
    if num_splits > 1:  # fp32 (acc[D], max, sum) written by the split kernel and read by the reduce
        partial = 2 * batch * shape.num_q_heads * num_splits * (shape.head_dim + 2) * 4
    return {"bytes": sum(parts.values()), "breakdown": parts, "partial_bytes": partial,
            "flops": 4 * batch * shape.num_q_heads * context * shape.head_dim}


def prefill_block_q(shape: ModelShape, max_query_len: int) -> int:
    """Query tokens per program: the launcher's own choice (it sets which KV rows tiles re-read)."""
    return query_tokens_per_program(1 << (shape.group - 1).bit_length(), max_query_len)


def prefill_bytes(shape: ModelShape, layout: PageLayout, num_seqs: int, new_tokens: int, context: int,
                  elem_bytes: int = 2) -> dict:
    """``new_tokens`` causal queries per sequence over ``context`` cached tokens plus themselves.

    ``bytes`` counts every KV row once (unique); ``kv_streamed_bytes`` is what the query tiles request
    (tile i of BLOCK_Q tokens reads rows [0, context + (i + 1) * BLOCK_Q)), mostly served from L2.
    Prefill is compute-bound: read its FLOP/s, not its GB/s.
    """
    total = context + new_tokens
    h = shape.num_kv_heads
    kv_unique = num_seqs * total * h * layout.slot_bytes
    bq = prefill_block_q(shape, new_tokens)
    rows = sum(context + min((i + 1) * bq, new_tokens) for i in range(math.ceil(new_tokens / bq)))
    parts = {"kv_rows": kv_unique,
             "block_table": num_seqs * math.ceil(total / layout.block_size) * INDEX_BYTES,
             **_io_bytes(num_seqs * new_tokens, shape, elem_bytes)}
    pairs = num_seqs * (new_tokens * context + new_tokens * (new_tokens + 1) // 2)  # visible (q, k)
    return {"bytes": sum(parts.values()), "breakdown": parts,
            "kv_streamed_bytes": num_seqs * rows * h * layout.slot_bytes,
            "flops": 4 * shape.num_q_heads * shape.head_dim * pairs}


def write_bytes(shape: ModelShape, layout: PageLayout, tokens: int, elem_bytes: int = 2) -> dict:
    """Cache write of ``tokens`` new K/V rows: read K and V, read the slot mapping, write the slots."""
    h, d = shape.num_kv_heads, shape.head_dim
    parts = {"kv_in": 2 * tokens * h * d * elem_bytes, "slot_mapping": tokens * 8,
             "slots_out": tokens * h * layout.slot_bytes}
    return {"bytes": sum(parts.values()), "breakdown": parts}


def sdpa_bytes(shape: ModelShape, batch: int, context: int, new_tokens: int = 1,
               elem_bytes: int = 2) -> dict:
    """torch SDPA over contiguous K/V ``[batch, kv_heads, context, D]`` in the model dtype."""
    kv = 2 * batch * shape.num_kv_heads * context * shape.head_dim * elem_bytes
    parts = {"kv": kv, **_io_bytes(batch * new_tokens, shape, elem_bytes)}
    pairs = batch * (new_tokens * (context - new_tokens) + new_tokens * (new_tokens + 1) // 2)
    return {"bytes": sum(parts.values()), "breakdown": parts,
            "flops": 4 * shape.num_q_heads * shape.head_dim * pairs}


def cache_bytes(shape: ModelShape, layout: PageLayout, num_seqs: int, context: int) -> int:
    """Device bytes of the pages ``num_seqs`` sequences of ``context`` tokens occupy (whole blocks)."""
    blocks = num_seqs * math.ceil(context / layout.block_size)
    return blocks * shape.num_kv_heads * layout.run_bytes
