"""vLLM's Triton unified attention (bf16, fp8, int4_per_token_head) as a same-run baseline, if importable.

Called the way vLLM's Triton backend calls it for decode: caches ``[blocks, block_size, kv_heads, D]``
(INT4: ``D // 2`` packed bytes plus fp32 per-(token, head) scales), a 3D (split-softmax) launch for
batches below ``128 // kv_heads`` sequences with 16 segments. Data is random; only time is read.
"""
from __future__ import annotations

import math
from functools import partial

import torch

MODES = ("bf16", "fp8", "int4_per_token_head")
MIN_GRID_2D = 128  # vLLM's threshold: fewer sequences than 128 // kv_heads take the 3D launch
SEGMENTS = 16


def availability(device: torch.device) -> str | None:
    """None when the kernels can be used, else the reason recorded in the results."""
    if device.type != "cuda":
        return "not measured: no CUDA device (vLLM's Triton kernels need a GPU)"
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention  # noqa: F401
        from vllm.v1.kv_cache_interface import KVQuantMode  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: not measured
        return f"not measured: vllm not importable ({type(exc).__name__}: {exc})"[:300]
    return None


def decode_fns(mode: str, shape, batch: int, context: int, copies: int, device, dtype,
               block_size: int = 16):
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    h, d = shape.num_kv_heads, shape.head_dim
    bps = math.ceil(context / block_size)
    nb = copies * batch * bps
    if mode == "int4_per_token_head":
        k = torch.randint(0, 256, (nb, block_size, h, d // 2), dtype=torch.uint8, device=device)
        v = torch.randint(0, 256, (nb, block_size, h, d // 2), dtype=torch.uint8, device=device)
    else:
        k = torch.randn(nb, block_size, h, d, device=device, dtype=dtype)
        v = torch.randn(nb, block_size, h, d, device=device, dtype=dtype)
        if mode == "fp8":
            k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    extra = {}
    if mode == "int4_per_token_head":
        extra = {"kv_quant_mode": KVQuantMode.INT4_PER_TOKEN_HEAD,
                 "k_scale_cache": torch.rand(nb, block_size, h, device=device) * 0.1 + 0.05,
                 "v_scale_cache": torch.rand(nb, block_size, h, device=device) * 0.1 + 0.05}
    tables = torch.randperm(nb, device=device).view(copies, batch, bps).to(torch.int32)
    threshold = MIN_GRID_2D // h
    rows = max(threshold, batch)
    segm = {"seq_threshold_3D": threshold, "num_par_softmax_segments": SEGMENTS,
            "softmax_segm_output": torch.empty(rows, shape.num_q_heads, SEGMENTS,
                                               1 << (d - 1).bit_length(), device=device),
            "softmax_segm_max": torch.empty(rows, shape.num_q_heads, SEGMENTS, device=device),
            "softmax_segm_expsum": torch.empty(rows, shape.num_q_heads, SEGMENTS, device=device)}
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    descale = torch.ones(1, device=device, dtype=torch.float32).expand(batch, h)
    fns = []
    for c in range(copies):
        q = torch.randn(batch, shape.num_q_heads, d, device=device, dtype=dtype)
        fns.append(partial(unified_attention, q=q, k=k, v=v, out=torch.empty_like(q), cu_seqlens_q=cu_q,
                           max_seqlen_q=1, seqused_k=seq_lens, max_seqlen_k=context,
                           softmax_scale=d ** -0.5, causal=True, window_size=(-1, -1),
                           block_table=tables[c], softcap=0, q_descale=None, k_descale=descale,
                           v_descale=descale, **segm, **extra))
    return fns


def cache_bytes_per_token(mode: str, shape) -> int:
    """KV bytes per token (all KV heads) each mode reads: the numerator of its GB/s."""
    d = shape.head_dim
    per_head = {"bf16": 4 * d, "fp8": 2 * d, "int4_per_token_head": d + 8}[mode]
    return per_head * shape.num_kv_heads
