"""Compile our kernels, as our launchers specialise them, for an NVIDIA GPU on a machine without one.

Why: the CPU test path runs the kernels in Triton's interpreter, which never runs the GPU compiler. Errors
only the compiler raises (a plain-float global read inside ``@jit``, a ``tl.dot`` operand below 16, a type
the target lacks) and resource use (registers, spills to local memory, shared memory) stay invisible
until a GPU session, and GPU time is short. Triton ships ``ptxas``, so the cubins can be built here, and
``cuobjdump``, so their main loops can be counted: instructions per KV byte bound the bandwidth a decode
kernel can reach (``benchmarks/sass.py``).

How: each case calls the real launcher (``paged_attention``, ``write_kv_cache``) with small CPU tensors
while the kernel objects are swapped for recorders and the launcher's ``_is_gpu`` answers yes, so the
launch (grid, arguments, constexprs) is the one the launcher would make on a GPU (split counts, which
need the SM count, are given explicitly). Each recorded launch is then specialised by Triton's own binder
for the target (the same argument specialisation the JIT applies at run time) and compiled to a cubin.
A case is one representative launch: at run time other integer values (split counts, a batch of one,
strides) specialise further variants of the same code.

    python benchmarks/gpu_compile.py                 # every case for sm_90, table on stdout
    python benchmarks/gpu_compile.py --arch 80 --json out.json

Must run without TRITON_INTERPRET (under it ``@triton.jit`` builds interpreter objects, not compilable).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # run as a script from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks import sass  # noqa: E402
from benchmarks.config import BLOCK_SIZE, GRID_SHAPES, POLICIES, SHAPES, ModelShape, make_layout  # noqa: E402
from vllm_int4kv.kernels import attention, cache_write  # noqa: E402
from vllm_int4kv.kernels.interpreter import interpreting  # noqa: E402
from vllm_int4kv.policy import parse_policy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One launcher call: ``op`` is decode, decode_split, prefill or write."""

    op: str
    shape: str
    policy: str
    dtype: str = "bf16"
    softcap: bool = False
    window: bool = False
    sinks: bool = False  # gpt-oss's per-head sink logits
    alibi: bool = False  # Bloom's and Falcon's per-head position-bias slopes
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default (3 on NVIDIA)
    num_seqs: int = 8  # 1: the JIT makes num_seqs a constant

    @property
    def name(self) -> str:
        extra = "".join(f"-{flag}" for flag in ("softcap", "window", "sinks", "alibi") if getattr(self, flag))
        extra += f"-w{self.num_warps}" if self.num_warps != 4 else ""
        extra += f"-s{self.num_stages}" if self.num_stages is not None else ""
        extra += f"-b{self.num_seqs}" if self.num_seqs != 8 else ""
        return f"{self.op}/{self.shape}/{self.policy}/{self.dtype}{extra}"


@dataclass
class Built:
    """One compiled kernel of a case (a split decode yields two: attention and reduce)."""

    case: str
    kernel: str
    num_warps: int
    num_stages: int
    registers: int | None
    spill_bytes: int | None  # stack frame per thread: > 0 means registers spilled
    shared_bytes: int
    error: str | None = None
    loop_instructions: int | None = None  # SASS instructions per iteration of the main loop, per warp
    kv_bytes_per_iteration: int | None = None  # attention kernels: KV bytes of one head one iteration reads
    loop_opcodes: dict | None = None  # the main loop's instructions by opcode (no modifiers)
    loop_spills: int = 0  # spilled-register loads/stores inside loops (spills elsewhere cost once)

    @property
    def instructions_per_kv_byte(self) -> float | None:
        """Warp-instructions the SM issues per KV byte (every warp runs the loop body once per tile)."""
        if not (self.loop_instructions and self.kv_bytes_per_iteration):
            return None
        return self.loop_instructions * self.num_warps / self.kv_bytes_per_iteration

    @property
    def slow_pipe_instructions(self) -> int | None:
        """Of the loop's instructions, those on the conversion/MUFU unit (``sass.SLOW_PIPE_OPCODES``)."""
        if not self.loop_opcodes:
            return None
        return sum(n for op, n in self.loop_opcodes.items() if op in sass.SLOW_PIPE_OPCODES)

    def bound_gbs(self) -> float | None:
        """The lower of the issue and conversion/MUFU bounds on an H100 (``sass.bound_gbs``)."""
        per_byte = self.instructions_per_kv_byte
        if per_byte is None:
            return None
        slow_per_byte = self.slow_pipe_instructions * self.num_warps / self.kv_bytes_per_iteration
        return sass.bound_gbs(per_byte, slow_per_byte)

    def as_dict(self) -> dict:
        """The fields and the derived figures, for JSON."""
        return dict(asdict(self), instructions_per_kv_byte=self.instructions_per_kv_byte,
                    slow_pipe_instructions=self.slow_pipe_instructions, bound_gbs=self.bound_gbs())


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


