"""vLLM's own decode kernels compiled like ours: the same instruction-per-byte bound, side by side.

Why: the GPU timings against vLLM's bf16, fp8 and int4_per_token_head caches need a GPU; the compiler
output does not. vLLM's Triton kernels (staged by ``vllm_kernels.py --stage``) are called the way its
Triton backend calls them (``vllm_baseline.attention_fns``) on CPU tensors with recorders in place of
the kernels, and each recorded launch is compiled for the target and counted exactly as
``gpu_compile.py`` counts ours (``sass.py``: SASS instructions of the main loop per KV byte, and the
bandwidth the issue and conversion rates allow on an H100). These are bounds, not timings.

    python benchmarks/vllm_compile.py              # Llama-3-8B's shape, sm_90, table on stdout

Must run without TRITON_INTERPRET, in a process that has not imported a real vLLM.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # run as a script from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import gpu_compile, vllm_baseline, vllm_kernels  # noqa: E402
from benchmarks.config import SHAPES  # noqa: E402
from vllm_int4kv.kernels.interpreter import interpreting  # noqa: E402

# (batch, new tokens): vLLM's Triton backend takes its 3D (split-softmax) launch for decode batches below
# 128 // kv_heads sequences, the 2D one above, and for prefill
POINTS = {"decode-b8": (8, 1), "decode-b64": (64, 1), "prefill": (8, 64)}


@functools.cache
def _kernels():
    """(description, unified attention module, int4 module), imported once from the staged files."""
    description = vllm_kernels.install()
    import vllm.v1.attention.ops.int4_per_token_head as int4
    import vllm.v1.attention.ops.triton_unified_attention as unified
    return description, unified, int4


def record(mode: str, shape: str, point: str) -> list:
    """The attention launches vLLM makes for ``mode`` at ``point`` (query rotation and reduce left out)."""
    _, unified, int4 = _kernels()
    num_seqs, new_tokens = POINTS[point]
    launches: list = []
    attention = [(unified, "kernel_unified_attention"), (int4, "_attn_packed")]
    ignored = [(unified, "reduce_segments"), (int4, "reduce_segments"), (int4, "_hadamard_mma_kernel")]
    saved = [(module, name, getattr(module, name)) for module, name in attention + ignored]
    for module, name, kernel in saved:
        setattr(module, name, gpu_compile._Recorder(kernel, launches if (module, name) in attention else []))
    try:
        fns = vllm_baseline.attention_fns(mode, SHAPES[shape], num_seqs, new_tokens, 200 + new_tokens, 1,
                                          torch.device("cpu"), torch.bfloat16)
        fns[0]()
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    return launches


def build(mode: str, shape: str, point: str, arch: int = 90) -> list[gpu_compile.Built]:
    """Compile and count vLLM's attention kernel for one (mode, shape, point), as ``build_case`` does ours."""
    model = SHAPES[shape]
    # one iteration reads TILE_SIZE tokens of one KV head: K and V (and per-token-head scales)
    token_bytes = vllm_baseline.cache_bytes_per_token(mode, model) // model.num_kv_heads
    return [gpu_compile.build_launch(f"vllm-{mode}/{shape}/{point}", kernel, args, kwargs, arch,
                                     kwargs["TILE_SIZE"] * token_bytes)
            for kernel, _grid, args, kwargs in record(mode, shape, point)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("unset TRITON_INTERPRET: under the interpreter Triton builds nothing to compile")
    rows = [row for mode in vllm_baseline.MODES for point in POINTS
            for row in build(mode, args.shape, point, args.arch)]
    print(f"# vLLM's attention kernels on sm_{args.arch} (compiled, not run)\n\n"
          f"`python benchmarks/vllm_compile.py --arch {args.arch} --shape {args.shape}`: "
          f"{_kernels()[0]}, called as its Triton backend calls them (decode below and above its "
          f"3D threshold, prefill) and counted as `benchmarks/gpu_compile.py` counts ours; the columns "
          f"are that report's. Query rotation (int4) and the split reduction are left out.\n")
    print(gpu_compile.table(rows))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
