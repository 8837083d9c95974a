"""Launcher of the unified paged-attention kernel: checks the contract, picks tiles and splits."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from .attention_kernels import _reduce_splits_kernel, paged_attention_kernel
from .block_checks import check_block_table, check_index_tensors, checks_blocks
from .interpreter import check_interpreter
from .page_format import PageLayout
from .planes import plane_views

MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 2


def _is_gpu(device: torch.device) -> bool:
    """Tile and split choices are for a GPU; on CPU the kernels run in Triton's interpreter."""
    return device.type == "cuda"


def _has_ptx(device: torch.device) -> bool:
    """NVIDIA GPUs run the kernels' inline PTX; the interpreter and ROCm take the generic code."""
    return _is_gpu(device) and torch.version.hip is None


def _sm_count(device: torch.device) -> int:
    if not _is_gpu(device):
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
                      tile_n: int, device: torch.device) -> int:
    """Flash-decoding splits: enough programs for ~2 waves on the GPU, each split >= 2 tiles.

    Only pure-decode batches are split; prefill tiles already give the grid enough programs.
    """
    if max_query_len > 1 or not _is_gpu(device):
        return 1
    programs = num_seqs * num_kv_heads
    wanted = math.ceil(2 * _sm_count(device) / max(programs, 1))
    most = max(1, math.ceil(max_seq_len / tile_n) // MIN_TILES_PER_SPLIT)
    splits = max(1, min(wanted, most, MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # power of two (the reduce kernel's arange needs one)


def tile_tokens(head_dim: int, elem_bytes: int = 2) -> int:
    """KV positions per inner-loop tile, as large as fits in registers without spilling.

    Smaller for D=256, and for fp32 queries (fp32 ``tl.dot`` in IEEE mode runs on CUDA cores and
    holds more live registers): at 64 tokens ptxas spills (``benchmarks/gpu_compile.py`` checks).
    """
    if elem_bytes > 2:
        return 16
    return 32 if head_dim > 128 else 64


def code_bias(bits: int, dtype: torch.dtype, fold: bool = True) -> int:
    """The constant whose mantissa a code is OR-ed into to become a float of the dot's dtype (0: convert).

    128.0 in bf16 holds codes below 128 exactly (8 significant bits), 1024.0 in fp16 codes below 1024;
    fp32 queries (exact ``tl.dot``) convert. See ``_code_values`` in the kernel. fp16 tiles dequantized
    value by value (not ``fold``) take 256.0, whose last bit is worth 1/4: ``256 + code / 4``, so the
    values come out in quarters, which keeps rows saturated at +-65504 finite (``_load_tile``).
    """
    if dtype == torch.bfloat16 and bits == 4:
        return 128
    if dtype == torch.float16 and bits <= 8:
        return 1024 if fold else 256
    return 0


def folds(layout: PageLayout, decode: bool, dtype: torch.dtype) -> tuple[bool, bool]:
    """Whether K and V tiles feed their codes to the dot and apply (scale, zero) per token (K_FOLD,
    V_FOLD): decode tiles with one group per head. fp16 dequantizes V: p * scale would lose its low bits
    in fp16's subnormal range."""
    k_fold = decode and layout.k_bits != 16 and layout.k_groups == 1
    v_fold = decode and layout.v_bits != 16 and layout.v_groups == 1 and dtype != torch.float16
    return k_fold, v_fold


def query_tokens_per_program(group_pad: int, max_query_len: int, elem_bytes: int = 2) -> int:
    """BLOCK_Q: decode fills 16 dot rows with one token's query heads; prefill takes ~64 rows.

    fp32 queries take 16 prefill rows: at 64, ptxas spills.
    """
    rows = 16 if max_query_len <= 1 or elem_bytes > 2 else 64
    return max(1, rows // group_pad)


def can_share_tiles(query: torch.Tensor) -> bool:
    """Converted KV tiles can reach the dot through shared memory: NVIDIA GPUs (inline PTX), 16-bit dots."""
    return _has_ptx(query.device) and query.element_size() == 2


def shares_tiles_by_default(bits: int, decode: bool, query: torch.Tensor) -> bool:
    """Whether a plane's tiles go to the dot through shared memory, converted once per program.

    Quantized tiles always: read straight into the dot's layout they take narrow loads, and every warp
    that multiplies by them converts them again. 16-bit planes only in prefill: decode loads them into
    the dot as they are, and a round trip through shared memory costs it instructions (``_once_per_program``).
    """
    return can_share_tiles(query) and (bits != 16 or not decode)


def _check_contract(query, cache, planes, block_table, seq_lens, query_start_loc, *, max_seq_len,
                    sliding_window, softcap, out, num_splits, num_warps, num_stages, share_tiles, sinks,
                    alibi_slopes):
    """Every host-side check of ``paged_attention``'s arguments, before anything is planned or launched."""
    layout = planes.layout
    if query.dim() != 3 or query.shape[-1] != layout.head_dim:
        raise ValueError(f"query must be [tokens, heads, {layout.head_dim}], got {tuple(query.shape)}")
    if query.stride(-1) != 1:
        raise ValueError("query needs a contiguous last dimension")
    num_q_heads, num_kv_heads = query.shape[1], planes.k.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if cache.device != query.device:
        raise ValueError(f"the cache is on {cache.device}, the query on {query.device}")
    check_index_tensors(block_table, seq_lens, query_start_loc, query.device, layout.block_size, max_seq_len)
    if out is not None and (out.shape != query.shape or out.stride(-1) != 1 or out.dtype != query.dtype
                            or out.device != query.device):
        raise ValueError(f"out must be {query.dtype} {tuple(query.shape)} on {query.device} with a "
                         f"contiguous last dimension, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if max(planes.k.stride(0), planes.v.stride(0), planes.params.stride(0)) >= 2 ** 31:
        # the kernel multiplies block numbers by these strides as unsigned 32-bit values
        raise ValueError(f"a KV cache block of {cache.stride(0)} bytes is too large (at most 2 GiB)")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    if num_splits is not None and (num_splits < 1 or num_splits & (num_splits - 1)):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
    if num_stages is not None and not 1 <= num_stages <= 8:
        raise ValueError(f"num_stages must be 1 to 8 (or None for Triton's default), got {num_stages}")
    for name, per_head in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
        if per_head is not None and (per_head.shape != (num_q_heads,) or per_head.dtype != torch.float32
                                     or per_head.device != query.device or per_head.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous float32 [{num_q_heads}] tensor on {query.device}, "
                             f"got {per_head.dtype} {tuple(per_head.shape)} on {per_head.device}")
    if share_tiles and not can_share_tiles(query):
        raise ValueError("share_tiles=True needs an NVIDIA GPU and 16-bit queries (inline PTX)")


@dataclass(frozen=True)
class LaunchPlan:
    """The tile, split and conversion choices of one launch, as the kernel's compile-time constants.

    Decode tiles (16 rows) apply each token's (scale, zero) to its scores and probabilities and feed the
    codes to the dot as they are (``K_FOLD``/``V_FOLD``: per token, not per channel); prefill tiles (64
    rows, 4x the scores to fix) dequantize each value in the dot's 16-bit dtype from the biased codes.
    ``DECODE`` also drops the causal mask, which one query token per sequence, its last, does not need:
    so ``max_query_len`` must be exact (vLLM's is).
    """

    grid: tuple[int, int, int]
    constants: dict


def plan_launch(query: torch.Tensor, planes, num_seqs: int, *, max_query_len: int, max_seq_len: int,
                num_splits: int | None, share_tiles: bool | None) -> LaunchPlan:
    layout = planes.layout
    num_tokens, num_q_heads, _ = query.shape
    num_kv_heads = planes.k.shape[1]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # Tiles are sized for the GPU's register file; the interpreter (CPU) has none and runs the larger
    # 16-bit tiles faster, also for fp32.
    tile_elem_bytes = query.element_size() if _is_gpu(query.device) else 2
    block_q = query_tokens_per_program(group_pad, max_query_len, tile_elem_bytes)
    tile_n = tile_tokens(planes.head_pad, tile_elem_bytes)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len, tile_n,
                                       query.device)
    decode = max_query_len <= 1
    k_fold, v_fold = folds(layout, decode, query.dtype)
    k_share, v_share = (shares_tiles_by_default(bits, decode, query) if share_tiles is None else share_tiles
                        for bits in (layout.k_bits, layout.v_bits))
    constants = dict(
        QUERIES_PER_KV=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=max(16, block_q * group_pad),
        TILE_N=tile_n, NUM_SPLITS=num_splits, DECODE=decode, K_FOLD=k_fold, V_FOLD=v_fold,
        K_CODE_BIAS=code_bias(layout.k_bits, query.dtype, k_fold),
        V_CODE_BIAS=code_bias(layout.v_bits, query.dtype, v_fold),
        IEEE=query.dtype == torch.float32, PTX_UNPACK=_has_ptx(query.device), K_SHARE=k_share, V_SHARE=v_share)
    return LaunchPlan(grid=(num_tokens // block_q + num_seqs, num_kv_heads, num_splits), constants=constants)


def paged_attention(query: torch.Tensor, cache: torch.Tensor, layout: PageLayout,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    *, max_query_len: int, max_seq_len: int, sm_scale: float | None = None,
                    sliding_window: int | None = None, softcap: float | None = None,
                    out: torch.Tensor | None = None, num_splits: int | None = None,
                    num_warps: int = 4, num_stages: int | None = None,
                    share_tiles: bool | None = None, sinks: torch.Tensor | None = None,
                    alibi_slopes: torch.Tensor | None = None,
                    validate_blocks: bool | None = None) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, Hq, D]`` over the paged quantized ``cache``.

    Sequence ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s+1]``, the last tokens of its
    ``seq_lens[s]`` tokens, whose pages are ``block_table[s]``. ``max_query_len``/``max_seq_len`` are
    host integers (no device sync here). ``sinks`` ``[Hq]`` fp32 (gpt-oss): one more logit per head in
    every row's softmax, with no value. ``alibi_slopes`` ``[Hq]`` fp32 (Bloom, Falcon): each score gains
    ``slope * (key position - query position)``. Returns ``out`` ``[T, Hq, D]`` in the query's dtype.
    ``num_splits`` (flash-decoding), ``num_warps``, ``num_stages`` (software pipelining depth; None
    keeps Triton's default) and ``share_tiles`` (None: ``shares_tiles_by_default``; False: convert KV
    tiles in the dot's layout) override the defaults, for tuning.

    The contract is checked on the host without reading the device: shapes, dtypes, devices, strides, that
    the block table has a column for each block of ``max_seq_len`` tokens. The values of the index tensors
    (block ids in ``0 <= id < num_blocks`` for every block a sequence reads, lengths, query offsets, that
    ``max_query_len`` holds) are checked on CPU always, on a GPU only with ``validate_blocks=True`` or
    ``VLLM_INT4KV_CHECK_BLOCKS=1`` (``block_checks``): reading them there costs a device sync per call,
    and under CUDA graphs it is not allowed. Unchecked, a bad id is read like any other block.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    planes = plane_views(cache, layout, query.dtype)
    _check_contract(query, cache, planes, block_table, seq_lens, query_start_loc,
                    max_seq_len=max_seq_len, sliding_window=sliding_window, softcap=softcap, out=out,
                    num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                    share_tiles=share_tiles, sinks=sinks, alibi_slopes=alibi_slopes)
    if not _is_gpu(query.device):
        check_interpreter()
    if checks_blocks(query.device, validate_blocks):
        check_block_table(block_table, seq_lens, query_start_loc, num_blocks=planes.k.shape[0],
                          block_size=layout.block_size, num_tokens=num_tokens, max_query_len=max_query_len,
                          sliding_window=sliding_window)
    if out is None:
        out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out

    plan = plan_launch(query, planes, num_seqs, max_query_len=max_query_len, max_seq_len=max_seq_len,
                       num_splits=num_splits, share_tiles=share_tiles)
    splits = plan.constants["NUM_SPLITS"]
    part_acc = part_max = part_sum = out  # unused placeholders when not split
    if splits > 1:
        # explicit fp32: the default dtype is whatever the caller set (vLLM changes it to build models)
        part_max = torch.empty(num_tokens, num_q_heads, splits, device=query.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_tokens, num_q_heads, splits, head_dim, device=query.device,
                               dtype=torch.float32)
    # passed only when set: a launch without it compiles exactly as before
    pipelining = {} if num_stages is None else {"num_stages": num_stages}
    paged_attention_kernel[plan.grid](
        q_ptr=query, out_ptr=out, part_acc_ptr=part_acc, part_max_ptr=part_max, part_sum_ptr=part_sum,
        sinks_ptr=out if sinks is None else sinks, alibi_ptr=out if alibi_slopes is None else alibi_slopes,
        **planes.pointers(),
        block_table_ptr=block_table, seq_lens_ptr=seq_lens, query_start_loc_ptr=query_start_loc,
        num_seqs=num_seqs, num_q_heads=num_q_heads,
        sm_scale=sm_scale if sm_scale is not None else head_dim ** -0.5,
        softcap=float(softcap or 0.0), sliding_window=int(sliding_window or 0),
        stride_q_t=query.stride(0), stride_q_h=query.stride(1), stride_o_t=out.stride(0),
        stride_o_h=out.stride(1), stride_bt=block_table.stride(0), **planes.strides(),
        **planes.format_constants(), **plan.constants,
        USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(sliding_window), USE_SINKS=sinks is not None,
        USE_ALIBI=alibi_slopes is not None, num_warps=num_warps, **pipelining,
    )
    if splits > 1:
        _reduce_splits_kernel[(num_tokens, num_q_heads)](
            out_ptr=out, part_acc_ptr=part_acc, part_max_ptr=part_max, part_sum_ptr=part_sum,
            num_q_heads=num_q_heads, stride_o_t=out.stride(0), stride_o_h=out.stride(1),
            HEAD_DIM=head_dim, HEAD_PAD=planes.head_pad, NUM_SPLITS=splits)
    return out
