"""The vLLM-free half of the attention backend: batch metadata, and the cache-write and attention steps
the backend's impl calls.

Keeping this module free of vLLM imports lets it be unit-tested (and read) without an engine; the
backend module only translates vLLM's objects into these calls.

Shapes: ``query`` ``[T, Hq, D]``; ``key``/``value`` ``[T, Hkv, D]``; the layer's cache as vLLM hands it
over is ``[num_blocks, Hkv, block_size, C]`` in the spec's dtype, where ``C * itemsize`` is the policy's
``slot_bytes`` (see ``kernels/page_format.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import envs
from .kernels.page_format import PageLayout
from .kernels.planes import as_runs
from .kernels.reference import write_cache_reference
from .kernels.torch_attention import paged_attention_torch
from .kernels.rotation import rotate, unrotate
from .policy import KVPolicy

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Int4KVMetadata:
    """One batch, shared by every layer of a KV-cache group.

    Query rows of sequence ``s`` are ``query_start_loc[s]:query_start_loc[s+1]``; they are the last
    tokens of its ``seq_lens[s]`` tokens, whose blocks are ``block_table[s]``. ``max_query_len`` and
    ``max_seq_len`` are host integers (upper bounds), so launchers never read device memory.
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, < 0 = padding


def default_impl() -> str:
    """``VLLM_INT4KV_IMPL``; Triton kernels on CUDA, the torch implementation elsewhere."""
    return envs.impl_name("triton" if torch.cuda.is_available() else "torch")


def describe(policy: KVPolicy, layout: PageLayout, num_kv_heads: int, model_dtype: torch.dtype,
             source: str | None = None) -> str:
    """The start-up line: policy, bytes per token per layer, capacity gain against a BF16 cache, and
    where the policy came from (``source``)."""
    line = (f"vllm-int4kv: KV policy {policy.name}, {layout.slot_bytes * num_kv_heads} bytes/token/layer "
            f"({num_kv_heads} KV heads x {layout.slot_bytes} B, head_dim {layout.head_dim}), "
            f"{layout.compression_vs(2):.2f}x the tokens of a BF16 cache")
    if model_dtype.itemsize != 2:  # fp32 models: also say how this compares with their own cache
        dtype_name = str(model_dtype).removeprefix("torch.")
        line += f", {layout.compression_vs(model_dtype.itemsize):.2f}x the tokens of a {dtype_name} cache"
    if source:
        line += f" (from {source})"
    return line


# -- the per-layer steps ---------------------------------------------------------------------------
def policy_layout(policy: KVPolicy, head_dim: int, kv_cache: torch.Tensor,
                  model_dtype: torch.dtype) -> PageLayout:
    """The page layout of a layer's cache view ``[num_blocks, H, block_size, C]``, checked against it."""
    if model_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"vllm-int4kv supports fp16, bf16 and fp32 models, not {model_dtype}")
    elem_bytes = model_dtype.itemsize
    layout = policy.layout(head_dim, kv_cache.shape[2], elem_bytes)
    row_bytes = kv_cache.shape[3] * kv_cache.element_size()
    if row_bytes != layout.slot_bytes:
        raise RuntimeError(f"the KV cache holds {row_bytes} bytes per token and head, but policy "
                           f"{policy.name} needs {layout.slot_bytes}: were the pages allocated by another "
                           "backend or policy? (every process must see the same VLLM_INT4KV_POLICY)")
    return layout


def cache_runs(kv_cache: torch.Tensor, layout: PageLayout) -> torch.Tensor:
    """A layer's cache as the kernels take it: uint8 ``[num_blocks, H, block_size * slot_bytes]``."""
    return as_runs(kv_cache.view(torch.uint8), layout)


def write_kv(key: torch.Tensor, value: torch.Tensor, runs: torch.Tensor, slot_mapping: torch.Tensor,
             layout: PageLayout, *, impl: str, rotated: bool) -> None:
    """Quantize ``key``/``value`` ``[T, Hkv, D]`` into their slots (``slot_mapping[T]``, < 0 skipped)."""
    num_tokens = slot_mapping.shape[0]
    key, value = key[:num_tokens], value[:num_tokens]
    if rotated:  # the cache stores K·H and V·H
        key, value = rotate(key), rotate(value)
    if impl == "triton":
        from .kernels.cache_write import write_kv_cache

        write_kv_cache(key, value, runs, slot_mapping, layout)
    else:
        write_cache_reference(runs, key, value, slot_mapping, layout)


def attend(query: torch.Tensor, runs: torch.Tensor, layout: PageLayout, meta: Int4KVMetadata,
           out: torch.Tensor, *, impl: str, rotated: bool, sm_scale: float,
           sliding_window: int | None, softcap: float | None,
           sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Causal paged attention of ``query[:num_actual_tokens]`` into ``out`` ``[T, Hq, D]``; ``sinks``: fp32
    ``[Hq]`` logits with no value (gpt-oss); ``alibi_slopes``: fp32 ``[Hq]`` ALiBi slopes (Bloom, Falcon)."""
    n = meta.num_actual_tokens
    q = query[:n]
    if rotated:  # (qH)·(kH) = q·k
        q = rotate(q)
    if impl == "triton":
        from .kernels.attention import paged_attention

        result = paged_attention(q, runs, layout, meta.block_table, meta.seq_lens, meta.query_start_loc,
                                 max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
                                 sm_scale=sm_scale, sliding_window=sliding_window, softcap=softcap,
                                 out=None if rotated else out[:n], sinks=sinks, alibi_slopes=alibi_slopes)
    else:
        result = paged_attention_torch(q, runs, layout, meta.block_table, meta.seq_lens, meta.query_start_loc,
                                       sm_scale, sliding_window, softcap, kv_dtype=query.dtype, sinks=sinks,
                                       alibi_slopes=alibi_slopes)
    if rotated:  # sum p·(vH) = (sum p·v)·H, and H is its own inverse
        result = unrotate(result.float())
    if result.data_ptr() != out.data_ptr():
        out[:n].copy_(result[:n])
    return out
