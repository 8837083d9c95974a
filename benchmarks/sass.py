"""Read a kernel's machine code (SASS) without a GPU: how many instructions its main loop issues.

Why: a decode kernel over INT4 pages moves 3.8x fewer bytes than over BF16 pages, so it must also issue
3.8x fewer instructions per tile to stay memory-bound. An SM issues at most one instruction per cycle on
each of its 4 schedulers, so ``instructions per KV byte`` bounds the bandwidth a kernel can reach however
well its loads are overlapped: SMs x 4 x clock / (instructions per byte). ptxas and cuobjdump ship with
Triton, so this bound is known before any GPU time is spent. It is an upper bound from compiler output,
not a timing: latency, occupancy and the memory system can only lower it.

A second bound: int<->float conversions (I2F, F2I, F2F) and MUFU (exp2) run on a unit that takes 16
threads per SM per cycle on sm_80/sm_90 (CUDA C++ Programming Guide, arithmetic throughput table), an
eighth of the issue rate: a loop that converts every dequantized value waits on that unit long before it
runs out of issue slots. ``SLOW_PIPE_OPCODES`` names them; a kernel's bound is the lower of the two.
F2FP (two fp32 -> a 16-bit pair) is left out: Nsight Compute documents fast FP32->FP16 conversion on
the integer ALU since Ampere, so counting it could understate the bound. So is I2FP (sm_90's
int32->fp32, which ptxas picks over I2F where it can): taken to run on the ALU, to be confirmed by a GPU
profile.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import triton

ISSUE_PER_SM_CYCLE = 4  # warp schedulers per SM (Volta through Hopper), one instruction each per cycle
# H100 SXM5 (the device tool's machine): 132 SMs, 1.98 GHz boost, 3.35 TB/s HBM3 (datasheet)
H100_SMS, H100_BOOST_GHZ, H100_DATASHEET_GBS = 132, 1.98, 3350.0
# the transcendental/conversion unit: 16 threads per SM per cycle, i.e. half a warp-instruction
SLOW_PIPE_PER_SM_CYCLE = 0.5
SLOW_PIPE_OPCODES = frozenset({"MUFU", "I2F", "F2F", "F2I", "FRND"})

_LINE = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def cuobjdump(cubin: bytes, option: str) -> str:
    """``cuobjdump OPTION`` on ``cubin`` (Triton ships the tool); empty if this Triton build lacks it."""
    if not CUOBJDUMP.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(CUOBJDUMP), option, f.name], capture_output=True, text=True).stdout


def disassemble(cubin: bytes) -> str:
    """The SASS text of every kernel in ``cubin``."""
    return cuobjdump(cubin, "-sass")


def parse(sass: str) -> list[Instruction]:
    return [Instruction(int(m.group(1), 16), m.group(2), m.group(3).strip()) for m in _LINE.finditer(sass)]


def loops(code: list[Instruction]) -> list[list[Instruction]]:
    """The body of every loop: from the target of a backward branch to the branch itself."""
    bodies = []
    for end, ins in enumerate(code):
        target = re.match(r"(?:`\(.*?\)\s*)?0x([0-9a-f]+)", ins.operands) if ins.base == "BRA" else None
        if target and int(target.group(1), 16) < ins.address:
            bodies.append([i for i in code[:end + 1] if i.address >= int(target.group(1), 16)])
    return bodies


MMA_OPCODES = frozenset({"HMMA", "HGMMA", "IMMA", "DMMA"})


def main_loop(code: list[Instruction]) -> list[Instruction]:
    """The loop a kernel spends its time in: one pass is one iteration (one KV tile).

    Triton does not unroll ``for`` loops. The attention kernel has two loops over KV tiles with tensor-core
    instructions, in source order: tiles every row sees in full (no mask; all but a few tiles of a long
    context), then the masked rest; this is the first. A kernel without tensor-core loops: its longest
    loop. Empty when the kernel has no loop.
    """
    bodies = loops(code)
    with_mma = [b for b in bodies if any(i.base in MMA_OPCODES for i in b)]
    if with_mma:
        return min(with_mma, key=lambda body: body[0].address)
    return max(bodies, key=len, default=[])


def spills_in_loops(code: list[Instruction]) -> int:
    """Local-memory loads and stores (spilled registers) inside any loop: those cost every iteration."""
    return sum(i.base in ("LDL", "STL") for body in loops(code) for i in body)


def census(code: list[Instruction]) -> Counter:
    """Instructions by opcode without modifiers (IMAD.MOV.U32 counts as IMAD)."""
    return Counter(i.base for i in code)


def issue_bound_gbs(instructions_per_byte: float, sms: int = H100_SMS, ghz: float = H100_BOOST_GHZ) -> float:
    """The most GB/s a kernel issuing this many warp-instructions per byte can move (every scheduler busy
    every cycle at boost clock)."""
    return sms * ISSUE_PER_SM_CYCLE * ghz / instructions_per_byte


def bound_gbs(instructions_per_byte: float, slow_pipe_per_byte: float, sms: int = H100_SMS,
              ghz: float = H100_BOOST_GHZ) -> float:
    """The lower of the issue bound and the conversion/MUFU unit's bound (both warp-instructions/byte)."""
    bound = issue_bound_gbs(instructions_per_byte, sms, ghz)
    if slow_pipe_per_byte:
        bound = min(bound, sms * SLOW_PIPE_PER_SM_CYCLE * ghz / slow_pipe_per_byte)
    return bound
