"""Where the calibration runs, in which dtype, and whether the model fits there.

``auto`` calibrates with the whole model in HF transformers. At engine start-up that happens on rank 0's
GPU, next to vLLM's own weights (its shard, under tensor parallelism), so a model vLLM serves comfortably
may not fit a second time. This module

- resolves the dtype the way ``vllm serve`` resolves ``--dtype auto``, so a decision stored ahead of time
  by ``vllm-int4kv calibrate`` is the one the engine looks up (same key);
- refuses a model whose weights alone exceed the free memory before loading any of it;
- turns running out of memory into advice: calibrate ahead of time, spread over every GPU
  (``--device auto``) or on CPU, or set a fixed policy.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

from .layout import VLLM_DTYPE_NAMES

SPREAD = "auto"  # --device auto: HF's device_map="auto", every visible GPU first, then CPU memory
DTYPES = {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float": torch.float32, "float32": torch.float32}
DTYPE_CHOICES = VLLM_DTYPE_NAMES  # vllm serve --dtype: auto, then the names DTYPES maps
FP16_UNSTABLE = ("gemma2", "gemma3", "gemma3_text", "glm4")  # vLLM serves these in bf16 under auto

logger = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The model cannot be put where the calibration should run; the message says what to do."""


class CalibrationOutOfMemory(PlacementError):
    """The model does not fit where the calibration runs; the message says what to do instead."""


