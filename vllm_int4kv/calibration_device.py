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

import torch

SPREAD = "auto"  # --device auto: HF's device_map="auto", every visible GPU first, then CPU memory
# vLLM's names for --dtype
DTYPES = {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float": torch.float32, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)


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
    """The dtype the checkpoint's config declares (``dtype``, formerly ``torch_dtype``), if any."""
    for cfg in (config, getattr(config, "get_text_config", lambda: config)()):
        value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value, None)
        if isinstance(value, torch.dtype):
            return value
    return None


def serving_dtype(dtype, config=None) -> torch.dtype:
    """The dtype vLLM serves the model in: ``dtype`` itself, or for ``auto`` / None what vLLM 0.32 picks
    on CPUs and on GPUs from Ampere on: the checkpoint's 16-bit dtype, bf16 for fp32 checkpoints (fp16 on
    older GPUs, which have no bf16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        try:
            return DTYPES[str(dtype).lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)}") from None
    stored = checkpoint_dtype(config) if config is not None else None
    if stored in (torch.float16, torch.bfloat16):
        return stored
    bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float16


def compute_dtype(dtype, device: str, config=None) -> torch.dtype:
    """What the calibration computes in: fp32 on CPU (16-bit matmuls there are slow or emulated), the
    serving dtype on GPUs."""
    return torch.float32 if device_type(device) == "cpu" else serving_dtype(dtype, config)


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
    return (f"vllm-int4kv: the auto-policy calibration does not fit on {device}: it runs the whole model "
            f"in HF transformers ({detail}; at engine start-up it shares rank 0's GPU with vLLM's own "
            f"weights). Calibrate before serving instead, where it fits: `vllm-int4kv calibrate {model} "
            "--device auto` spreads the model over every visible GPU, then CPU memory (needs `pip install "
            "accelerate`), and stores the decision that `vllm serve` with the same --dtype, --revision and "
            f"VLLM_INT4KV_KL_BUDGET looks up; or `vllm-int4kv calibrate {model} --device cpu` (fp32: about "
            "4 bytes of RAM per parameter), then serve with VLLM_INT4KV_POLICY set to the policy it prints. "
            "Or set VLLM_INT4KV_POLICY to a fixed policy such as k8v4.")


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
        # from None: the original traceback's frames hold the tensors that did not fit
        raise CalibrationOutOfMemory(advice(model, device, first_line)) from None
