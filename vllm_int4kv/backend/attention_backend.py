"""The vLLM attention backend (``--attention-backend CUSTOM``) over INT4/INT8 paged KV pages.

It tells vLLM how large a layer's page is (``customize_spec`` returns the spec with
``state_content_bytes`` = the layer's bytes per token and KV head, so vLLM's own block manager allocates
INT4-sized pages and reports correspondingly more blocks), builds the batch metadata, and forwards each
layer's cache write and attention to ``vllm_int4kv.attention``.

Which ``--kv-cache-dtype`` selects our pages: ``auto`` (the pages follow ``VLLM_INT4KV_POLICY``, any
policy or per-layer map, including the unquantized ``k16v16``) and ``int4_per_token_head`` (the same, but
something must be quantized). Every other value stops start-up: this backend has one page format. Each
layer's pages have their own size (``layers``: which layer gets which layout, and the checks).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import ClassVar

import torch

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
from . import compat, engine, layers
from .engine import HINT

# A child of vLLM's logger, so our lines appear (and are filtered) with vLLM's own.
logger = logging.getLogger("vllm.int4kv")

KV_CACHE_DTYPES = compat.cache_dtypes()
BACKEND_NAME = "CUSTOM"
_announced: set = set()


def _first_spec(config) -> None:
    """Once per engine, at the first page size vLLM asks for (every layer is built, every rank is here):
    the skip-layer checks, the policy map (decided once for every rank), its checks against the built
    model, and its start-up line."""
    per_rank = engine.gather_or_own(layers.layer_facts(config))
    layers.check_kept_layers(config, per_rank)
    policy_map = engine.engine_policy()
    layers.check_map(policy_map, config, per_rank)
    indices = layers.all_indices(per_rank)
    if policy_map.single is None and indices:
        model = config.model_config
        heads = model.get_num_kv_heads(config.parallel_config)
        logger.info(layers.describe_map(policy_map, indices, model.get_head_size(), heads,
                                        model.dtype.itemsize, current.policy_source()))


def _warn_if_padded(policy: KVPolicy, layout, kv_cache: torch.Tensor) -> None:
    """Say so when vLLM pads our pages: it pads a page to the pool's largest when their sizes do not
    divide each other, and the padding holds no tokens, so the capacity the layout promises is lost.
    That happens when layers of different page sizes (a per-layer map, or --kv-cache-dtype-skip-layers)
    meet on a model that mixes layer types (sliding-window or state layers beside full attention), and,
    on vLLM's CPU platform, for skipped sliding-window layers (its GPU platforms raise the block size)."""
    used = kv_cache.shape[1] * layout.run_bytes
    page = kv_cache.stride(0) * kv_cache.element_size()
    key = ("padded", policy, used, page)
    if page > used and policy.quantized and key not in _announced:
        _announced.add(key)
        logger.warning(f"vllm-int4kv: vLLM pads each {policy.name} page of {used} bytes to {page} to share the "
                       f"block pool with larger pages: {1 - used / page:.0%} of these layers' cache holds "
                       "nothing. vLLM pads pages whose sizes do not divide each other on models that mix "
                       "layer types (sliding-window or state layers beside full attention), and for skipped "
                       "sliding-window layers on CPU. One layout for every layer (no per-layer map, no "
                       "--kv-cache-dtype-skip-layers) gets the capacity back")


