"""Paged attention over the quantized cache in batched torch ops: the CPU serving path.

The reference (``reference.paged_attention_reference``) walks the batch one sequence at a time and
dequantizes every row, which is what makes it obvious, and slow to serve with. Here every decode sequence
(one query token) of the batch is served at once: their pages are gathered together, padded to the
longest, masked past each length, and attended with batched matmuls on the stored codes. A (scale, zero)
per row is applied where it costs least: ``q.(s*c + z) = s*(q.c) + z*sum(q)`` on the scores and
``sum p*(s*c + z) = sum (p*s)*c + sum p*z`` on the probabilities, so no dequantized copy of the context
is built; per-group parameters are applied to the codes. A 4-bit plane is read as all even channels
then all odd ones (the two nibbles of a byte, split as in the Triton kernel); the query is put in that
order and the output back. The gathered pages and their fp32 copies live in reused scratch buffers.
Sequences with several query tokens (prefill) are few and long: each is dequantized once and attended
by torch's SDPA (its CPU flash kernel never builds the ``[heads, queries, context]`` scores, which the
reference does: gigabytes at a few thousand tokens), a bounded number of query rows at a time. The result
equals the reference up to fp32 rounding (~1e-5 relative: the score-side form rounds in another order).
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from .block_checks import check_block_table, check_index_tensors, checks_blocks
from .page_format import PageLayout
from .reference import _run_views, read_cache_reference

MAX_GATHERED_VALUES = 1 << 22  # positions x KV heads x head_dim gathered at once (bounds the scratch)
PREFILL_ROWS = 256  # query rows per prefill step (see _prefill_sequence)
MAX_PREFILL_SCORES = 1 << 24  # query heads x query rows x context per prefill step (bounds the mask and
#                               any fallback that builds the scores: softcap, sinks, ALiBi or SDPA's math
#                               kernel)


class _Scratch(threading.local):
    """Buffers reused from call to call, one per role, grown to the largest chunk seen.

    A fresh multi-megabyte tensor comes from new pages on every call, and faulting them in cost ~20x the
    copy that fills them (0.9 vs 0.045 ms for 5 MB on the 2-core VM): it was most of this path's time.
    A chunk holds at most ``MAX_GATHERED_VALUES`` values (16 MiB in fp32, their pages at most twice that),
    so buffers up to ``KEEP_BYTES`` are kept; a single sequence longer than a chunk gets fresh tensors,
    freed after the call, rather than pinning its size for the life of the process.
    """

    KEEP_BYTES = 64 << 20

    def __init__(self):
        self.buffers: dict[tuple[str, bool], torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        if numel * dtype.itemsize > self.KEEP_BYTES:
            return torch.empty(shape, dtype=dtype)
        # a buffer made under torch.inference_mode (as vLLM runs) cannot be written outside it: one each
        key = (role, torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.buffers[key] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


_scratch = _Scratch()


def _copy_positions(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst`` ``[B, H, S, C]`` <- the first ``S`` positions of ``src`` ``[B, H, blocks, N, C]``: whole
    blocks in one copy, the part of the last one that holds positions below ``S`` in another."""
    span, n = dst.shape[2], src.shape[3]
    full = span // n
    if full:
        dst[:, :, :full * n].unflatten(2, (full, n)).copy_(src[:, :, :full])
    if span % n:
        dst[:, :, full * n:].copy_(src[:, :, full, :span % n])


def _plane_values(rows: torch.Tensor, nibbles, bits: int, kv_dtype, role: str, span: int) -> torch.Tensor:
    """A plane ``[B, H, blocks, N, row_bytes]`` (strided view of the gathered pages) -> fp32
    ``[B, H, span, D]`` in scratch, its first ``span`` positions: the codes, or the values at 16 bits.

    4-bit planes come from ``nibbles`` (the same plane of the low and high nibbles) and come out as all
    even channels then all odd ones; 8- and 16-bit planes keep the model's channel order. Laying out and
    converting to fp32 happen in one copy.
    """
    b, h, blocks, n, row = rows.shape
    if bits == 16:
        rows = rows.view(kv_dtype)
    head_dim = 2 * row if bits == 4 else rows.shape[-1]
    out = _scratch.get(role, (b, h, span, head_dim))
    if bits == 4:
        _copy_positions(out[..., :row], nibbles[0])
        _copy_positions(out[..., row:], nibbles[1])
    else:
        _copy_positions(out, rows)
    return out


