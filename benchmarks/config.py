"""What the benchmark measures: model shapes, (K, V) policies and the point grids of each mode.

The default grid is budgeted to run in ~8 minutes on an H100 (Triton compiles one kernel per
(shape, policy, split count), so every extra policy on every shape costs compile time, not only timing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm_int4kv.kernels.page_format import PageLayout
from vllm_int4kv.policy import parse_policy

BLOCK_SIZE = 16  # vLLM's default page size


@dataclass(frozen=True)
class ModelShape:
    """Attention geometry of one model plus what the model-level estimate needs (layers, weights)."""

    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    params_billion: float  # weight bytes for the decode-step estimate (bf16: 2 B per parameter)

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


SHAPES = {s.name: s for s in (
    ModelShape("llama3-8b", 32, 8, 128, 32, 8.03),
    ModelShape("qwen2.5-7b", 28, 4, 128, 28, 7.62),
    ModelShape("smollm2-135m", 9, 3, 64, 30, 0.135),
    ModelShape("mqa-d256", 8, 1, 256, 18, 2.51),  # Gemma-2B-like: one KV head of 256 channels
    ModelShape("phi3-mini", 32, 32, 96, 32, 3.82),  # a head that is not a power of two (tiles span 128)
)}
GRID_SHAPES = ("llama3-8b", "qwen2.5-7b", "smollm2-135m", "mqa-d256")  # timed by default (--shapes adds)

# Policies timed, by the names users give VLLM_INT4KV_POLICY (layouts come from KVPolicy itself, so the
# benchmark prices exactly the pages the plugin serves).
POLICIES = ("k4v4", "k8v4", "k16v4", "k8v8", "k16v16", "k4v4-g32")
BASELINE_POLICY = "k16v16"  # our own BF16 paged path: same kernel, unquantized planes


def make_layout(shape: ModelShape, policy: str, elem_bytes: int = 2) -> PageLayout:
    return parse_policy(policy).layout(shape.head_dim, BLOCK_SIZE, elem_bytes)


@dataclass(frozen=True)
class PrefillPoint:
    """``num_seqs`` sequences, each adding ``new_tokens`` after ``context`` tokens already cached."""

    num_seqs: int
    new_tokens: int
    context: int

    @property
    def kind(self) -> str:
        return "prefill" if self.context == 0 else "chunked_prefill"


@dataclass(frozen=True)
class Grid:
    shapes: tuple[str, ...]
    policies: dict[str, tuple[str, ...]]  # per shape
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prefill: tuple[PrefillPoint, ...]
    write_tokens: tuple[int, ...]
    tune_splits: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    tune_policies: tuple[str, ...] = ("k4v4",)
    # timed besides the launcher's 4, at the best split count; 2 warps issue the fewest instructions per
    # KV byte in the decode loop (sm_90 SASS, benchmarks/compile) but hold ~226-246 registers per thread
    tune_warps: tuple[int, ...] = (2, 8)
    tune_stages: tuple[int, ...] = (1, 2)  # timed besides Triton's default (3 on NVIDIA), at 4 warps
    vllm_prefill_and_write: bool = True  # vLLM baselines beyond decode (the quick grid keeps its time for ours)
    extra: dict = field(default_factory=dict)


_ALL = tuple(POLICIES)
_CORE = ("k4v4", "k8v4", "k16v16")

GRIDS = {
    # ~8 min on H100: every policy on Llama-3-8B; the three that matter on the other shapes.
    "default": Grid(
        shapes=GRID_SHAPES,
        policies={"llama3-8b": _ALL, "qwen2.5-7b": _CORE, "smollm2-135m": _CORE, "mqa-d256": _CORE},
        batches=(1, 4, 16, 64, 256),
        contexts=(1024, 4096, 16384, 65536, 131072),
        prefill=(PrefillPoint(1, 4096, 0), PrefillPoint(1, 16384, 0),
                 PrefillPoint(1, 2048, 14336), PrefillPoint(4, 512, 32256)),
        write_tokens=(1, 16, 256, 4096),
    ),
    # ~2 min: fewer points, fewer policies (compiles dominate).
    "quick": Grid(
        shapes=GRID_SHAPES,
        policies={name: ("k4v4", "k16v16") for name in GRID_SHAPES} | {"llama3-8b": _CORE},
        batches=(1, 16, 128),
        contexts=(1024, 8192, 65536),
        prefill=(PrefillPoint(1, 4096, 0), PrefillPoint(1, 2048, 14336)),
        write_tokens=(1, 128, 4096),
        tune_splits=(1, 4, 16, 64),
        vllm_prefill_and_write=False,
    ),
    # CPU interpreter: tiny sizes that still cross block, tile and split boundaries.
    "smoke": Grid(
        shapes=GRID_SHAPES,
        policies={"smollm2-135m": _ALL, "llama3-8b": ("k4v4",), "qwen2.5-7b": ("k4v4",),
                  "mqa-d256": ("k4v4",)},
        batches=(2,),
        contexts=(100,),
        prefill=(PrefillPoint(1, 24, 0), PrefillPoint(2, 8, 50)),
        write_tokens=(3,),
        tune_splits=(1, 2),
        tune_stages=(1,),  # the interpreter ignores stages: this only runs the option through
    ),
}