def _record(case: Case) -> list:
    """Run the launcher of ``case`` on CPU tensors with recorders in place of the kernels."""
    shape: ModelShape = SHAPES[case.shape]
    dtype = DTYPES[case.dtype]
    layout = make_layout(shape, case.policy, dtype.itemsize)
    num_seqs, context = case.num_seqs, 200
    new_tokens = 1 if case.op.startswith("decode") else 64
    # block-table rows a multiple of 16 entries wide, as vLLM sizes them (the JIT specialises on it)
    blocks_per_seq = 16 * triton.cdiv(context + new_tokens, 16 * BLOCK_SIZE)
    cache = torch.zeros(num_seqs * blocks_per_seq, shape.num_kv_heads, layout.run_bytes, dtype=torch.uint8)
    num_tokens = num_seqs * new_tokens
    launches: list = []
    saved = (attention.paged_attention_kernel, attention._reduce_splits_kernel, cache_write._write_kv_kernel,
             attention._is_gpu)
    attention._is_gpu = lambda device: True  # make the launcher's GPU choices (tiles) for CPU tensors
    attention.paged_attention_kernel = _Recorder(saved[0], launches)
    attention._reduce_splits_kernel = _Recorder(saved[1], launches)
    cache_write._write_kv_kernel = _Recorder(saved[2], launches)
    try:
        if case.op == "write":
            kv = torch.zeros(num_tokens, shape.num_kv_heads, shape.head_dim, dtype=dtype)
            slots = torch.arange(num_tokens, dtype=torch.int64)  # vLLM's slot_mapping is int64
            cache_write.write_kv_cache(kv, kv.clone(), cache, slots, layout)
        else:
            query = torch.zeros(num_tokens, shape.num_q_heads, shape.head_dim, dtype=dtype)
            table = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, -1)
            seq_lens = torch.full((num_seqs,), context + new_tokens, dtype=torch.int32)
            starts = torch.arange(num_seqs + 1, dtype=torch.int32) * new_tokens
            attention.paged_attention(
                query, cache, layout, table, seq_lens, starts, max_query_len=new_tokens,
                max_seq_len=context + new_tokens, softcap=30.0 if case.softcap else None,
                sliding_window=128 if case.window else None,
                num_splits=4 if case.op == "decode_split" else 1, num_warps=case.num_warps,
                num_stages=case.num_stages,
                sinks=torch.zeros(shape.num_q_heads) if case.sinks else None,
                alibi_slopes=torch.ones(shape.num_q_heads) if case.alibi else None)
    finally:
        (attention.paged_attention_kernel, attention._reduce_splits_kernel, cache_write._write_kv_kernel,
         attention._is_gpu) = saved
    return launches


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack-frame bytes) per thread from ``cuobjdump --dump-resource-usage``."""
    text = sass.cuobjdump(cubin, "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)  # spilled registers live in the stack frame
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def _compile(kernel, args, kwargs, arch: int):
    """Specialise like the JIT does for ``arch`` (alignment, ints equal to 1, ...) and build a cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    return compiled, options


def build_case(case: Case, arch: int = 90) -> list[Built]:
    """Record and compile one case; a failure is returned as a row with ``error`` set, not raised."""
    try:
        launches = _record(case)
    except Exception as exc:  # the launcher itself refused the case
        return [Built(case.name, "launcher", 0, 0, None, None, 0, f"{type(exc).__name__}: {exc}")]
    rows = []
    for kernel, _grid, args, kwargs in launches:
        tile_bytes = None
        if "TILE_N" in kwargs:  # the attention kernel: one iteration reads TILE_N slots of one KV head
            layout = make_layout(SHAPES[case.shape], case.policy, DTYPES[case.dtype].itemsize)
            tile_bytes = kwargs["TILE_N"] * layout.slot_bytes
        rows.append(build_launch(case.name, kernel, args, kwargs, arch, tile_bytes))
    return rows


def build_launch(name: str, kernel, args, kwargs, arch: int, tile_bytes: int | None) -> Built:
    """Compile one recorded launch and count its main loop (``tile_bytes``: KV bytes one iteration
    reads, None for kernels without one); a failure is returned as a row with ``error`` set."""
    try:
        compiled, options = _compile(kernel, args, kwargs, arch)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return Built(name, kernel.__name__, 0, 0, None, None, 0, f"{type(exc).__name__}: {str(exc)[-2000:]}")
    regs, local = _resource_usage(compiled.asm["cubin"])
    code = sass.parse(sass.disassemble(compiled.asm["cubin"]))
    loop = sass.main_loop(code)
    return Built(name, kernel.__name__, options.num_warps, options.num_stages, regs, local,
                 compiled.metadata.shared, loop_instructions=len(loop) or None, kv_bytes_per_iteration=tile_bytes,
                 loop_opcodes=dict(sass.census(loop)), loop_spills=sass.spills_in_loops(code))