def _to_plane_order(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Channels ``[..., D]`` in a plane's order (see ``_plane_values``)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), -1) if bits == 4 else x


def _from_plane_order(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits != 4:
        return x
    half = x.shape[-1] // 2
    return torch.stack((x[..., :half], x[..., half:]), -1).flatten(-2)


def _apply_group_params(x: torch.Tensor, params: torch.Tensor, group: int, bits: int) -> None:
    """Codes ``x`` ``[B, H, S, D]`` (plane order) -> ``codes * scale + zero`` in place, from per-group
    ``params`` ``[B, H, S, 2 * groups]``. In plane order a 4-bit group is split over the two halves."""
    halves = 2 if bits == 4 else 1
    grouped = x.unflatten(-1, (halves, -1, group // halves))
    grouped.mul_(params[..., None, 0::2, None]).add_(params[..., None, 1::2, None])


def _sink_factor(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """What softmax probabilities shrink by when a sink logit joins each row (``sinks`` broadcasts over
    ``scores`` without its last dimension): ``sum e^s / (sum e^s + e^sink) = sigmoid(lse(s) - sink)``."""
    return torch.sigmoid(torch.logsumexp(scores, -1, keepdim=True) - sinks)


def _decode_chunk(query, cache, layout, block_table, seq_lens, sm_scale, sliding_window, softcap, kv_dtype,
                  sinks=None, alibi_slopes=None):
    """``query`` ``[B, Hq, D]``, one token per sequence at position ``seq_lens - 1`` -> fp32 ``[B, Hq, D]``."""
    num_seqs, num_q_heads, head_dim = query.shape
    num_kv_heads, n = cache.shape[1], layout.block_size
    # Only the first `span` positions are converted and attended: vLLM's CPU blocks hold 128 tokens, so
    # short contexts would otherwise spend most of the step on padding.
    span = int(seq_lens.max())
    num_blocks = -(-span // n)
    ids = block_table[:, :num_blocks].long()
    positions = torch.arange(num_blocks * n)
    valid = positions[None, :] < seq_lens[:, None].long()  # [B, blocks * N]
    if sliding_window:
        valid &= positions[None, :] > seq_lens[:, None].long() - 1 - sliding_window
    used = valid.view(num_seqs, num_blocks, n).any(-1)
    positions, valid = positions[:span], valid[:, :span]  # [S], [B, S]
    # entries past a sequence's end (or before its window) may hold anything: read its last block there
    last = ids.gather(1, ((seq_lens.long() - 1) // n)[:, None])
    ids = torch.where(used, ids, last).flatten()

    pages = torch.index_select(cache, 0, ids, out=_scratch.get("pages", (ids.numel(), *cache.shape[1:]),
                                                                cache.dtype))

    def planes(buf):  # [B * blocks, H, run] -> K, V, params planes [B, H, blocks, N, row] (views)
        return [x.view(num_seqs, num_blocks, num_kv_heads, n, -1).transpose(1, 2)
                for x in _run_views(buf, layout)]

    k_rows, v_rows, p_rows = planes(pages)
    low = high = [None, None]
    if 4 in (layout.k_bits, layout.v_bits):  # bit ops run ~5x faster on the contiguous pages than strided
        low = planes(torch.bitwise_and(pages, 0xF, out=_scratch.get("low", pages.shape, pages.dtype)))
        high = planes(torch.bitwise_right_shift(pages, 4, out=_scratch.get("high", pages.shape, pages.dtype)))
    params = None
    if layout.param_row_bytes:  # [B, H, S, 2 * (k_groups + v_groups)]
        param_bytes = _scratch.get("params", (num_seqs, num_kv_heads, span, p_rows.shape[-1]), torch.uint8)
        _copy_positions(param_bytes, p_rows)
        params = param_bytes.view(torch.float16).float()
    nk = 2 * layout.k_groups
    q = query.float().view(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [B, H, G, D]

    k = _plane_values(k_rows, (low[0], high[0]), layout.k_bits, kv_dtype, "k", span)  # [B, H, S, D]
    if layout.k_bits != 16 and layout.k_groups > 1:
        _apply_group_params(k, params[..., :nk], layout.k_group, layout.k_bits)
    scores = torch.matmul(_to_plane_order(q, layout.k_bits), k.transpose(-1, -2))  # [B, H, G, S]
    if layout.k_bits != 16 and layout.k_groups == 1:  # q.(s*c + z) = s*(q.c) + z*sum(q)
        scores = scores * params[..., None, :, 0] + q.sum(-1, keepdim=True) * params[..., None, :, 1]
    scores = scores * sm_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:  # slope * (key position - query position), the query at seq_lens - 1
        distance = positions[None, :] - (seq_lens.long() - 1)[:, None]  # [B, S]
        scores = scores + alibi_slopes.float().view(1, num_kv_heads, -1, 1) * distance[:, None, None, :]
    invalid = ~valid[:, None, :]  # [B, 1, S]
    scores = scores.masked_fill(invalid[:, :, None, :], float("-inf"))
    probs = scores.softmax(-1)  # hides NaN keys too
    if sinks is not None:
        probs *= _sink_factor(scores, sinks.float().view(1, num_kv_heads, -1, 1))

    v = _plane_values(v_rows, (low[1], high[1]), layout.v_bits, kv_dtype, "v", span)
    offset = 0.0
    if layout.v_bits == 16 or layout.v_groups > 1:
        if layout.v_bits != 16:
            _apply_group_params(v, params[..., nk:], layout.v_group, layout.v_bits)
        v.masked_fill_(invalid[..., None], 0.0)  # unwritten slots may hold NaN
    else:  # sum p*(s*c + z) = sum (p*s)*c + sum p*z; zeroed parameters past a length hide unwritten NaN
        v_scale, v_zero = (params[..., nk + i].masked_fill(invalid, 0.0)[:, :, None, :] for i in (0, 1))
        offset = (probs * v_zero).sum(-1, keepdim=True)
        probs = probs * v_scale
    out = torch.matmul(probs, v) + offset  # [B, H, G, D], channels in the V plane's order
    return _from_plane_order(out, layout.v_bits).reshape(num_seqs, num_q_heads, head_dim)


def _prefill_sequence(query, cache, layout, block_row, seq_len: int, sm_scale, sliding_window, softcap,
                      kv_dtype, sinks=None, alibi_slopes=None) -> torch.Tensor:
    """One sequence's query rows ``[T, Hq, D]`` (its last ``T`` tokens) over its ``seq_len`` tokens."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, bs = cache.shape[1], layout.block_size
    first = 0  # blocks wholly before every row's window are not read (vLLM may point them anywhere)
    if sliding_window:
        first = max(0, seq_len - num_tokens - sliding_window + 1) // bs * bs
    k, v = read_cache_reference(cache, layout, block_row[first // bs: -(-seq_len // bs)], kv_dtype)
    k, v = (x[:seq_len - first].transpose(0, 1)[None] for x in (k, v))  # [1, Hkv, S, D]
    q = query.float().transpose(0, 1)[None]  # [1, Hq, T, D]: SDPA's flash kernel wants 4-D inputs
    out = torch.empty(1, num_q_heads, num_tokens, head_dim)
    key_pos = torch.arange(first, seq_len)
    # Rows in steps of at most PREFILL_ROWS, each over the keys its rows can see: causal work is then
    # about halved (SDPA's mask does not skip the hidden half; measured 40 vs 72 ms at 2048 rows).
    keys_per_step = key_pos.numel()  # with a window, a step's rows see at most rows + window - 1 keys
    if sliding_window:
        keys_per_step = min(keys_per_step, PREFILL_ROWS + sliding_window)
    rows = max(1, min(PREFILL_ROWS, MAX_PREFILL_SCORES // (num_q_heads * keys_per_step)))
    for t0 in range(0, num_tokens, rows):
        t1 = min(num_tokens, t0 + rows)
        q_pos = torch.arange(seq_len - num_tokens + t0, seq_len - num_tokens + t1)[:, None]
        lo = max(0, int(q_pos[0]) - sliding_window + 1 - first) if sliding_window else 0
        hi = int(q_pos[-1]) + 1 - first
        keys, values, pos = k[:, :, lo:hi], v[:, :, lo:hi], key_pos[lo:hi]
        visible = pos <= q_pos  # [t, keys]
        if sliding_window:
            visible &= pos > q_pos - sliding_window
        if not softcap and sinks is None and alibi_slopes is None:
            out[:, :, t0:t1] = F.scaled_dot_product_attention(q[:, :, t0:t1], keys, values, attn_mask=visible,
                                                              scale=sm_scale, enable_gqa=True)
            continue
        grouped = q[0, :, t0:t1].unflatten(0, (num_kv_heads, -1))  # [Hkv, G, t, D]
        scores = torch.matmul(grouped, keys[0, :, None].transpose(-1, -2)) * sm_scale  # [Hkv, G, t, keys]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if alibi_slopes is not None:
            scores += alibi_slopes.float().view(num_kv_heads, -1, 1, 1) * (pos - q_pos)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.softmax(-1)
        if sinks is not None:
            probs *= _sink_factor(scores, sinks.float().view(num_kv_heads, -1, 1, 1))
        out[0, :, t0:t1] = torch.matmul(probs, values[0, :, None]).flatten(0, 1)
    return out[0].transpose(0, 1)


def _values_per_seq(longest: int, cache: torch.Tensor, layout: PageLayout) -> int:
    """Values gathered per sequence of a chunk whose longest sequence has ``longest`` tokens."""
    return -(-longest // layout.block_size) * layout.block_size * cache.shape[1] * layout.head_dim


def _fits_one_chunk(seq_lens: torch.Tensor, cache: torch.Tensor, layout: PageLayout) -> bool:
    if seq_lens.numel() == 0:
        return False
    return seq_lens.numel() * _values_per_seq(int(seq_lens.max()), cache, layout) <= MAX_GATHERED_VALUES


def paged_attention_torch(query: torch.Tensor, cache: torch.Tensor, layout: PageLayout,
                          block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                          sm_scale: float | None = None, sliding_window: int | None = None,
                          softcap: float | None = None, kv_dtype=None,
                          sinks: torch.Tensor | None = None,
                          alibi_slopes: torch.Tensor | None = None,
                          validate_blocks: bool | None = None) -> torch.Tensor:
    """Same contract and result as ``paged_attention_reference`` (fp32 ``[T, Hq, D]``), batched.

    The block ids it reads, lengths and query offsets are checked as in ``attention.paged_attention``
    (``block_checks``: always on CPU, where this path serves)."""
    if query.dim() != 3 or query.shape[-1] != layout.head_dim:
        raise ValueError(f"query must be [tokens, heads, {layout.head_dim}], got {tuple(query.shape)}")
    check_index_tensors(block_table, seq_lens, query_start_loc, query.device, layout.block_size)
    if checks_blocks(query.device, validate_blocks):
        check_block_table(block_table, seq_lens, query_start_loc, num_blocks=cache.shape[0],
                          block_size=layout.block_size, num_tokens=query.shape[0],
                          sliding_window=sliding_window)
    kv_dtype = kv_dtype or query.dtype
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(query.shape[-1])
    num_seqs = seq_lens.shape[0]
    q_lens = query_start_loc[1:num_seqs + 1] - query_start_loc[:num_seqs]
    if query.shape[0] == num_seqs and bool((q_lens == 1).all()) and _fits_one_chunk(seq_lens, cache, layout):
        # the common decode step: rows are the sequences in order, no sorting or scattering needed
        return _decode_chunk(query, cache, layout, block_table, seq_lens, sm_scale, sliding_window, softcap,
                             kv_dtype, sinks, alibi_slopes)
    decode = torch.nonzero(q_lens == 1).flatten()
    out = torch.full(query.shape, float("nan"), dtype=torch.float32)
    if decode.numel():  # chunks of decode sequences, longest first so each chunk pads little
        decode = decode[seq_lens[decode].argsort(descending=True)]
        start = 0
        while start < decode.numel():
            per_seq = _values_per_seq(int(seq_lens[decode[start]]), cache, layout)
            chunk = decode[start:start + max(1, MAX_GATHERED_VALUES // per_seq)]
            rows = query_start_loc[chunk].long()
            out[rows] = _decode_chunk(query[rows], cache, layout, block_table[chunk], seq_lens[chunk],
                                      sm_scale, sliding_window, softcap, kv_dtype, sinks, alibi_slopes)
            start += chunk.numel()
    for s in torch.nonzero(q_lens > 1).flatten().tolist():  # prefill: one sequence at a time
        q0, q1 = int(query_start_loc[s]), int(query_start_loc[s + 1])
        out[q0:q1] = _prefill_sequence(query[q0:q1], cache, layout, block_table[s], int(seq_lens[s]),
                                       sm_scale, sliding_window, softcap, kv_dtype, sinks, alibi_slopes)
    return out
