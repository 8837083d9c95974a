"""vLLM 0.32's own quantized KV-cache formats, emulated in torch, for quality comparisons with ours.

Each format maps K and V ``[..., D]`` (after RoPE, as the cache receives them) to what vLLM's attention
computes with after writing them to its cache and reading them back, so that the calibration harness
(``vllm_int4kv.policy.calibration``) measures vLLM's formats exactly as it measures ours: same model, same
prompts, same held-out text. Written from vLLM's kernels (``triton_reshape_and_cache_flash.py``,
``int4_per_token_head.py``, ``triton_unified_attention.py``) and checked against them:
``tests/test_vllm_kernels.py`` writes random K/V with vLLM's own write kernels, attends with vLLM's own
attention kernel, and compares with plain attention over these emulations (fp32: equal to ~1e-6).

What vLLM stores per (token, KV head), by ``--kv-cache-dtype``:

- ``fp8``: x / scale as e4m3 (saturating), one scale per tensor: 1.0 unless the checkpoint has scales.
- ``fp8_per_token_head``: e4m3 of x / (absmax / 448), plus that fp32 scale.
- ``int8_per_token_head``: round-half-away of x / (absmax / 127), plus that fp32 scale.
- ``int4_per_token_head``: a randomized Hadamard transform (fixed signs), then asymmetric 4-bit codes
  with an integer zero-point hidden in the low 4 mantissa bits of one fp32 scale.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from vllm_int4kv.kernels.rotation import hadamard, hadamard_block
from vllm_int4kv.quality.runner import vllm_cache_bytes

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448: vLLM's FP8_MAX on CUDA
SCALE_FLOOR = 1e-6  # vLLM's lower bound on a per-(token, head) scale (an all-zero row)
RHT_SEED = 0x9E3779B9  # the seed of vLLM's fixed RHT sign vector (round 0)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """vLLM's integer rounding: add ±0.5, then truncate toward zero (as a float-to-int cast does)."""
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to e4m3 and back (Triton's store to an fp8 cache saturates; torch's cast does not)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def fp8_per_tensor(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return _to_e4m3(x.float() / scale).mul(scale).to(x.dtype)


def _absmax_scale(xf: torch.Tensor, code_max: float) -> torch.Tensor:
    """vLLM's symmetric per-(token, head) scale, ``[..., 1]``."""
    return (xf.abs().amax(-1, keepdim=True) / code_max).clamp_min(SCALE_FLOOR)


def fp8_per_token_head_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes as fp32, fp32 scale ``[..., 1]``): what vLLM's cache holds."""
    xf = x.float()
    scale = _absmax_scale(xf, E4M3_MAX)
    return _to_e4m3(xf * (1.0 / scale)), scale


def fp8_per_token_head(x: torch.Tensor) -> torch.Tensor:
    codes, scale = fp8_per_token_head_codes(x)
    return (codes * scale).to(x.dtype)


def int8_per_token_head(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    scale = _absmax_scale(xf, 127.0)
    codes = _round_half_away(xf * (1.0 / scale)).clamp(-128, 127)
    return (codes * scale).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _rht_signs(block: int) -> torch.Tensor:
    """vLLM's fixed ±1 vector: Bernoulli(0.5) draws from a CPU generator seeded with ``RHT_SEED``."""
    gen = torch.Generator(device="cpu").manual_seed(RHT_SEED)
    return 2.0 * torch.bernoulli(torch.full((block,), 0.5), generator=gen) - 1.0


def _rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """vLLM's single randomized Hadamard transform, fp32: ``H(x * s)``; inverse ``H(y) * s / block``."""
    d = x.shape[-1]
    block = hadamard_block(d)  # vLLM's blocks too: the largest power of two dividing the head size
    # vLLM's H is unnormalized (H @ H = block * I): the signs of our orthonormal one, exactly ±1
    h, s = hadamard(block, device=x.device).sign(), _rht_signs(block).to(x.device)
    xb = x.float().unflatten(-1, (d // block, block))
    y = (xb @ h) * s / block if inverse else (xb * s) @ h
    return y.flatten(-2)


def int4_per_token_head(x: torch.Tensor) -> torch.Tensor:
    """Rotate, quantize to 4 bits with an integer zero-point, dequantize with the truncated scale, rotate
    back: what vLLM's INT4 attention computes with (it rotates queries and un-rotates outputs instead)."""
    y = _rht(x).to(x.dtype).float()  # vLLM casts the rotated K/V back to the model dtype before writing
    lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp_min(SCALE_FLOOR)
    zero = _round_half_away(-lo / scale).clamp(0, 15)
    codes = _round_half_away(y * (1.0 / scale) + zero).clamp(0, 15)
    # the zero-point (0..15) replaces the low 4 mantissa bits of the stored fp32 scale
    stored_scale = (scale.view(torch.int32) & -16).view(torch.float32)
    return _rht((codes - zero) * stored_scale, inverse=True).to(x.dtype)


@dataclass(frozen=True)
class VllmFormat:
    name: str  # vLLM's --kv-cache-dtype
    quantize: Callable[[torch.Tensor], torch.Tensor]  # applied to K and to V alike

    def bytes_per_token(self, head_dim: int) -> int:
        """Bytes per token per KV head, K and V, as vLLM's Triton backend sizes the page."""
        return vllm_cache_bytes(self.name, head_dim)

    def fake_quantize_kv(self, key: torch.Tensor, value: torch.Tensor):
        return self.quantize(key), self.quantize(value)


FORMATS = {f.name: f for f in (
    VllmFormat("fp8", fp8_per_tensor),
    VllmFormat("fp8_per_token_head", fp8_per_token_head),
    VllmFormat("int8_per_token_head", int8_per_token_head),
    VllmFormat("int4_per_token_head", int4_per_token_head),
)}
