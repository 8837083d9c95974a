"""Which layout each attention layer of the engine gets, and the start-up checks of it.

Two sources: the policy map (``VLLM_INT4KV_POLICY``: one layout per layer, or one for all), and vLLM's
``--kv-cache-dtype-skip-layers`` beside a uniform policy (vLLM hands the layers it keeps the cache dtype
``auto`` while the engine asked for quantized pages; they get ``policy.UNQUANTIZED`` pages).

vLLM asks the backend class for a layer's page size (``customize_spec``) without saying which layer it
is for. So once the model is built, each of our layers gets a subclass of the backend that knows its
index (``specialize``); vLLM itself makes such subclasses for chunked local attention. Entries that would
keep nothing, maps naming layers the model does not have, and maps that split layers sharing one KV cache
stop start-up here, judged on the model as built over every pipeline stage.
"""
from __future__ import annotations

from ..policy.layer_map import PolicyMap, format_layers
from ..policy.layout import is_layer_index
from .compat import quantized_cache_dtypes


def kept_unquantized(layer_cache_dtype: str, config) -> bool:
    """Whether vLLM keeps a layer with ``layer_cache_dtype`` unquantized in this engine."""
    return (layer_cache_dtype == "auto" and config is not None
            and config.cache_config.cache_dtype in quantized_cache_dtypes()
            and bool(config.cache_config.kv_cache_dtype_skip_layers))


def check_entries(config) -> None:
    """``--kv-cache-dtype-skip-layers`` entries vLLM would silently ignore stop start-up instead: vLLM
    compares each entry with ``str(layer index)``, so ``99`` on a 30-layer model or ``01`` keeps nothing
    unquantized."""
    names = config.cache_config.kv_cache_dtype_skip_layers
    if not names:
        return
    if config.cache_config.cache_dtype not in quantized_cache_dtypes():
        raise ValueError("--kv-cache-dtype-skip-layers keeps the named layers unquantized beside "
                         f"quantized ones: use it with --kv-cache-dtype {quantized_cache_dtypes()[-1]} (with "
                         "auto every layer follows VLLM_INT4KV_POLICY)")
    num_layers = getattr(config.model_config.hf_text_config, "num_hidden_layers", None)
    unknown = [name for name in names if name != "sliding_window" and not (
        is_layer_index(name) and (num_layers is None or int(name) < num_layers))]
    if unknown:
        indices = f"layer indices 0 to {num_layers - 1}" if num_layers else "layer indices"
        raise ValueError(f"--kv-cache-dtype-skip-layers {' '.join(unknown)}: no such layer; give {indices} "
                         "as plain numbers, or sliding_window (vLLM would ignore these and quantize the "
                         "layers you meant to keep)")


def _attention_layers(config) -> dict:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    return get_layers_from_vllm_config(config, Attention)


def layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(name)


def layer_facts(config) -> dict:
    """This worker's attention layers (a pipeline stage holds only its own): their indices, those kept
    unquantized, whether a kept one slides, whether any slides, and layers that read another layer's KV
    cache (KV sharing) as ``(name, target name, kept unlike it)``. Nothing outside an engine."""
    facts = {"indices": set(), "kept": set(), "sliding_kept": False, "sliding": False, "shared": []}
    if getattr(config, "compilation_config", None) is None:
        return facts
    layers = _attention_layers(config)
    for name, layer in layers.items():
        index, kept = layer_index(name), layer.kv_cache_dtype == "auto"
        facts["indices"].add(index)
        facts["sliding"] |= layer.sliding_window is not None
        if kept:
            facts["kept"].add(index)
            facts["sliding_kept"] |= layer.sliding_window is not None
        target = layers.get(layer.kv_sharing_target_layer_name or "")
        if target is not None:
            facts["shared"].append((name, layer.kv_sharing_target_layer_name,
                                    (target.kv_cache_dtype == "auto") != kept))
    return facts


