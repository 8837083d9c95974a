"""The K/V precision policy: how many bits keys and values get, and the format options.

A policy is a frozen value. Its string form is ``k{bits}v{bits}`` plus optional ``-g{N}`` (key channel
groups of N channels) and ``-rot`` (Hadamard rotation), e.g. ``k4v4``, ``k4v4-g16-rot``, ``k16v16``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..kernels.page_format import KEY_BITS, PageLayout

VLLM_DTYPE_NAMES = ("auto", "half", "float16", "bfloat16", "float", "float32")  # vllm serve --dtype
_PATTERN = re.compile(r"^k(4|8|16)v(4|8|16)(?:-g(\d+))?(-rot)?$")


@dataclass(frozen=True)
class KVPolicy:
    k_bits: int = 4
    v_bits: int = 4
    k_group: int | None = None  # channels per key quantization group; None = whole head
    rotate: bool = False  # Hadamard-rotate K and V before quantizing (undone on Q and the output)

    def __post_init__(self):
        if self.k_bits not in KEY_BITS:
            raise ValueError(f"key bits must be one of {KEY_BITS}, got {self.k_bits}")
        if self.v_bits not in (4, 8, 16):
            raise ValueError(f"value bits must be 4, 8 or 16, got {self.v_bits}")
        if self.v_bits == 16 and self.k_bits != 16:
            raise ValueError("16-bit values only exist in the unquantized k16v16 mode")
        if self.k_group is not None and (self.k_bits == 16 or self.k_group < 8
                                         or self.k_group & (self.k_group - 1)):
            raise ValueError(f"key groups need quantized keys and a power of two >= 8, got {self.k_group}")
        if self.rotate and self.k_bits == 16 and self.v_bits == 16:
            raise ValueError("rotation is pointless for the unquantized k16v16 mode")

    @property
    def name(self) -> str:
        group = f"-g{self.k_group}" if self.k_group else ""
        return f"k{self.k_bits}v{self.v_bits}{group}{'-rot' if self.rotate else ''}"

    @property
    def quantized(self) -> bool:
        return not (self.k_bits == 16 and self.v_bits == 16)

    def layout(self, head_dim: int, block_size: int, elem_bytes: int = 2) -> PageLayout:
        if self.k_group and self.k_group >= head_dim:  # would silently be the plain policy
            plain = KVPolicy(self.k_bits, self.v_bits, None, self.rotate).name
            raise ValueError(f"policy {self.name}: key groups of {self.k_group} channels need a head_dim "
                             f"above {self.k_group}, got {head_dim}; use {plain}")
        if self.k_group and head_dim % self.k_group:  # e.g. 32-channel groups of an 80-channel head
            largest = head_dim & -head_dim  # the largest power of two that divides it
            raise ValueError(f"policy {self.name}: key groups of {self.k_group} channels must divide "
                             f"head_dim {head_dim}; use -g{largest} or smaller")
        return PageLayout(head_dim, block_size, self.k_bits, self.v_bits, self.k_group, None, elem_bytes)

    def slot_bytes(self, head_dim: int, elem_bytes: int = 2) -> int:
        """Bytes per token per KV head."""
        return self.layout(head_dim, 16, elem_bytes).slot_bytes

    def __str__(self) -> str:
        return self.name


PRESETS = {p.name: p for p in (KVPolicy(4, 4), KVPolicy(8, 4), KVPolicy(16, 4), KVPolicy(8, 8),
                               KVPolicy(16, 16))}


def parse_policy(text: str) -> KVPolicy:
    """``"k4v4"``, ``"k4v4-g16-rot"``, ... -> KVPolicy. ``"auto"`` is resolved elsewhere."""
    match = _PATTERN.match(text.strip().lower())
    if not match:
        raise ValueError(f"unknown KV policy {text!r}: use auto, one of {', '.join(PRESETS)}, "
                         "optionally with -g<N> (key channel groups) and/or -rot (Hadamard rotation)")
    k_bits, v_bits, group, rot = match.groups()
    return KVPolicy(int(k_bits), int(v_bits), int(group) if group else None, bool(rot))


# The pages of layers kept unquantized beside a quantized policy (--kv-cache-dtype-skip-layers).
UNQUANTIZED = KVPolicy(16, 16)


def is_layer_index(entry: str) -> bool:
    """Whether a ``--kv-cache-dtype-skip-layers`` entry can name a layer: vLLM compares each entry with
    ``str(layer index)``, so only plain ASCII numbers without leading zeros ever match (not ``01``, not
    ``²``, which ``str.isdigit`` accepts)."""
    return entry.isascii() and entry.isdigit() and str(int(entry)) == entry
