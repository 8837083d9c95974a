"""Is Triton's CPU interpreter able to run our kernels in this environment?

The attention kernel loops over tiles with bounds computed at run time. Triton 3.6's interpreter turns
such a bound into a Python int with ``int(array)``, which NumPy 2.4 refuses for a one-element array
that is not 0-d (triton-lang/triton#9171, fixed after 3.6). Without this check the failure surfaces as
``InterpreterError: TypeError('only 0-dimensional arrays can be converted to Python scalars')`` from
deep inside the kernel, with nothing saying that the NumPy version is the cause.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _count_to_loaded_bound(bound_ptr, out_ptr):
    total = 0
    for _ in range(0, tl.load(bound_ptr)):  # a loop bound that is a tensor, as in the attention loop
        total += 1
    tl.store(out_ptr, total)


@functools.cache
def interpreter_problem() -> str | None:
    """None if the interpreter runs a loop with a run-time bound correctly, else what to do about it."""
    if not interpreting():
        return None
    bound = torch.tensor([3], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to_loaded_bound[(1,)](bound, out)
    except Exception as error:  # noqa: BLE001 -- any failure here means the kernels cannot run either
        import numpy

        problem = f"Triton {triton.__version__}'s CPU interpreter cannot run a loop with a run-time bound"
        if numpy.lib.NumpyVersion(numpy.__version__) < "2.4.0.dev0":  # its pre-releases too
            return f"{problem}: {error!r}"
        return (f"{problem} next to NumPy {numpy.__version__} ({error!r}; triton-lang/triton#9171). "
                "Install numpy<2.4 (pip install 'numpy<2.4') or a Triton release with the fix.")
    if int(out.item()) != 3:
        return f"Triton's CPU interpreter counted {int(out.item())} loop steps instead of 3"
    return None


def check_interpreter() -> None:
    """Raise RuntimeError with the remedy when the interpreter cannot run the kernels (no-op on GPU)."""
    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(problem)