def check_kept_layers(config, per_rank: list[dict]) -> None:
    """Entries that keep no layer stop start-up, judged on the model as built (``per_rank``: every
    pipeline stage's ``layer_facts``): the index of a layer with no attention cache (a hybrid model's Mamba
    or linear-attention layers), ``sliding_window`` on a model with no sliding-window layer (Llama 4's
    chunked layers are not one to vLLM); so does a layer kept unlike the layer whose cache it reads."""
    cache = getattr(config, "cache_config", None)  # (none outside an engine)
    names = getattr(cache, "kv_cache_dtype_skip_layers", None)
    if not names or cache.cache_dtype not in quantized_cache_dtypes():
        return
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
                 "name both or neither" for f in per_rank for name, target, unlike in f["shared"] if unlike]
    if problems:
        raise ValueError("--kv-cache-dtype-skip-layers " + "; ".join(problems) + ". vLLM would keep nothing "
                         "unquantized for these, or read pages in the wrong format")


def check_map(policy_map: PolicyMap, config, per_rank: list[dict]) -> None:
    """A map that names layers the built model has no attention cache for (or, without a default, leaves
    one out), gives two layers sharing one KV cache different layouts, or comes with
    ``--kv-cache-dtype-skip-layers`` stops start-up."""
    if policy_map.single is not None:
        return
    indices = set().union(*(f["indices"] for f in per_rank))
    if not indices:
        return
    cache = getattr(config, "cache_config", None)
    if getattr(cache, "kv_cache_dtype_skip_layers", None):
        kept = ",".join(cache.kv_cache_dtype_skip_layers)
        raise ValueError(f"VLLM_INT4KV_POLICY={policy_map.name} gives layers their own layouts; drop "
                         f"--kv-cache-dtype-skip-layers and write the layers to keep into the map instead "
                         f"({policy_map.name};{kept}:k16v16, with layer indices)")
    policy_map.check_layers(indices)
    for f in per_rank:
        for name, target, _ in f["shared"]:
            if policy_map.for_layer(layer_index(name)) != policy_map.for_layer(layer_index(target)):
                raise ValueError(f"policy map {policy_map.name}: {name} reads the KV cache of {target} (KV "
                                 "sharing): give both layers the same layout")


def specialize(config, base: type, subclass_for) -> None:
    """Give each attention layer served by ``base`` the backend class ``subclass_for(index)``, whose
    ``customize_spec`` then knows the layer (a layer sharing another's KV cache takes the other's index).
    Safe to call again: layers already given a subclass keep it."""
    layers = _attention_layers(config)
    for name, layer in layers.items():
        if layer.attn_backend is base:
            target = layer.kv_sharing_target_layer_name
            layer.attn_backend = subclass_for(layer_index(target if target in layers else name))


def all_indices(per_rank: list[dict]) -> list[int]:
    return sorted(set().union(*(f["indices"] for f in per_rank)))


def describe_map(policy_map: PolicyMap, indices: list[int], head_dim: int, num_kv_heads: int, elem_bytes: int,
                 source: str) -> str:
    """The start-up line of a map: its layouts and layers, mean bytes per token per layer, capacity gain."""
    sizes = {index: policy_map.slot_bytes(index, head_dim, elem_bytes) for index in indices}
    mean = sum(sizes.values()) / len(sizes)
    parts = []
    for policy in policy_map.policies:
        layers = [i for i in indices if policy_map.for_layer(i) == policy]
        if layers:
            parts.append(f"{policy.name} on layer{'s' * (len(layers) > 1)} {format_layers(layers)} "
                         f"({policy.slot_bytes(head_dim, elem_bytes)} B)")
    return (f"vllm-int4kv: KV policy map {policy_map.name}: {'; '.join(parts)}; mean {mean:.1f} B/token/KV head "
            f"over {len(indices)} layers ({mean * num_kv_heads:.0f} bytes/token/layer with {num_kv_heads} KV "
            f"heads), {4 * head_dim / mean:.2f}x the tokens of a BF16 cache (from {source})")
