"""The INT4/INT8 paged KV-cache format: the one place that defines where every byte lives.

vLLM hands each attention layer a uint8 tensor ``[num_blocks, num_kv_heads, block_size * slot_bytes]``
(layout LBHNC: each (block, head) owns one contiguous run). Inside a run the bytes are ours, laid out as
three planes so every tile load is contiguous::

    one (block, kv head) run, block_size = N tokens
    +----------------------------+----------------------------+-------------------------------+
    | K plane: N rows x k_bytes  | V plane: N rows x v_bytes  | param plane: N rows x p_bytes |
    +----------------------------+----------------------------+-------------------------------+

    K row (4 bits, D=128): 64 B, byte j = channel 2j (low nibble) | channel 2j+1 (high nibble)
    K row (8 bits):        D B, one unsigned code per channel
    K row (16 bits):       D raw elements of the model dtype (unquantized; 4 B each for fp32 models)
    param row:             for each quantized plane (K then V), for each channel group:
                           fp16 scale, fp16 zero           (4 B per group)

A quantized channel ``x`` is stored as code ``c = clamp(round((x - zero) / scale), 0, 2**bits - 1)`` and
read back as ``c * scale + zero`` (asymmetric min/max per (token, head, group)).

Why fp16 parameters: they cost 4 B per group instead of 8 (K4V4 at D=128: 136 B/token/head instead of
144 B, 6 % more tokens in the same memory). Rounding the parameters to fp16 would add an error of up to
2**-11 * |zero| on top of the quantization step, which matters for keys with a large common offset
(Qwen2's k_proj bias). We avoid it by quantizing *against the stored fp16 values*, chosen before the
codes are computed: the zero point is the largest fp16 at most the group's minimum, the scale the
smallest positive fp16 whose ``2**bits - 1`` steps from that zero reach the maximum (each rounded to
nearest, then moved one fp16 step where it landed on the wrong side; ``reference.quant_params``). So
every input lies inside the coded range, the error bound stays ``scale / 2``, and a large common offset
widens the range by less than one fp16 step of the zero (keys at 1000.7 + [0, 0.21]: zero 1000.5, 4-bit
scale 0.0273). Inputs are first clamped to the fp16 range (+-65504), the same saturation an fp16 cache
would apply.

Bytes per token per KV head (``slot_bytes``; K4V4 at D=128 is 136 B against 512 B in BF16):

    =======  =====  =====  =====
    (K, V)   D=64   D=128  D=256
    =======  =====  =====  =====
    K4 V4      72    136    264
    K8 V4     104    200    392
    K16 V4    164    324    644
    K8 V8     136    264    520
    K16 V8    196    388    772
    K16 V16   256    512   1024   (bf16/fp16 model; unquantized baseline)
    =======  =====  =====  =====

Optional channel groups (``k_group``/``v_group`` < head_dim) add 4 B per extra group and plane.

Head dims: any multiple of 16 from 32 to 256 (64, 80 as in Phi-2, 96 as in Phi-3, 128, 256, ...). Rows
hold exactly ``head_dim`` channels; the kernels work on the next power of two (``padded_head_dim``) and
mask the rest, so a non-power-of-two head costs no bytes in the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

QUANT_BITS = (4, 8)
KEY_BITS = (4, 8, 16)
VALUE_BITS = (4, 8, 16)
HEAD_DIMS = tuple(range(32, 257, 16))
HEAD_DIMS_TEXT = "a multiple of 16 from 32 to 256"
PARAM_BYTES_PER_GROUP = 4  # fp16 scale + fp16 zero
FP16_MAX = 65504.0


def padded_head_dim(head_dim: int) -> int:
    """The power of two the kernels' tiles span (``tl.arange`` needs one); channels past head_dim are
    masked."""
    return 1 << (head_dim - 1).bit_length()


def _plane_row_bytes(bits: int, head_dim: int, elem_bytes: int) -> int:
    return head_dim * elem_bytes if bits == 16 else head_dim * bits // 8


@dataclass(frozen=True)
class PageLayout:
    """Geometry of one (block, kv head) run of the cache. All sizes in bytes.

    ``elem_bytes`` is the size of the model's KV dtype; it only matters for 16-bit (unquantized) planes.
    ``k_group``/``v_group`` are channels per quantization group (``head_dim`` = one group per head).
    """

    head_dim: int
    block_size: int
    k_bits: int = 4
    v_bits: int = 4
    k_group: int | None = None
    v_group: int | None = None
    elem_bytes: int = 2

    def __post_init__(self):
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim {self.head_dim} is not supported: it must be {HEAD_DIMS_TEXT}")
        if self.k_bits not in KEY_BITS or self.v_bits not in VALUE_BITS:
            raise ValueError(f"bits (K={self.k_bits}, V={self.v_bits}) not supported: K in {KEY_BITS}, "
                             f"V in {VALUE_BITS}")
        if self.elem_bytes not in (2, 4):
            raise ValueError("elem_bytes must be 2 (fp16/bf16) or 4 (fp32)")
        if self.block_size < 1 or (self.block_size & (self.block_size - 1) and self.block_size % 16):
            # (planes of block_size rows stay 16-byte aligned; hybrid models get blocks such as 192)
            raise ValueError(f"block_size {self.block_size} must be a power of two or a multiple of 16")
        for name in ("k_group", "v_group"):
            group = getattr(self, name)
            if group is None:
                object.__setattr__(self, name, self.head_dim)
            elif group != self.head_dim and (group < 2 or self.head_dim % group or group & (group - 1)):
                raise ValueError(f"{name}={group} must be a power of two >= 2 dividing head_dim "
                                 f"{self.head_dim}")

    # -- per-token row sizes -------------------------------------------------------------------
    @property
    def k_row_bytes(self) -> int:
        return _plane_row_bytes(self.k_bits, self.head_dim, self.elem_bytes)

    @property
    def v_row_bytes(self) -> int:
        return _plane_row_bytes(self.v_bits, self.head_dim, self.elem_bytes)

    @property
    def k_groups(self) -> int:
        return 0 if self.k_bits == 16 else self.head_dim // self.k_group

    @property
    def v_groups(self) -> int:
        return 0 if self.v_bits == 16 else self.head_dim // self.v_group

    @property
    def param_row_bytes(self) -> int:
        return (self.k_groups + self.v_groups) * PARAM_BYTES_PER_GROUP

    @property
    def slot_bytes(self) -> int:
        """Bytes one token occupies for one KV head (K + V + parameters)."""
        return self.k_row_bytes + self.v_row_bytes + self.param_row_bytes

    # -- plane offsets inside one (block, head) run ----------------------------------------------
    @property
    def v_plane_offset(self) -> int:
        return self.block_size * self.k_row_bytes

    @property
    def param_plane_offset(self) -> int:
        return self.block_size * (self.k_row_bytes + self.v_row_bytes)

    @property
    def run_bytes(self) -> int:
        return self.block_size * self.slot_bytes

    def compression_vs(self, baseline_elem_bytes: int = 2) -> float:
        """How many more tokens fit than in an unquantized cache of ``baseline_elem_bytes`` per value."""
        return 2 * self.head_dim * baseline_elem_bytes / self.slot_bytes


def slot_bytes(head_dim: int, k_bits: int, v_bits: int, k_group: int | None = None,
               v_group: int | None = None, elem_bytes: int = 2) -> int:
    """Bytes per token per KV head for a (K, V) layout; see the table in this module's docstring."""
    return PageLayout(head_dim, 16, k_bits, v_bits, k_group, v_group, elem_bytes).slot_bytes
