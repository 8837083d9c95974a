"""vLLM's Triton unified attention (bf16, fp8, int4_per_token_head) as a same-run baseline, if importable.

Called the way vLLM's Triton backend calls it for decode: caches ``[blocks, block_size, kv_heads, D]``
(INT4: ``D // 2`` packed bytes plus fp32 per-(token, head) scales), a 3D (split-softmax) launch for
batches below ``128 // kv_heads`` sequences with 16 segments. Data is random; only time is read.
"""
from __future__ import annotations

import math
import sys
from functools import partial

import torch

MODES = ("bf16", "fp8", "int4_per_token_head")
MIN_GRID_2D = 128  # vLLM's threshold: fewer sequences than 128 // kv_heads take the 3D launch
SEGMENTS = 16


SOURCE: str | None = None  # where the kernels came from, once availability() found them
TOLERANCE = {"bf16": 2e-2, "fp8": 8e-2, "int4_per_token_head": 0.25}  # check_decode vs plain attention


def availability(device: torch.device) -> str | None:
    """None when the kernels can be used, else the reason recorded in the results.

    An installed vLLM is used first; else the kernel files staged by ``vllm_kernels.py --stage`` (the
    GPU machine has no vLLM).
    """
    global SOURCE
    if device.type != "cuda":
        return "not measured: no CUDA device (vLLM's Triton kernels need a GPU)"
    try:
        import vllm
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention  # noqa: F401
        from vllm.v1.kv_cache_interface import KVQuantMode  # noqa: F401
        SOURCE = f"vLLM {vllm.__version__} (installed)"
    except Exception as exc:  # noqa: BLE001 - any import failure: try the staged kernels
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]  # what a failed import left behind
        try:
            from . import vllm_kernels

            SOURCE = vllm_kernels.install()
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention  # noqa: F401,F811
        except Exception as staged:  # noqa: BLE001 - neither: not measured, and why
            return (f"not measured: vllm not importable ({type(exc).__name__}: {exc}); staged kernels: "
                    f"{type(staged).__name__}: {staged}")[:400]
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


def check_decode(mode: str, device, dtype, num_kv_heads: int = 2, group: int = 3, head_dim: int = 64,
                 context: int = 40, batch: int = 2, block_size: int = 16) -> float:
    """Error ratio of vLLM's decode (cache written as vLLM writes it) against plain attention on the
    unquantized K/V: shows the baseline's call computes attention (INT4 error is ~0.1, garbage ~1)."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    gen = torch.Generator().manual_seed(0)
    h, hq, d = num_kv_heads, num_kv_heads * group, head_dim
    bps = math.ceil(context / block_size)
    nb = batch * bps
    key, value = (torch.randn(nb * block_size, h, d, generator=gen) for _ in range(2))
    query = torch.randn(batch, hq, d, generator=gen)
    tables = torch.randperm(nb, generator=gen).view(batch, bps).to(torch.int32)
    extra = {}
    if mode == "int4_per_token_head":
        from vllm.v1.attention.ops.int4_per_token_head import reshape_and_cache_int4

        k = torch.zeros(nb, block_size, h, d // 2, dtype=torch.uint8, device=device)
        v = torch.zeros_like(k)
        extra = {"kv_quant_mode": KVQuantMode.INT4_PER_TOKEN_HEAD,
                 "k_scale_cache": torch.zeros(nb, block_size, h, device=device),
                 "v_scale_cache": torch.zeros(nb, block_size, h, device=device)}
        reshape_and_cache_int4(key.to(device, dtype), value.to(device, dtype), k, v,
                               torch.arange(nb * block_size, device=device),
                               k_scale_cache=extra["k_scale_cache"], v_scale_cache=extra["v_scale_cache"])
    else:
        cache_dtype = torch.float8_e4m3fn if mode == "fp8" else dtype
        k, v = (x.view(nb, block_size, h, d).to(device, cache_dtype) for x in (key, value))
    segments = {"seq_threshold_3D": MIN_GRID_2D // h, "num_par_softmax_segments": SEGMENTS,
                "softmax_segm_output": torch.empty(MIN_GRID_2D, hq, SEGMENTS, 1 << (d - 1).bit_length(),
                                                   device=device),
                "softmax_segm_max": torch.empty(MIN_GRID_2D, hq, SEGMENTS, device=device),
                "softmax_segm_expsum": torch.empty(MIN_GRID_2D, hq, SEGMENTS, device=device)}
    q = query.to(device, dtype)
    out = torch.full_like(q, float("nan"))
    descale = torch.ones(1, device=device, dtype=torch.float32).expand(batch, h)
    unified_attention(q=q, k=k, v=v, out=out, cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32,
                                                                        device=device),
                      max_seqlen_q=1, seqused_k=torch.full((batch,), context, dtype=torch.int32, device=device),
                      max_seqlen_k=context, softmax_scale=d ** -0.5, causal=True, window_size=(-1, -1),
                      block_table=tables.to(device), softcap=0, q_descale=None, k_descale=descale,
                      v_descale=descale, **segments, **extra)
    slots = (tables.long()[:, :, None] * block_size + torch.arange(block_size)).flatten(1)[:, :context]
    k_seq, v_seq = (x[slots].repeat_interleave(group, 2) for x in (key, value))  # [B, S, Hq, D]
    probs = (torch.einsum("bhd,bshd->bhs", query, k_seq) * d ** -0.5).softmax(-1)
    expected = torch.einsum("bhs,bshd->bhd", probs, v_seq)
    return ((out.float().cpu() - expected).norm() / expected.norm()).item()
