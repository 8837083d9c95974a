"""vLLM's Triton unified attention (bf16, fp8, int4_per_token_head) as a same-run baseline, if importable.

Called the way vLLM's Triton backend calls it for decode: caches ``[blocks, block_size, kv_heads, D]``
(INT4: ``D // 2`` packed bytes plus fp32 per-(token, head) scales), a 3D (split-softmax) launch for
batches below ``128 // kv_heads`` sequences with 16 segments. Data is random; only time is read.
"""
from __future__ import annotations

import math
import os
import sys
from functools import partial

import torch

from vllm_int4kv.quality.runner import vllm_cache_bytes

MODES = ("bf16", "fp8", "int4_per_token_head")
MIN_GRID_2D = 128  # vLLM's threshold: fewer sequences than 128 // kv_heads take the 3D launch
SEGMENTS = 16


SOURCE: str | None = None  # where the kernels came from, once availability() found them
TOLERANCE = {"bf16": 2e-2, "fp8": 8e-2, "int4_per_token_head": 0.25}  # check() vs plain attention
CHECK_MODES = MODES + ("int8_per_token_head", "fp8_per_token_head")
# cache element type and stored width for head size D of the per-(token, head) modes, as vLLM allocates
PER_TOKEN_HEAD_CACHE = {"int4_per_token_head": (torch.uint8, lambda d: d // 2),
                        "int8_per_token_head": (torch.int8, lambda d: d),
                        "fp8_per_token_head": (torch.float8_e4m3fn, lambda d: d)}


def availability(device: torch.device) -> str | None:
    """None when the kernels can be used, else the reason recorded in the results.

    On a GPU an installed vLLM is used first, else the kernel files staged by ``vllm_kernels.py --stage``
    (the GPU machine has no vLLM). Under the Triton interpreter on CPU only the staged files: the CPU
    build of vLLM turns its Triton use off.
    """
    global SOURCE
    on_gpu = device.type == "cuda"
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        return "not measured: no CUDA device (vLLM's Triton kernels need a GPU or the Triton interpreter)"
    reasons = []
    if on_gpu:
        try:
            import vllm
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention  # noqa: F401
            SOURCE = f"vLLM {vllm.__version__} (installed)"
            return None
        except Exception as exc:  # noqa: BLE001 - any import failure: try the staged kernels
            reasons.append(f"vllm not importable ({type(exc).__name__}: {exc})")
            for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
                del sys.modules[name]  # what a failed import left behind
    try:
        from . import vllm_kernels

        SOURCE = vllm_kernels.install()
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention  # noqa: F401,F811
        return None
    except Exception as staged:  # noqa: BLE001 - neither: not measured, and why
        reasons.append(f"staged kernels: {type(staged).__name__}: {staged}")
    return ("not measured: " + "; ".join(reasons))[:400]


def _segments(num_q_heads: int, num_kv_heads: int, head_dim: int, rows: int, device) -> dict:
    """The 3D (split-softmax) launch's buffers, as vLLM's Triton backend allocates them; vLLM takes that
    launch only for decode batches of at most ``128 // kv_heads`` sequences."""
    shape = (max(rows, MIN_GRID_2D // num_kv_heads), num_q_heads, SEGMENTS)
    return {"seq_threshold_3D": MIN_GRID_2D // num_kv_heads, "num_par_softmax_segments": SEGMENTS,
            "softmax_segm_output": torch.empty(*shape, 1 << (head_dim - 1).bit_length(), device=device),
            "softmax_segm_max": torch.empty(*shape, device=device),
            "softmax_segm_expsum": torch.empty(*shape, device=device)}


def _call(mode: str, q, k, v, out, table, seq_lens, new_tokens: int, max_seq_len: int, scales=None):
    """``unified_attention`` bound to one batch of ``len(seq_lens)`` sequences of ``new_tokens`` queries."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    num_seqs, device = seq_lens.shape[0], q.device
    num_kv_heads, head_dim = k.shape[2], q.shape[2]
    extra = {}
    if mode.endswith("per_token_head"):
        extra = {"kv_quant_mode": KVQuantMode[mode.upper()], "k_scale_cache": scales[0],
                 "v_scale_cache": scales[1]}
    descale = torch.ones(1, device=device, dtype=torch.float32).expand(num_seqs, num_kv_heads)
    return partial(unified_attention, q=q, k=k, v=v, out=out,
                   cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * new_tokens,
                   max_seqlen_q=new_tokens, seqused_k=seq_lens, max_seqlen_k=max_seq_len,
                   softmax_scale=head_dim ** -0.5, causal=True, window_size=(-1, -1), block_table=table,
                   softcap=0, q_descale=None, k_descale=descale, v_descale=descale,
                   **_segments(q.shape[1], num_kv_heads, head_dim, num_seqs, device), **extra)


def _random_cache(mode: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device,
                  dtype):
    """(K, V, scale caches or None) in vLLM's layout ``[blocks, block_size, kv_heads, D]``."""
    shape = (num_blocks, block_size, num_kv_heads)
    if mode == "int4_per_token_head":  # D/2 packed bytes, fp32 per-(token, head) scales
        k, v = (torch.randint(0, 256, (*shape, head_dim // 2), dtype=torch.uint8, device=device)
                for _ in range(2))
        return k, v, [torch.rand(*shape, device=device) * 0.1 + 0.05 for _ in range(2)]
    k, v = (torch.randn(*shape, head_dim, device=device, dtype=dtype) for _ in range(2))
    if mode == "fp8":
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    return k, v, None


def attention_fns(mode: str, shape, num_seqs: int, new_tokens: int, seq_len: int, copies: int, device,
                  dtype, block_size: int = 16):
    """``copies`` calls over disjoint pages: ``num_seqs`` sequences of ``seq_len`` tokens whose last
    ``new_tokens`` are the queries (decode: 1), called the way vLLM's Triton backend calls the kernel."""
    bps = math.ceil(seq_len / block_size)
    nb = copies * num_seqs * bps
    k, v, scales = _random_cache(mode, nb, block_size, shape.num_kv_heads, shape.head_dim, device, dtype)
    tables = torch.randperm(nb, device=device).view(copies, num_seqs, bps).to(torch.int32)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    fns = []
    for c in range(copies):
        q = torch.randn(num_seqs * new_tokens, shape.num_q_heads, shape.head_dim, device=device, dtype=dtype)
        fns.append(_call(mode, q, k, v, torch.empty_like(q), tables[c], seq_lens, new_tokens, seq_len, scales))
    return fns


def write_fns(shape, tokens: int, copies: int, device, dtype, block_size: int = 16):
    """vLLM's INT4 cache write (rotation, packing, scales: Triton) of ``tokens`` new tokens per call. Its
    bf16/fp8 writes are CUDA ops of ``vllm._C``, which the staged kernels do not have."""
    from vllm.v1.attention.ops.int4_per_token_head import reshape_and_cache_int4

    nb = copies * math.ceil(tokens / block_size)
    k, v, (k_scales, v_scales) = _random_cache("int4_per_token_head", nb, block_size, shape.num_kv_heads,
                                               shape.head_dim, device, dtype)
    slots = torch.randperm(nb * block_size, device=device)[:copies * tokens].view(copies, tokens)
    fns = []
    for c in range(copies):
        key, value = (torch.randn(tokens, shape.num_kv_heads, shape.head_dim, device=device, dtype=dtype)
                      for _ in range(2))
        fns.append(partial(reshape_and_cache_int4, key, value, k, v, slots[c], k_scale_cache=k_scales,
                           v_scale_cache=v_scales))
    return fns


def cache_bytes_per_token(mode: str, shape) -> int:
    """KV bytes per token (all KV heads) each mode reads: the numerator of its GB/s."""
    return vllm_cache_bytes("auto" if mode == "bf16" else mode, shape.head_dim) * shape.num_kv_heads


def check(mode: str, device, dtype, new_tokens: int = 1, num_kv_heads: int = 2, group: int = 3,
          head_dim: int = 64, seq_len: int = 40, num_seqs: int = 2, block_size: int = 16,
          emulated: bool = False) -> float:
    """Error ratio of vLLM's attention (cache written as vLLM writes it) against plain causal attention on
    the unquantized K/V: shows the baseline's call computes attention (INT4 error is ~0.1, garbage ~1).

    ``emulated``: attend over K/V passed through ``vllm_formats`` instead, which must then agree with
    vLLM's kernels to rounding (the check of those emulations). Modes: ``CHECK_MODES``."""
    gen = torch.Generator().manual_seed(0)
    h, hq, d = num_kv_heads, num_kv_heads * group, head_dim
    bps = math.ceil(seq_len / block_size)
    nb = num_seqs * bps
    key, value = (torch.randn(nb * block_size, h, d, generator=gen) for _ in range(2))
    query = torch.randn(num_seqs, new_tokens, hq, d, generator=gen)
    tables = torch.randperm(nb, generator=gen).view(num_seqs, bps).to(torch.int32)
    scales = None
    if mode.endswith("per_token_head"):  # vLLM's own Triton write kernels
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
            triton_reshape_and_cache_flash_per_token_head_quant as write)
        from vllm.v1.kv_cache_interface import KVQuantMode

        cache_dtype, width = PER_TOKEN_HEAD_CACHE[mode]
        k = torch.zeros(nb, block_size, h, width(d), dtype=cache_dtype, device=device)
        v = torch.zeros_like(k)
        scales = [torch.zeros(nb, block_size, h, device=device) for _ in range(2)]
        write(key.to(device, dtype), value.to(device, dtype), k, v, scales[0], scales[1],
              torch.arange(nb * block_size, device=device), KVQuantMode[mode.upper()])
    else:
        cache_dtype = torch.float8_e4m3fn if mode == "fp8" else dtype
        k, v = (x.view(nb, block_size, h, d).to(device, cache_dtype) for x in (key, value))
    q = query.flatten(0, 1).to(device, dtype)
    out = torch.full_like(q, float("nan"))
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    _call(mode, q, k, v, out, tables.to(device), seq_lens, new_tokens, seq_len, scales)()
    slots = (tables.long()[:, :, None] * block_size + torch.arange(block_size)).flatten(1)[:, :seq_len]
    if emulated and mode != "bf16":  # bf16: the cache stores K/V in the model's dtype, unchanged
        from .vllm_formats import FORMATS

        key, value = (x.float() for x in FORMATS[mode].fake_quantize_kv(key.to(dtype), value.to(dtype)))
    k_seq, v_seq = (x[slots].repeat_interleave(group, 2) for x in (key, value))  # [B, S, Hq, D]
    scores = torch.einsum("bthd,bshd->bhts", query, k_seq) * d ** -0.5
    visible = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - new_tokens, seq_len)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    expected = torch.einsum("bhts,bshd->bthd", probs, v_seq).flatten(0, 1)
    return ((out.float().cpu() - expected).norm() / expected.norm()).item()
