"""Builders shared by the kernel tests: poisoned caches, random block tables, error ratios."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_int4kv.kernels.page_format import PageLayout
from vllm_int4kv.kernels.reference import write_cache_reference

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
              k_group=None, v_group=None, dtype=torch.float32, extra_blocks=7, seed=0, kv_scale=1.0) -> PagedCase:
    """Random sequences whose pages are scattered over a poisoned cache (non-contiguous tables)."""
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
    write_cache_reference(cache, key, value, slot_mapping, layout)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return PagedCase(layout, cache, key, value, query, table, torch.tensor(seq_lens, dtype=torch.int32),
                     qsl, slot_mapping)


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
