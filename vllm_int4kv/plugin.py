"""vLLM general-plugin entry point: makes ``--attention-backend CUSTOM`` mean our backend.

vLLM calls ``register()`` in every process (API server, engine core, workers), possibly several times,
so it is cheap (no kernel or backend import: the backend is named by its class path), idempotent, and
logs once. It changes nothing for users who do not select ``CUSTOM``:

- ``AttentionBackendEnum.CUSTOM`` is vLLM's empty slot for third-party backends; we fill it.
- The CPU platform ignores ``--attention-backend`` and always answers ``CPU_ATTN``. We wrap its
  selection so that ``CUSTOM`` is honoured; every other choice goes to the original unchanged.
"""
from __future__ import annotations

import logging

# A child of vLLM's logger, so our lines appear (and are filtered) with vLLM's own.
logger = logging.getLogger("vllm.int4kv")

BACKEND_PATH = "vllm_int4kv.backend.attention_backend.Int4KVBackend"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        # Another plugin took the slot first; taking it from under that plugin would be a surprise.
        logger.warning("vllm-int4kv: --attention-backend CUSTOM already means %s; not registering %s",
                       custom.get_path(), BACKEND_PATH)
    else:
        register_backend(custom, BACKEND_PATH)
        _wrap_cpu_backend_selection()
        _register_cache_dtype()
        logger.info("vllm-int4kv: registered as --attention-backend CUSTOM (%s)", BACKEND_PATH)
    _registered = True


def _wrap_cpu_backend_selection() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    original = platform_cls.__dict__.get("get_attn_backend_cls")
    if original is None or getattr(original, "_int4kv_original", None) is not None:
        return  # not the shape we know, or already wrapped

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if selected_backend != AttentionBackendEnum.CUSTOM:
            return original.__get__(None, cls)(selected_backend, attn_selector_config, num_heads=num_heads)
        return _select_custom(attn_selector_config)

    wrapper = classmethod(get_attn_backend_cls)
    wrapper._int4kv_original = original  # lets tests (and us) see and undo the wrap
    platform_cls.get_attn_backend_cls = wrapper


def _register_cache_dtype() -> None:
    """vLLM 0.33 and later: ``--kv-cache-dtype int4kv`` names our pages (0.32: int4_per_token_head)."""
    from .backend.compat import register_own_cache_dtype

    register_own_cache_dtype()


def unwrap_cpu_backend_selection() -> None:
    """Undo the CPU selection wrap (tests restore the platform they patched)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    wrapper = platform_cls.__dict__.get("get_attn_backend_cls")
    original = getattr(wrapper, "_int4kv_original", None)
    if original is not None:
        platform_cls.get_attn_backend_cls = original


def _select_custom(attn_selector_config) -> str:
    """What the GPU platforms do for an explicitly selected backend: validate it, or stop."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend_cls = AttentionBackendEnum.CUSTOM.get_class()
    reasons = backend_cls.validate_configuration(device_capability=None, **attn_selector_config._asdict())
    if reasons:
        raise ValueError("--attention-backend CUSTOM cannot run this model: " + "; ".join(reasons))
    logger.info("vllm-int4kv: using the CUSTOM attention backend on CPU")
    path = AttentionBackendEnum.CUSTOM.get_path()
    return path
