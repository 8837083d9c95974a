"""``--kv-cache-dtype-skip-layers`` beside our pages: which layers vLLM keeps unquantized, and the
entries that would keep nothing, which stop start-up here where vLLM would ignore them.

vLLM hands a layer it keeps the cache dtype ``auto`` while the engine asked for ``int4_per_token_head``;
the backend gives such a layer ``policy.UNQUANTIZED`` pages in the same block pool. The functions take
vLLM's config (or anything with the same fields); vLLM itself is imported only to read the built layers.
"""
from __future__ import annotations

from ..policy.layout import is_layer_index

QUANTIZED_CACHE_DTYPE = "int4_per_token_head"


def kept_unquantized(layer_cache_dtype: str, config) -> bool:
    """Whether vLLM keeps a layer with ``layer_cache_dtype`` unquantized in this engine."""
    return (layer_cache_dtype == "auto" and config is not None
            and config.cache_config.cache_dtype == QUANTIZED_CACHE_DTYPE
            and bool(config.cache_config.kv_cache_dtype_skip_layers))


def check_entries(config) -> None:
    """``--kv-cache-dtype-skip-layers`` entries vLLM would silently ignore stop start-up instead: vLLM
    compares each entry with ``str(layer index)``, so ``99`` on a 30-layer model or ``01`` keeps nothing
    unquantized."""
    names = config.cache_config.kv_cache_dtype_skip_layers
    if not names:
        return
    if config.cache_config.cache_dtype != QUANTIZED_CACHE_DTYPE:
        raise ValueError("--kv-cache-dtype-skip-layers keeps the named layers unquantized beside "
                         "quantized ones: use it with --kv-cache-dtype int4_per_token_head (with "
                         "auto every layer follows VLLM_INT4KV_POLICY)")
    num_layers = getattr(config.model_config.hf_text_config, "num_hidden_layers", None)
    unknown = [name for name in names if name != "sliding_window" and not (
        is_layer_index(name) and (num_layers is None or int(name) < num_layers))]
    if unknown:
        indices = f"layer indices 0 to {num_layers - 1}" if num_layers else "layer indices"
        raise ValueError(f"--kv-cache-dtype-skip-layers {' '.join(unknown)}: no such layer; give {indices} "
                         "as plain numbers, or sliding_window (vLLM would ignore these and quantize the "
                         "layers you meant to keep)")


def layer_facts(config) -> dict:
    """What ``--kv-cache-dtype-skip-layers`` did to this worker's attention layers (a pipeline stage
    holds only its own): the index of each layer, the indices of those kept unquantized, whether a kept
    one slides, and layers that read the cache of a layer kept differently (KV sharing)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    layers = get_layers_from_vllm_config(config, Attention)
    facts = {"indices": set(), "kept": set(), "sliding_kept": False, "shared": []}
    for name, layer in layers.items():
        index, kept = extract_layer_index(name), layer.kv_cache_dtype == "auto"
        facts["indices"].add(index)
        if kept:
            facts["kept"].add(index)
            facts["sliding_kept"] |= layer.sliding_window is not None
        target = layers.get(layer.kv_sharing_target_layer_name or "")
        if target is not None and (target.kv_cache_dtype == "auto") != kept:
            facts["shared"].append((name, layer.kv_sharing_target_layer_name))
    return facts


def check_kept_layers(config, gather=None) -> None:
    """Entries that keep no layer stop start-up, judged on the model as built (over every pipeline
    stage with ``gather``): the index of a layer with no attention cache (a hybrid model's Mamba or
    linear-attention layers), ``sliding_window`` on a model with no sliding-window layer (Llama 4's
    chunked layers are not one to vLLM); so does a layer kept unlike the layer whose cache it reads."""
    cache = getattr(config, "cache_config", None)  # (none outside an engine)
    names = getattr(cache, "kv_cache_dtype_skip_layers", None)
    if not names or cache.cache_dtype != QUANTIZED_CACHE_DTYPE:
        return
    per_rank = gather(layer_facts(config)) if gather else [layer_facts(config)]
    indices = sorted(set().union(*(f["indices"] for f in per_rank)))
    if not indices:  # no model built in this process (a config left by an engine that has shut down)
        return
    kept = set().union(*(f["kept"] for f in per_rank))
    problems = [f"{name}: layer {name} holds no attention KV cache in this model (its attention layers: "
                f"{', '.join(map(str, indices))})"
                for name in names if is_layer_index(name) and int(name) not in kept]
    if "sliding_window" in names and not any(f["sliding_kept"] for f in per_rank):
        problems.append("sliding_window: this model has no sliding-window attention layer")
    problems += [f"{name} reads the KV cache of {target} (KV sharing) and only one of the two is named: "
                 "name both or neither" for f in per_rank for name, target in f["shared"]]
    if problems:
        raise ValueError("--kv-cache-dtype-skip-layers " + "; ".join(problems) + ". vLLM would keep nothing "
                         "unquantized for these, or read pages in the wrong format")