class Int4KVBackend(AttentionBackend):
    forward_includes_kv_cache_update = False  # vLLM calls do_kv_cache_update first
    supported_dtypes: ClassVar[list[torch.dtype]] = list(ops.SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)
    layer_index: ClassVar[int | None] = None  # set on each layer's own subclass (``for_layer``)

    @classmethod
    def full_cls_name(cls) -> tuple[str, str]:
        # vLLM groups layers for metadata builders by this name and their spec: the per-layer subclasses
        # share this class's builder, so only the spec (the layout) should part them.
        return (Int4KVBackend.__module__, Int4KVBackend.__qualname__)

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

    @staticmethod
    @functools.cache
    def for_layer(index: int) -> type[Int4KVBackend]:
        """The backend class of attention layer ``index`` (``layers.specialize`` hands these out)."""
        return type(f"Int4KVBackendLayer{index}", (Int4KVBackend,), {"layer_index": index})

    @classmethod
    def layer_policy(cls, kv_cache_dtype: str) -> tuple[KVPolicy, str]:
        """(this layer's layout, where it came from), for a layer whose vLLM cache dtype is ``kv_cache_dtype``."""
        config = engine.config()
        policy_map = engine.engine_policy()
        if kv_cache_dtype in compat.quantized_cache_dtypes() and not policy_map.quantized:
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} asks for a quantized cache, but "
                             f"VLLM_INT4KV_POLICY gives {policy_map.name}: set a quantized policy (e.g. k4v4) "
                             "or use --kv-cache-dtype auto")
        if layers.kept_unquantized(kv_cache_dtype, config):
            return UNQUANTIZED, "--kv-cache-dtype-skip-layers"
        if policy_map.single is not None:
            return policy_map.single, current.policy_source()
        if cls.layer_index is None:
            raise RuntimeError(f"vllm-int4kv: VLLM_INT4KV_POLICY={policy_map.name} gives layers their own "
                               "layouts, but vLLM asked for a page size without saying for which layer (a "
                               "hybrid model, or this vLLM version calls the backend before its layers are "
                               f"known); use one policy for every layer, {HINT}")
        return policy_map.for_layer(cls.layer_index), "the per-layer map"

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """The spec with this layer's page size: ``state_content_bytes`` = bytes per token and KV head."""
        if spec.state_content_bytes is not None:
            return spec
        if spec.head_size_v != spec.head_size:
            raise ValueError(f"vllm-int4kv needs equal K and V head sizes, got {spec.head_size} and "
                             f"{spec.head_size_v}; {HINT}")
        if current.current_policy() is None:
            _first_spec(engine.config())
        quantized_layer = spec.kv_quant_mode.name == "INT4_PER_TOKEN_HEAD"
        policy, source = cls.layer_policy(compat.INT4_PER_TOKEN_HEAD if quantized_layer else "auto")
        model_dtype = engine.model_dtype(spec.dtype)
        elem_bytes = model_dtype.itemsize
        layout = policy.layout(spec.head_size, 16, elem_bytes)  # slot size does not depend on blocks
        key = (policy, spec.head_size, spec.num_kv_heads, model_dtype)
        if key not in _announced:  # once per process (per distinct layer shape)
            _announced.add(key)
            rank, world = engine.ranks()
            where = f" [rank {rank} of {world}: {spec.num_kv_heads} KV heads on this rank]" if world > 1 else ""
            logger.info(ops.describe(policy, layout, spec.num_kv_heads, model_dtype, source=source) + where)
        return dataclasses.replace(spec, state_content_bytes=layout.slot_bytes)

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink,
                               use_sparse, use_mm_prefix, use_per_head_quant_scales, device_capability,
                               attn_type, **flags) -> list[str]:
        """Reasons this configuration cannot run, each saying what to change (empty: it can)."""
        reasons = [problem] if (problem := compat.unsupported_version()) else []
        if use_mla:
            reasons.append(f"vllm-int4kv does not support MLA models (latent KV caches); {HINT}")
        if attn_type != AttentionType.DECODER:
            reasons.append(f"vllm-int4kv supports decoder self-attention only, not {attn_type} "
                           f"attention (encoder or cross-attention models); {HINT}")
        if head_size not in HEAD_DIMS:
            reasons.append(f"vllm-int4kv supports head sizes that are {HEAD_DIMS_TEXT}; this "
                           f"model has {head_size}; {HINT}")
        if dtype not in ops.SUPPORTED_DTYPES:
            reasons.append(f"vllm-int4kv supports --dtype float16, bfloat16 or float32, not {dtype}")
        if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
            reasons.append(engine.unsupported_cache_dtype(kv_cache_dtype))
        if not cls.supports_block_size(block_size):
            reasons.append(f"--block-size {block_size}: vllm-int4kv needs a multiple of 16")
        if use_sparse:
            reasons.append(f"vllm-int4kv does not support sparse attention; {HINT}")
        if use_mm_prefix or use_per_head_quant_scales:
            reasons.append("vllm-int4kv does not support multimodal prefix attention or checkpoint "
                           f"per-head KV scales; {HINT}")
        unsupported = [name for name in ("use_non_causal", "use_batch_invariant", "use_pcp", "use_dcp",
                                         "use_rswa", "use_adaptive_verification") if flags.get(name)]
        if unsupported:
            reasons.append(f"vllm-int4kv does not support {', '.join(unsupported)}; {HINT}")
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
            raise ValueError(f"vllm-int4kv does not support {sorted(unsupported)}; {HINT}")
        if sinks is not None and sinks.shape != (num_heads,):
            raise ValueError(f"attention sinks must hold one logit per query head ({num_heads}), got "
                             f"{tuple(sinks.shape)}")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"vllm-int4kv supports decoder self-attention only, not {attn_type}; {HINT}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(engine.unsupported_cache_dtype(kv_cache_dtype))
        engine.remember_config()
        if engine.config() is not None:
            layers.check_entries(engine.config())
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

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # The model is built: give each of our layers its own backend class, before vLLM asks for pages.
        if engine.config() is not None:
            layers.specialize(engine.config(), Int4KVBackend, Int4KVBackend.for_layer)

    def _layout_for(self, layer, kv_cache: torch.Tensor, model_dtype: torch.dtype):
        if self._policy is None:  # the layout vLLM sized this layer's pages for (customize_spec)
            backend = getattr(layer, "attn_backend", None)
            backend = backend if isinstance(backend, type) and issubclass(backend, Int4KVBackend) else Int4KVBackend
            self._policy = backend.layer_policy(self.kv_cache_dtype)[0]
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
        layout = self._layout_for(layer, kv_cache, key.dtype)
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
        layout = self._layout_for(layer, kv_cache, query.dtype)
        return ops.attend(query, ops.cache_runs(kv_cache, layout), layout, attn_metadata, output,
                          impl=self.impl, rotated=self._policy.rotate, sm_scale=self.scale,
                          sliding_window=self.sliding_window, softcap=self.logits_soft_cap,
                          sinks=None if self.sinks is None else self.sinks.float(),  # (fp32: a no-op)
                          alibi_slopes=self.alibi_slopes)
