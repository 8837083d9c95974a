"""The vLLM attention backend (``--attention-backend CUSTOM``) over INT4/INT8 paged KV pages.

The only module of the project that imports vLLM. It tells vLLM how large a page is (``customize_spec``
returns the spec with ``state_content_bytes`` = the policy's bytes per token and KV head, so vLLM's own
block manager allocates INT4-sized pages and reports correspondingly more blocks), builds the batch
metadata, and forwards each layer's cache write and attention to ``vllm_int4kv.attention``.

Which ``--kv-cache-dtype`` selects our pages: ``auto`` (the pages follow ``VLLM_INT4KV_POLICY``, any
policy including the unquantized ``k16v16``) and ``int4_per_token_head`` (the same, but the policy must
quantize something). Every other value stops start-up: this backend has one page format. With
``int4_per_token_head``, the layers named by ``--kv-cache-dtype-skip-layers`` (vLLM hands them over as
``auto`` layers) keep ``k16v16`` pages in the same block pool; each layer's pages have their own size
(``skip_layers`` holds the rules and the start-up checks of that flag).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch

from vllm.config import get_current_vllm_config_or_none
from vllm.distributed.parallel_state import get_world_group
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from .. import attention as ops
from ..kernels.page_format import HEAD_DIMS, HEAD_DIMS_TEXT
from ..kernels.rotation import hadamard
from ..policy import UNQUANTIZED, KVPolicy, current
from ..policy.decide import ModelTarget
from . import skip_layers

# A child of vLLM's logger, so our lines appear (and are filtered) with vLLM's own.
logger = logging.getLogger("vllm.int4kv")

KV_CACHE_DTYPES = ("auto", skip_layers.QUANTIZED_CACHE_DTYPE)
BACKEND_NAME = "CUSTOM"
_HINT = "or drop --attention-backend CUSTOM to use vLLM's default attention"

# The VllmConfig seen while the model was built. customize_spec runs later, outside any
# set_current_vllm_config() context, and the auto policy needs the model config.
_vllm_config = None
_announced: set = set()


def _current_config():
    return get_current_vllm_config_or_none() or _vllm_config


def _remember_config() -> None:
    global _vllm_config
    _vllm_config = _current_config()


def _model_dtype(spec_dtype: torch.dtype) -> torch.dtype:
    """The model's activation dtype (``int4_per_token_head`` specs carry uint8 instead)."""
    if spec_dtype.is_floating_point:
        return spec_dtype
    config = _current_config()
    if config is None or config.model_config is None:
        raise RuntimeError("vllm-int4kv: cannot tell the model dtype of a uint8 KV cache spec")
    return config.model_config.dtype


def _checkpoint_kv_scheme(config) -> str | None:
    """What the checkpoint's quantization config asks of the KV cache, if anything: vLLM turns
    ``--kv-cache-dtype auto`` into that (fp8 for compressed-tensors' ``kv_cache_scheme`` and ModelOpt's
    ``kv_cache_quant_algo``), so a user who typed no cache dtype still gets one we do not store."""
    hf_config = getattr(getattr(config, "model_config", None), "hf_config", None)
    quant = getattr(hf_config, "quantization_config", None)
    if not isinstance(quant, dict):
        return None
    inner = quant.get("quantization") if isinstance(quant.get("quantization"), dict) else {}
    for source in (quant, inner):
        for key in ("kv_cache_scheme", "kv_cache_quant_algo"):
            if source.get(key):
                return f"{key} {source[key]}"
    return None


def _unsupported_cache_dtype(kv_cache_dtype: str) -> str:
    """Why ``kv_cache_dtype`` stops start-up, and what to pass instead."""
    scheme = _checkpoint_kv_scheme(_current_config())
    if scheme:
        return (f"this checkpoint's quantization config asks for a {kv_cache_dtype} KV cache ({scheme}), "
                "which vLLM picks when --kv-cache-dtype is auto, and vllm-int4kv stores its own pages "
                "instead: pass --kv-cache-dtype int4_per_token_head (the checkpoint's KV scales are then "
                f"not used), {_HINT}")
    return (f"--kv-cache-dtype {kv_cache_dtype} is not supported by vllm-int4kv: use --kv-cache-dtype auto "
            "(pages follow VLLM_INT4KV_POLICY) or int4_per_token_head")