def all_cases() -> list[Case]:
    """Every shape x policy x op in bf16, plus the dtype and masking variants on one shape and the launch
    options on the timed shapes."""
    cases = [Case(op, shape, policy) for shape in SHAPES for policy in POLICIES
             if not _skip(shape, policy) for op in ("decode", "decode_split", "prefill", "write")]
    for dtype in ("fp16", "fp32"):
        cases += [Case(op, "llama3-8b", policy, dtype) for policy in ("k4v4", "k16v16")
                  for op in ("decode", "prefill", "write")]
    cases += [Case(op, "llama3-8b", "k4v4", softcap=True, window=True) for op in ("decode", "prefill")]
    cases += [Case(op, s, "k4v4", num_warps=8) for s in GRID_SHAPES
              for op in ("decode", "decode_split", "prefill")]
    cases += [Case("decode", s, "k4v4", num_warps=2) for s in GRID_SHAPES]
    cases += [Case(op, s, "k4v4", num_stages=n) for s in GRID_SHAPES for op in ("decode", "prefill")
              for n in (1, 2)]
    cases += [Case(op, "llama3-8b", p, num_seqs=1) for p in ("k4v4", "k16v16")
              for op in ("decode", "decode_split")]
    return cases


def _skip(shape: str, policy: str) -> bool:
    """Key groups must be narrower than the head and divide it (the policy refuses the rest, by design)."""
    group, head_dim = parse_policy(policy).k_group, SHAPES[shape].head_dim
    return bool(group) and (group >= head_dim or head_dim % group != 0)


def build_all(cases: list[Case], arch: int, workers: int) -> list[Built]:
    if workers <= 1:
        return [row for case in cases for row in build_case(case, arch)]
    with ProcessPoolExecutor(workers) as pool:
        return [row for rows in pool.map(build_case, cases, [arch] * len(cases)) for row in rows]


def table(rows: list[Built]) -> str:
    lines = ["| case | kernel | warps | stages | registers | spill B | shared B | loop instr. | slow pipe "
             "| instr./KV B | bound, H100 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.case} | {r.kernel} | FAILED: {r.error.splitlines()[-1][:120]} |||||||||")
            continue
        per_byte, bound = r.instructions_per_kv_byte, r.bound_gbs()
        slow = r.slow_pipe_instructions
        lines.append(f"| {r.case} | {r.kernel} | {r.num_warps} | {r.num_stages} | {r.registers} | "
                     f"{r.spill_bytes}{' (in a loop)' if r.loop_spills else ''} | {r.shared_bytes} | "
                     f"{r.loop_instructions or ''} | "
                     f"{slow if slow is not None else ''} | {f'{per_byte:.3f}' if per_byte else ''} | "
                     f"{f'{bound / 1000:.2f} TB/s' if bound else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("unset TRITON_INTERPRET: under the interpreter Triton builds nothing to compile")
    rows = build_all(all_cases(), args.arch, args.workers)
    print(f"# Kernel resources on sm_{args.arch} (compiled, not run)\n\n"
          f"`python benchmarks/gpu_compile.py --arch {args.arch}`: a representative launch of each case "
          f"(shape, policy, operation, dtype, options), compiled by Triton {triton.__version__} with its "
          f"bundled ptxas on a machine without a GPU; "
          f"registers and spills per thread, shared memory per block, from cuobjdump. "
          f"`loop instr.`: SASS instructions one warp issues per iteration of the kernel's main loop (one "
          f"KV tile); `slow pipe`: those of them on the conversion/MUFU unit (16 threads per SM per "
          f"cycle, an eighth of the issue rate); `instr./KV B`: warp-instructions per KV byte of one head; "
          f"`bound`: the most bandwidth the lower of the two rates allows with all {sass.H100_SMS} SMs "
          f"busy at {sass.H100_BOOST_GHZ} GHz (an upper bound, not a timing; H100 HBM3: "
          f"{sass.H100_DATASHEET_GBS / 1000:.2f} TB/s). "
          f"{sum(not r.error for r in rows)} kernels built, {sum(bool(r.error) for r in rows)} failed, "
          f"{sum(bool(r.spill_bytes) for r in rows)} spill "
          f"({sum(bool(r.loop_spills) for r in rows)} with spill loads or stores inside a loop).\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    failed = [r for r in rows if r.error]
    for r in failed:
        print(f"\n{r.case} ({r.kernel}):\n{r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
