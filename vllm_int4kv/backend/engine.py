"""What the backend needs of the engine around it: vLLM's config, the ranks of its workers, and the
engine's one policy map, decided once for all of them."""
from __future__ import annotations

import torch

from vllm.config import get_current_vllm_config_or_none
from vllm.distributed.parallel_state import get_world_group

from ..policy import current
from ..policy.decide import ModelTarget
from ..policy.layer_map import PolicyMap

HINT = "or drop --attention-backend CUSTOM to use vLLM's default attention"

# The VllmConfig seen while the model was built. customize_spec runs later, outside any
# set_current_vllm_config() context, and the auto policy needs the model config.
_vllm_config = None


def config():
    return get_current_vllm_config_or_none() or _vllm_config


def remember_config() -> None:
    global _vllm_config
    _vllm_config = config()


def forget_config() -> None:
    """Forget an engine that has shut down (tests that start several engines in one process)."""
    global _vllm_config
    _vllm_config = None


def model_dtype(spec_dtype: torch.dtype) -> torch.dtype:
    """The model's activation dtype (``int4_per_token_head`` specs carry uint8 instead)."""
    if spec_dtype.is_floating_point:
        return spec_dtype
    engine_config = config()
    if engine_config is None or engine_config.model_config is None:
        raise RuntimeError("vllm-int4kv: cannot tell the model dtype of a uint8 KV cache spec")
    return engine_config.model_config.dtype


def checkpoint_kv_scheme(engine_config) -> str | None:
    """What the checkpoint's quantization config asks of the KV cache, if anything: vLLM turns
    ``--kv-cache-dtype auto`` into that (fp8 for compressed-tensors' ``kv_cache_scheme`` and ModelOpt's
    ``kv_cache_quant_algo``), so a user who typed no cache dtype still gets one we do not store."""
    hf_config = getattr(getattr(engine_config, "model_config", None), "hf_config", None)
    quant = getattr(hf_config, "quantization_config", None)
    if not isinstance(quant, dict):
        return None
    inner = quant.get("quantization") if isinstance(quant.get("quantization"), dict) else {}
    for source in (quant, inner):
        for key in ("kv_cache_scheme", "kv_cache_quant_algo"):
            if source.get(key):
                return f"{key} {source[key]}"
    return None


def unsupported_cache_dtype(kv_cache_dtype: str) -> str:
    """Why ``kv_cache_dtype`` stops start-up, and what to pass instead."""
    scheme = checkpoint_kv_scheme(config())
    if scheme:
        return (f"this checkpoint's quantization config asks for a {kv_cache_dtype} KV cache ({scheme}), "
                "which vLLM picks when --kv-cache-dtype is auto, and vllm-int4kv stores its own pages "
                "instead: pass --kv-cache-dtype int4_per_token_head (the checkpoint's KV scales are then "
                f"not used), {HINT}")
    from .compat import quantized_cache_dtypes

    return (f"--kv-cache-dtype {kv_cache_dtype} is not supported by vllm-int4kv: use --kv-cache-dtype auto "
            f"(pages follow VLLM_INT4KV_POLICY) or {' or '.join(quantized_cache_dtypes())}")


def ranks() -> tuple[int, int]:
    """(rank, world size) of this engine's workers (tensor x pipeline parallel)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    group = get_world_group().cpu_group
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(obj) -> list:
    """A small picklable object from every worker (gloo, CPU), in rank order."""
    import torch.distributed as dist

    group = get_world_group().cpu_group
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def gather_or_own(obj) -> list:
    """``all_gather`` over several workers; ``[obj]`` alone."""
    return all_gather(obj) if ranks()[1] > 1 else [obj]


def model_target(engine_config) -> ModelTarget | None:
    """The model ``auto`` calibrates, as vLLM serves it (None outside an engine)."""
    model_config = getattr(engine_config, "model_config", None)
    if model_config is None:
        return None
    return ModelTarget(model_config.model, revision=model_config.revision, dtype=model_config.dtype,
                       trust_remote_code=model_config.trust_remote_code)


def engine_policy() -> PolicyMap:
    """The engine's policy map. Every worker calls this at the same point (the first customize_spec,
    inside vLLM's collective get_kv_cache_spec), so a collective here cannot leave a rank waiting alone."""
    rank, world = ranks()
    return current.resolve_policy(lambda: model_target(config()), all_gather=all_gather if world > 1 else None,
                                  rank=rank)