def _ranks() -> tuple[int, int]:
    """(rank, world size) of this engine's workers (tensor x pipeline parallel)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    group = get_world_group().cpu_group
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(obj) -> list:
    """Gather a small picklable object from every worker (gloo, CPU): the policy is agreed on once."""
    import torch.distributed as dist

    group = get_world_group().cpu_group
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _model_target(config) -> ModelTarget | None:
    """The model ``auto`` calibrates, as vLLM serves it (None outside an engine)."""
    model_config = getattr(config, "model_config", None)
    if model_config is None:
        return None
    return ModelTarget(model_config.model, revision=model_config.revision, dtype=model_config.dtype,
                       trust_remote_code=model_config.trust_remote_code)


def _policy() -> KVPolicy:
    # Every worker calls this at the same point (the first customize_spec, inside vLLM's collective
    # get_kv_cache_spec), so a collective here cannot leave a rank waiting alone.
    rank, world = _ranks()
    return current.resolve_policy(lambda: _model_target(_current_config()),
                                  all_gather=_all_gather if world > 1 else None, rank=rank)


def _warn_if_padded(policy: KVPolicy, layout, kv_cache: torch.Tensor) -> None:
    """Say so when vLLM pads our pages: it pads a page to the pool's largest when their sizes do not
    divide each other, and the padding holds no tokens, so the capacity the policy promises is lost.
    With --kv-cache-dtype-skip-layers that happens on models that mix layer types (an unquantized
    full-attention layer beside quantized sliding-window ones, on any platform) and, on vLLM's CPU
    platform, for skipped sliding-window layers (its GPU platforms raise the block size instead)."""
    used = kv_cache.shape[1] * layout.run_bytes
    page = kv_cache.stride(0) * kv_cache.element_size()
    key = ("padded", policy, used, page)
    if page > used and policy.quantized and key not in _announced:
        _announced.add(key)
        logger.warning(f"vllm-int4kv: vLLM pads each {policy.name} page of {used} bytes to {page} to share the "
                       f"block pool with larger pages: {1 - used / page:.0%} of these layers' cache holds "
                       "nothing. vLLM pads pages whose sizes do not divide each other: with "
                       "--kv-cache-dtype-skip-layers on a model that mixes layer types (sliding-window or "
                       "state layers beside full attention), and for skipped sliding-window layers on CPU. "
                       "Drop the flag to get the policy's capacity back")


class Int4KVBackend(AttentionBackend):
    forward_includes_kv_cache_update = False  # vLLM calls do_kv_cache_update first
    supported_dtypes: ClassVar[list[torch.dtype]] = list(ops.SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[Int4KVImpl]:
        return Int4KVImpl

    @staticmethod
    def get_builder_cls() -> type[Int4KVMetadataBuilder]:
        return Int4KVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        # The page format splits a block into planes of block_size rows: a multiple of 16 keeps every
        # plane 16-byte aligned. (Hybrid models get what their state pages need: 64, 192, 256, ...)
        return block_size is None or (block_size >= 16 and block_size % 16 == 0)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(HEAD_DIMS)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:  # gpt-oss's per-head sink logits
        return True

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Each (block, head) must own one contiguous run: our planes live inside it.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """The spec with our page size: ``state_content_bytes`` = bytes per token and KV head."""
        if spec.state_content_bytes is not None:
            return spec
        if spec.head_size_v != spec.head_size:
            raise ValueError(f"vllm-int4kv needs equal K and V head sizes, got {spec.head_size} and "
                             f"{spec.head_size_v}; {_HINT}")
        if current.current_policy() is None:  # the first spec: every layer is built, and every rank is here
            _, world = _ranks()
            skip_layers.check_kept_layers(_current_config(), _all_gather if world > 1 else None)
        policy = _policy()
        quantized_layer = spec.kv_quant_mode.name == "INT4_PER_TOKEN_HEAD"
        if quantized_layer and not policy.quantized:
            raise ValueError(f"--kv-cache-dtype int4_per_token_head asks for a quantized cache, but "
                             f"VLLM_INT4KV_POLICY gives {policy.name}: set a quantized policy (e.g. k4v4) "
                             "or use --kv-cache-dtype auto")
        kept = not quantized_layer and skip_layers.kept_unquantized("auto", _current_config())
        if kept:
            policy = UNQUANTIZED
        model_dtype = _model_dtype(spec.dtype)
        elem_bytes = model_dtype.itemsize
        layout = policy.layout(spec.head_size, 16, elem_bytes)  # slot size does not depend on blocks
        key = (policy, spec.head_size, spec.num_kv_heads, model_dtype)
        if key not in _announced:  # once per process (per distinct layer shape)
            _announced.add(key)
            rank, world = _ranks()
            where = f" [rank {rank} of {world}: {spec.num_kv_heads} KV heads on this rank]" if world > 1 else ""
            source = "--kv-cache-dtype-skip-layers" if kept else current.policy_source()
            logger.info(ops.describe(policy, layout, spec.num_kv_heads, model_dtype, source=source) + where)
        return dataclasses.replace(spec, state_content_bytes=layout.slot_bytes)

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink,
                               use_sparse, use_mm_prefix, use_per_head_quant_scales, device_capability,
                               attn_type, **flags) -> list[str]:
        """Reasons this configuration cannot run, each saying what to change (empty: it can)."""
        reasons = []
        if use_mla:
            reasons.append(f"vllm-int4kv does not support MLA models (latent KV caches); {_HINT}")
        if attn_type != AttentionType.DECODER:
            reasons.append(f"vllm-int4kv supports decoder self-attention only, not {attn_type} "
                           f"attention (encoder or cross-attention models); {_HINT}")
        if head_size not in HEAD_DIMS:
            reasons.append(f"vllm-int4kv supports head sizes that are {HEAD_DIMS_TEXT}; this "
                           f"model has {head_size}; {_HINT}")
        if dtype not in ops.SUPPORTED_DTYPES:
            reasons.append(f"vllm-int4kv supports --dtype float16, bfloat16 or float32, not {dtype}")
        if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
            reasons.append(_unsupported_cache_dtype(kv_cache_dtype))
        if not cls.supports_block_size(block_size):
            reasons.append(f"--block-size {block_size}: vllm-int4kv needs a multiple of 16")
        if use_sparse:
            reasons.append(f"vllm-int4kv does not support sparse attention; {_HINT}")
        if use_mm_prefix or use_per_head_quant_scales:
            reasons.append("vllm-int4kv does not support multimodal prefix attention or checkpoint "
                           f"per-head KV scales; {_HINT}")
        unsupported = [name for name in ("use_non_causal", "use_batch_invariant", "use_pcp", "use_dcp",
                                         "use_rswa", "use_adaptive_verification") if flags.get(name)]
        if unsupported:
            reasons.append(f"vllm-int4kv does not support {', '.join(unsupported)}; {_HINT}")
        return reasons


class Int4KVMetadataBuilder(AttentionMetadataBuilder[ops.Int4KVMetadata]):
    # The torch path reads sequence lengths on the host: no CUDA graphs. See get_cudagraph_support.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        # The Triton path launches from host integers only (max_query_len, max_seq_len as upper
        # bounds) and reads lengths and block tables on the device. Captured graphs keep the
        # max_seq_len of capture time (vLLM passes max_model_len), so they are valid for any later
        # decode batch of the same size; mixed prefill batches stay eager to be safe.
        if ops.default_impl() == "triton":
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ops.Int4KVMetadata:
        m = common_attn_metadata
        return ops.Int4KVMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len, query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
            block_table=m.block_table_tensor, slot_mapping=m.slot_mapping)


class Int4KVImpl(AttentionImpl[ops.Int4KVMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **unsupported) -> None:
        if alibi_slopes is not None and len(alibi_slopes) != num_heads:
            raise ValueError(f"ALiBi needs one slope per query head ({num_heads}), got {len(alibi_slopes)}")
        if any(v not in (None, False, -1) for v in unsupported.values()):
            raise ValueError(f"vllm-int4kv does not support {sorted(unsupported)}; {_HINT}")
        if sinks is not None and sinks.shape != (num_heads,):
            raise ValueError(f"attention sinks must hold one logit per query head ({num_heads}), got "
                             f"{tuple(sinks.shape)}")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"vllm-int4kv supports decoder self-attention only, not {attn_type}; {_HINT}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(_unsupported_cache_dtype(kv_cache_dtype))
        _remember_config()
        if _vllm_config is not None:
            skip_layers.check_entries(_vllm_config)
        # a layer --kv-cache-dtype-skip-layers names: k16v16 pages, whatever the engine's policy
        self._kept_unquantized = skip_layers.kept_unquantized(kv_cache_dtype, _current_config())
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None  # 0 means "off" in vLLM
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sinks = sinks  # (gpt-oss) the model's parameter: its weights are loaded after this
        # (Bloom, Falcon) fp32 [Hq]; made under vLLM's device context, moved at first use if it was not
        self.alibi_slopes = (None if alibi_slopes is None
                             else torch.tensor(alibi_slopes, dtype=torch.float32).contiguous())
        self.impl = ops.default_impl()
        if self.impl == "torch" and torch.cuda.is_available():
            # the torch implementation builds its masks and indices on the host: CPU serving only
            raise ValueError("VLLM_INT4KV_IMPL=torch is the CPU implementation; on a GPU use triton "
                             "(the default there)")
        self._policy: KVPolicy | None = None  # fixed at first use, like the pages it describes
        self._layout = None

    def _layout_for(self, kv_cache: torch.Tensor, model_dtype: torch.dtype):
        if self._policy is None:
            self._policy = UNQUANTIZED if self._kept_unquantized else _policy()
        if self._layout is None or self._layout.block_size != kv_cache.shape[2]:
            self._layout = ops.policy_layout(self._policy, self.head_size, kv_cache, model_dtype)
            _warn_if_padded(self._policy, self._layout, kv_cache)
            if self._policy.rotate:  # build the cached Hadamard matrix now, not inside a graph capture
                hadamard(self.head_size, device=kv_cache.device)
            if self.alibi_slopes is not None:
                self.alibi_slopes = self.alibi_slopes.to(kv_cache.device)
        return self._layout

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        layout = self._layout_for(kv_cache, key.dtype)
        ops.write_kv(key, value, ops.cache_runs(kv_cache, layout), slot_mapping, layout,
                     impl=self.impl, rotated=self._policy.rotate)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: ops.Int4KVMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``query`` ``[T, Hq, D]`` -> ``output`` ``[T, Hq, D]``; K/V are already in the cache."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-int4kv does not fuse output quantization")
        if attn_metadata is None:  # profiling run: no cache yet
            return output.fill_(0)
        layout = self._layout_for(kv_cache, query.dtype)
        return ops.attend(query, ops.cache_runs(kv_cache, layout), layout, attn_metadata, output,
                          impl=self.impl, rotated=self._policy.rotate, sm_scale=self.scale,
                          sliding_window=self.sliding_window, softcap=self.logits_soft_cap,
                          sinks=None if self.sinks is None else self.sinks.float(),  # (fp32: a no-op)
                          alibi_slopes=self.alibi_slopes)