def pick_device(device: str | None) -> str:
    """``cuda`` when a GPU is visible, else ``cpu``; ``auto`` (SPREAD) and explicit devices pass through."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def device_type(device: str) -> str:
    """``cuda`` or ``cpu``: what the measured numbers depend on, so what the decision's key records.
    A model spread over GPUs computes on them; on a machine without one, SPREAD means CPU."""
    if device == SPREAD:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint's config declares, looked up where vLLM looks (the root config, then
    the text, vision and encoder sub-configs), if any."""
    for cfg in (config, getattr(config, "get_text_config", lambda: config)(),
                getattr(config, "vision_config", None), getattr(config, "encoder_config", None)):
        value = getattr(cfg, "dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value, None)
        if isinstance(value, torch.dtype):
            return value
    return None


def serving_dtype(dtype, config=None, *, model: str | None = None, revision: str | None = None) -> torch.dtype:
    """The dtype vLLM serves the model in: ``dtype`` itself, or for ``auto`` / None vLLM's own answer
    (asked of the installed vLLM when ``model`` is given, else ``auto_dtype_without_vllm``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        try:
            return DTYPES[str(dtype).lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)}") from None
    resolved = vllm_auto_dtype(model, config, revision) if model is not None and config is not None else None
    return resolved or auto_dtype_without_vllm(config)


def vllm_auto_dtype(model: str, config, revision: str | None) -> torch.dtype | None:
    """What ``vllm serve MODEL`` picks under ``--dtype auto`` on this machine; None without vLLM."""
    try:
        from vllm.config.model import _get_and_verify_dtype
    except ImportError:  # e.g. a GPU box that only calibrates
        return None
    try:
        return _get_and_verify_dtype(model, config, "auto", is_pooling_model=False, revision=revision)
    except Exception as exc:  # noqa: BLE001 - another vLLM version; our reading of 0.32 follows
        logger.warning("vllm-int4kv: could not ask vLLM how it resolves --dtype auto (%s: %s); using "
                       "vllm-int4kv's reading of vLLM 0.32", type(exc).__name__, exc)
        return None


def auto_dtype_without_vllm(config=None) -> torch.dtype:
    """vLLM 0.32's ``--dtype auto`` for a causal LM, written out: the checkpoint's 16-bit dtype, bf16
    for fp32 (or undeclared) checkpoints; fp16 where the GPU has no bf16 (before Ampere), bf16 for the
    models vLLM keeps off fp16. Unlike vLLM it does not read an undeclared dtype from the weights."""
    stored = checkpoint_dtype(config) if config is not None else None
    bf16 = not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0)
    if stored == torch.float16 and getattr(config, "model_type", None) not in FP16_UNSTABLE:
        return stored
    if stored == torch.bfloat16 and bf16:
        return stored
    return torch.bfloat16 if bf16 else torch.float16


def compute_dtype(dtype, device: str, config=None, *, model: str | None = None,
                  revision: str | None = None) -> torch.dtype:
    """What the calibration computes in: fp32 on CPU (16-bit matmuls there are slow or emulated), the
    serving dtype on GPUs."""
    if device_type(device) == "cpu":
        return torch.float32
    return serving_dtype(dtype, config, model=model, revision=revision)


def placement(device: str) -> dict:
    """Extra ``from_pretrained`` arguments: SPREAD loads through accelerate's device map."""
    if device != SPREAD:
        return {}
    if importlib.util.find_spec("accelerate") is None:  # transformers needs it for device_map="auto"
        raise PlacementError("--device auto spreads the model with transformers' device_map='auto', which "
                             "needs the accelerate package: pip install accelerate")
    return {"device_map": "auto"}


# -- memory -------------------------------------------------------------------------------------------
def weight_bytes(config, dtype: torch.dtype, trust_remote_code: bool = False) -> int | None:
    """Bytes of the model's parameters in ``dtype``, counted on the meta device (nothing is allocated).
    None when unknown: quantized checkpoints (they load smaller than their parameter count says), or a
    model class that cannot be built from its config."""
    if getattr(config, "quantization_config", None) is not None:
        return None
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - only an estimate; loading will say what is wrong
        return None
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def free_bytes(device: str) -> int | None:
    """Free memory on one GPU; None for CPU and for SPREAD (accelerate plans that itself)."""
    if device == SPREAD or device_type(device) != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(torch.device(device))[0]


def advice(model: str, device: str, detail: str) -> str:
    where = "spread over every GPU and CPU memory" if device == SPREAD else f"on {device}"
    text = (f"vllm-int4kv: the auto-policy calibration does not fit {where}: it runs the whole model in HF "
            f"transformers ({detail}")
    if device == SPREAD:
        return text + (f"). Calibrate on CPU instead: `vllm-int4kv calibrate {model} --device cpu` (fp32: "
                       "about 4 bytes of RAM per parameter), then serve with VLLM_INT4KV_POLICY set to the "
                       "policy it prints; or set VLLM_INT4KV_POLICY to a fixed policy such as k8v4.")
    return text + (f"; at engine start-up it shares rank 0's GPU with vLLM's own weights). Calibrate before "
                   f"serving instead, where it fits: `vllm-int4kv calibrate {model} --device auto` spreads the "
                   "model over every visible GPU, then CPU memory (needs `pip install accelerate`), and stores "
                   "the decision that `vllm serve` finds when --dtype, --revision and VLLM_INT4KV_KL_BUDGET are "
                   f"the same and --prompts, --max-tokens and --budget are left at their defaults; or "
                   f"`vllm-int4kv calibrate {model} --device cpu` (fp32: about 4 bytes of RAM per parameter), "
                   "then serve with VLLM_INT4KV_POLICY set to the policy it prints. Or set VLLM_INT4KV_POLICY "
                   "to a fixed policy such as k8v4.")


def check_fits(model: str, config, dtype: torch.dtype, device: str, *, trust_remote_code: bool = False,
               free: int | None = None) -> None:
    """Refuse before loading when the weights alone exceed the free memory on ``device`` (``free``:
    measured when None). Activations are not counted: running out of them is caught as it happens."""
    free = free_bytes(device) if free is None else free
    if free is None:
        return
    need = weight_bytes(config, dtype, trust_remote_code)
    if need is not None and need > free:
        raise CalibrationOutOfMemory(advice(model, device, f"{need / 2**30:.1f} GiB of weights in "
                                            f"{str(dtype).removeprefix('torch.')}, {free / 2**30:.1f} GiB free"))


@contextlib.contextmanager
def explained_out_of_memory(model: str, device: str):
    """Within the block, running out of device memory raises CalibrationOutOfMemory with the ways out."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first_line = (str(exc).splitlines() or ["out of memory"])[0]
        # from None: the advice replaces CUDA's allocator report (its first line is kept). The tensors
        # that did not fit stay referenced by the original error; start-up or the command ends anyway.
        raise CalibrationOutOfMemory(advice(model, device, first_line)) from None
