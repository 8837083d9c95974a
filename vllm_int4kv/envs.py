"""Every environment variable the plugin reads, in one place (the README has the same table)."""
from __future__ import annotations

import math
import os
from pathlib import Path

ENV_VARS = {
    "VLLM_INT4KV_POLICY": "K/V precision: auto (default: calibrate at start-up), a policy such as k4v4, "
                          "k8v4, k16v4, k8v8, k16v16 (optionally with -g<N> / -rot), a map with a layout "
                          "per layer such as k4v4-rot;0-2,8:k8v4, or the path of a JSON map file",
    "VLLM_INT4KV_IMPL": "attention implementation: triton (default on GPU) or torch (default on CPU)",
    "VLLM_INT4KV_CACHE_DIR": "where auto-policy decisions are cached (default ~/.cache/vllm_int4kv)",
    "VLLM_INT4KV_KL_BUDGET": "quality budget of the auto policy: mean next-token KL (nats) vs full precision",
    "VLLM_INT4KV_KL_MARGIN": "fraction of the budget the calibration prompts may use (default 0.5), so that "
                             "text unlike them stays within the budget",
    "VLLM_INT4KV_CHECK_BLOCKS": "1: on a GPU too, check every block id and slot a launch uses before it runs (a "
                                "device sync per launch; on CPU the checks always run)",
    "VLLM_INT4KV_TEST_RANK_POLICY": "testing only: RANK:POLICY makes that rank ask for another policy, to check "
                                    "that mismatched ranks stop start-up",
}


def policy_name(rank: int = 0) -> str:
    override = os.environ.get("VLLM_INT4KV_TEST_RANK_POLICY", "")
    if override:
        target, _, name = override.partition(":")
        if target.strip() == str(rank):
            return name.strip()
    return os.environ.get("VLLM_INT4KV_POLICY", "auto").strip() or "auto"


def impl_name(default: str) -> str:
    value = os.environ.get("VLLM_INT4KV_IMPL", default).strip().lower()
    if value not in ("triton", "torch"):
        raise ValueError(f"VLLM_INT4KV_IMPL={value!r}: use 'triton' or 'torch'")
    return value


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "vllm_int4kv"
    return Path(os.environ.get("VLLM_INT4KV_CACHE_DIR") or default).expanduser()  # empty: unset


def _number(name: str) -> tuple[str, float | None]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return raw, None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    return raw, value


def kl_budget(default: float) -> float:
    raw, value = _number("VLLM_INT4KV_KL_BUDGET")
    if value is None:
        return default
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"VLLM_INT4KV_KL_BUDGET={raw!r}: give the auto policy's quality budget as a number of "
                         f"nats > 0, such as {default:g} (about +1 % perplexity), or unset it")
    return value


def kl_margin(default: float) -> float:
    raw, value = _number("VLLM_INT4KV_KL_MARGIN")
    if value is None:
        return default
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"VLLM_INT4KV_KL_MARGIN={raw!r}: give the fraction of the budget the calibration "
                         f"prompts may use, 0 < margin <= 1 (default {default:g}), or unset it")
    return value
