"""Random paged caches and the callables the benchmark times (ours, SDPA), plus reference checks.

A ``Pool`` is one large cache tensor of random pages for a (shape, policy). Each benchmark point borrows
random, disjoint blocks from it (a shuffled block table, like a real allocator after some churn), and
``copies`` disjoint sets of them for L2 rotation. Data is random, never zeros: codes uniform over all
values, scale/zero so dequantized values are O(1), 16-bit planes standard normal.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from vllm_int4kv.kernels.attention import paged_attention
from vllm_int4kv.kernels.cache_write import write_kv_cache
from vllm_int4kv.kernels.page_format import PageLayout
from vllm_int4kv.kernels.reference import (error_ratio, paged_attention_reference, read_cache_reference,
                                           write_cache_reference)

from .config import ModelShape

FILL_CHUNK_BYTES = 1 << 30  # random data is generated a chunk of blocks at a time (bounded scratch)


def _fill_plane(region: torch.Tensor, bits: int, dtype: torch.dtype, gen: torch.Generator):
    if bits == 16:
        vals = torch.randn(region.numel() // 2, device=region.device, dtype=dtype, generator=gen)
        region.copy_(vals.view(torch.uint8).view(region.shape))
    else:
        region.copy_(torch.randint(0, 256, region.shape, dtype=torch.uint8, device=region.device,
                                   generator=gen))


def _fill_params(region: torch.Tensor, layout: PageLayout, gen: torch.Generator):
    """fp16 (scale, zero) per group: values span about [-1.5, 1.5] whatever the bit width."""
    shape = (*region.shape[:2], layout.block_size)
    pairs = []
    for bits, groups in ((layout.k_bits, layout.k_groups), (layout.v_bits, layout.v_groups)):
        if groups:
            u = torch.rand(*shape, groups, 2, device=region.device, generator=gen) + 0.5
            u[..., 0] *= 2.0 / (2 ** bits - 1)
            u[..., 1] *= -1.0
            pairs.append(u.flatten(-2))
    params = torch.cat(pairs, -1).to(torch.float16).contiguous()
    region.copy_(params.view(torch.uint8).reshape(region.shape))


def fill_random(cache: torch.Tensor, layout: PageLayout, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(cache.device).manual_seed(seed)
    n = layout.block_size
    step = max(1, FILL_CHUNK_BYTES // (cache.shape[1] * layout.run_bytes))
    for b0 in range(0, cache.shape[0], step):
        runs = cache[b0:b0 + step]
        _fill_plane(runs[..., :layout.v_plane_offset], layout.k_bits, dtype, gen)
        _fill_plane(runs[..., layout.v_plane_offset:layout.param_plane_offset], layout.v_bits, dtype, gen)
        if layout.param_row_bytes:
            _fill_params(runs[..., layout.param_plane_offset:n * layout.slot_bytes], layout, gen)


class Pool:
    """Random pages for one (shape, policy); hands out disjoint shuffled block sets."""

    def __init__(self, shape: ModelShape, layout: PageLayout, num_blocks: int, device, dtype, seed=0):
        self.shape, self.layout, self.dtype, self.device = shape, layout, dtype, device
        self.cache = torch.empty(num_blocks, shape.num_kv_heads, layout.run_bytes, dtype=torch.uint8,
                                 device=device)
        fill_random(self.cache, layout, dtype, seed)
        self.gen = torch.Generator(device).manual_seed(seed + 1)

    @property
    def num_blocks(self) -> int:
        return self.cache.shape[0]

    def tables(self, copies: int, num_seqs: int, blocks_per_seq: int) -> torch.Tensor:
        """``[copies, num_seqs, blocks_per_seq]`` int32, all entries distinct."""
        need = copies * num_seqs * blocks_per_seq
        perm = torch.randperm(self.num_blocks, device=self.device, generator=self.gen)[:need]
        return perm.view(copies, num_seqs, blocks_per_seq).to(torch.int32)


class AttentionCase:
    """``copies`` equivalent attention calls over disjoint pages: uniform ``new_tokens`` per sequence."""

    def __init__(self, pool: Pool, num_seqs: int, new_tokens: int, seq_len: int, copies: int,
                 num_splits: int | None = None):
        shape, dev = pool.shape, pool.device
        self.pool, self.seq_len, self.new_tokens, self.num_splits = pool, seq_len, new_tokens, num_splits
        self.tables = pool.tables(copies, num_seqs, math.ceil(seq_len / pool.layout.block_size))
        self.seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=dev) * new_tokens
        self.queries = [torch.randn(num_seqs * new_tokens, shape.num_q_heads, shape.head_dim,
                                    device=dev, dtype=pool.dtype) for _ in range(copies)]
        self.outs = [torch.empty_like(q) for q in self.queries]

    def fns(self, num_splits: int | None = None, num_warps: int = 4, num_stages: int | None = None,
            share_tiles: bool | None = None):
        splits = num_splits if num_splits is not None else self.num_splits
        for out in self.outs:  # a later check() must see what these calls wrote, not an earlier sweep's
            out.fill_(float("nan"))
        return [partial(paged_attention, q, self.pool.cache, self.pool.layout, table, self.seq_lens,
                        self.qsl, max_query_len=self.new_tokens, max_seq_len=self.seq_len, out=out,
                        num_splits=splits, num_warps=num_warps, num_stages=num_stages,
                        share_tiles=share_tiles)
                for q, table, out in zip(self.queries, self.tables, self.outs)]

    def check(self) -> float:
        """Error ratio of copy 0's last output (call it first) against the torch reference.

        The reference runs on a compact CPU copy of the pages copy 0 uses.
        """
        table = self.tables[0]
        used = table.flatten().long()
        compact = self.pool.cache[used].cpu()
        local = torch.arange(used.numel(), dtype=torch.int32).view(table.shape)
        ref = paged_attention_reference(self.queries[0].cpu(), compact, self.pool.layout, local,
                                        self.seq_lens.cpu(), self.qsl.cpu(), kv_dtype=self.pool.dtype)
        return error_ratio(self.outs[0].float().cpu(), ref)


class SdpaCase:
    """torch SDPA on contiguous ``[B, Hkv, S, D]`` K/V with ``enable_gqa`` (no expanded copies).

    Chunked prefill needs an explicit (bottom-right causal) mask, and with a mask torch's GQA support
    leaves only its slow math backend; there K/V are expanded to the query heads once, outside the timed
    call, so the memory-efficient backend runs (the fair baseline: what a user of SDPA would do).
    """

    def __init__(self, shape: ModelShape, num_seqs: int, new_tokens: int, seq_len: int, copies: int,
                 device, dtype):
        def rand(*size):
            return torch.randn(*size, device=device, dtype=dtype)
        kv = (num_seqs, shape.num_kv_heads, seq_len, shape.head_dim)
        self.inputs = [(rand(num_seqs, shape.num_q_heads, new_tokens, shape.head_dim), rand(*kv), rand(*kv))
                       for _ in range(copies)]
        self.mask = None  # decode (1 query sees all) or plain causal prefill need no explicit mask
        self.causal = new_tokens > 1 and new_tokens == seq_len
        self.gqa = True
        if 1 < new_tokens < seq_len:  # chunked prefill: bottom-right aligned causal mask
            q_pos = torch.arange(seq_len - new_tokens, seq_len, device=device)[:, None]
            self.mask = torch.arange(seq_len, device=device)[None, :] <= q_pos
            self.gqa = False
            self.inputs = [(q, k.repeat_interleave(shape.group, 1), v.repeat_interleave(shape.group, 1))
                           for q, k, v in self.inputs]

    def fns(self):
        return [partial(F.scaled_dot_product_attention, q, k, v, attn_mask=self.mask,
                        is_causal=self.causal, enable_gqa=self.gqa) for q, k, v in self.inputs]


class WriteCase:
    """Cache write of ``tokens`` rows into random distinct slots (rotating inputs and slots)."""

    def __init__(self, pool: Pool, tokens: int, copies: int):
        shape, dev = pool.shape, pool.device
        self.pool = pool
        bs = pool.layout.block_size
        blocks = pool.tables(1, 1, copies * math.ceil(tokens / bs)).flatten().long()
        slots = (blocks[:, None] * bs + torch.arange(bs, device=dev)).flatten()
        slots = slots[torch.randperm(slots.numel(), device=dev, generator=pool.gen)]
        self.slots = slots[:copies * tokens].view(copies, tokens)
        size = (tokens, shape.num_kv_heads, shape.head_dim)
        self.kv = [(torch.randn(size, device=dev, dtype=pool.dtype),
                    torch.randn(size, device=dev, dtype=pool.dtype)) for _ in range(copies)]

    def fns(self):
        return [partial(write_kv_cache, k, v, self.pool.cache, slots, self.pool.layout)
                for (k, v), slots in zip(self.kv, self.slots)]

    def check(self) -> float:
        """Error ratio of what copy 0's kernel write decodes to against the torch reference's write.

        0.0 under the interpreter; on a GPU a rare parameter or code can differ by one rounding step
        (fp32 division), so values are compared, not bytes. Call copy 0 first.
        """
        bs = self.pool.layout.block_size
        blocks = torch.unique(self.slots[0] // bs)
        got = self.pool.cache[blocks].cpu()
        expect = got.clone()
        local = {int(b): i for i, b in enumerate(blocks.tolist())}
        slots = torch.tensor([local[int(s) // bs] * bs + int(s) % bs for s in self.slots[0].tolist()])
        k, v = self.kv[0]
        write_cache_reference(expect, k.cpu(), v.cpu(), slots, self.pool.layout)
        ids = torch.arange(len(blocks))
        mine = read_cache_reference(got, self.pool.layout, ids, self.pool.dtype)
        ref = read_cache_reference(expect, self.pool.layout, ids, self.pool.dtype)
        return error_ratio(torch.cat([x[slots] for x in mine]), torch.cat([x[slots] for x in ref]))
