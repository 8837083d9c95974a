"""What differs between the vLLM versions the plugin supports, in one place (0.32, 0.33, 0.34).

- 0.33 lets a plugin register a ``--kv-cache-dtype`` name of its own (``register_kv_cache_dtype``): ours
  is ``int4kv``, the same pages as ``int4_per_token_head``. On 0.32 the list of names is closed, and
  ``int4_per_token_head`` (or ``auto``) selects our pages. The handler's quant mode is vLLM's
  ``INT4_PER_TOKEN_HEAD`` (what a layer of ours reports under either name): vLLM's ``KVQuantMode.CUSTOM``
  is an alias of ``OCTAVE_K3V4`` in 0.33.0 and 0.34.0, so it is never used.
- 0.34 raises the default block size from 16 to 64 tokens and backs only a prefix of the blocks during
  warm-up (the extensible KV cache, on CUDA/ROCm): the kernels read and write only the blocks the block
  table and slot mapping name, and accept any block size that is a multiple of 16.
- Everything else the backend uses (``customize_spec``, the impl and builder interfaces, the CPU
  platform's backend selection, the spec's ``state_content_bytes``) is the same in the three versions.
"""
from __future__ import annotations

import re

SUPPORTED = ((0, 32), (0, 34))  # first and last (major, minor), both included
SUPPORTED_TEXT = "0.32 to 0.34"
INT4_PER_TOKEN_HEAD = "int4_per_token_head"
OWN_CACHE_DTYPE = "int4kv"


def parse_version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"cannot read a vLLM version from {text!r}")
    return int(match.group(1)), int(match.group(2))


def vllm_version() -> tuple[int, int]:
    import vllm

    return parse_version(vllm.__version__)


def unsupported_version(version: tuple[int, int] | None = None) -> str | None:
    """Why this vLLM cannot run the backend, or None."""
    version = version or vllm_version()
    if SUPPORTED[0] <= version <= SUPPORTED[1]:
        return None
    return (f"vllm-int4kv supports vLLM {SUPPORTED_TEXT}; this is vLLM {version[0]}.{version[1]}: install a "
            "supported vLLM (pip install 'vllm>=0.32,<0.35') or drop --attention-backend CUSTOM")


def has_own_cache_dtype(version: tuple[int, int] | None = None) -> bool:
    """Whether ``--kv-cache-dtype int4kv`` exists (0.33 and later register it)."""
    return (version or vllm_version()) >= (0, 33)


def quantized_cache_dtypes(version: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The ``--kv-cache-dtype`` names that select our quantized pages."""
    return (INT4_PER_TOKEN_HEAD, OWN_CACHE_DTYPE) if has_own_cache_dtype(version) else (INT4_PER_TOKEN_HEAD,)


def cache_dtypes(version: tuple[int, int] | None = None) -> tuple[str, ...]:
    """Every ``--kv-cache-dtype`` our backend accepts: ``auto`` (pages follow the policy) and the above."""
    return ("auto", *quantized_cache_dtypes(version))


def register_own_cache_dtype() -> bool:
    """Register ``int4kv`` with vLLM (0.33 and later); True when it is registered. Safe to repeat."""
    if not has_own_cache_dtype():
        return False
    import torch
    from vllm.config import cache as cache_config
    from vllm.v1.kv_cache_interface import KVQuantMode

    if OWN_CACHE_DTYPE in cache_config.KV_CACHE_DTYPES:
        return True

    class Int4KVCacheDType:
        """vLLM's view of our pages: uint8 bytes, whose layout the backend alone knows."""

        name = OWN_CACHE_DTYPE

        def torch_dtype(self) -> torch.dtype:
            return torch.uint8

        def quant_mode(self):
            return KVQuantMode.INT4_PER_TOKEN_HEAD

    cache_config.register_kv_cache_dtype(OWN_CACHE_DTYPE)(Int4KVCacheDType)
    return True
