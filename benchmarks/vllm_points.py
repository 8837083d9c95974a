"""vLLM's own kernels as same-run baselines: checked first, then timed at our decode, prefill and write
points (rows ``vllm_decode``, ``vllm_prefill``, ``vllm_write``; ``analysis`` turns them into speedups).

The calls themselves are built in ``vllm_baseline``; these functions take the ``Runner`` for its device,
grid, byte accounting and recording, as ``layer_step`` does.
"""
from __future__ import annotations

from . import traffic, vllm_baseline

CHECK_NEW_TOKENS = (1, 16)  # decode (vLLM's 3D launch) and chunked prefill (2D)


def checks(runner) -> None:
    """vLLM's attention on a small case it wrote itself, against plain attention: the baseline's calls
    compute what they should before they are timed."""
    for mode in vllm_baseline.MODES:
        for new_tokens in CHECK_NEW_TOKENS:
            point = {"mode": mode, "new_tokens": new_tokens}
            try:
                error = vllm_baseline.check(mode, runner.device, runner.dtype, new_tokens=new_tokens)
            except Exception as exc:  # noqa: BLE001 - recorded; the timed points will say the same
                runner.skip({"table": "vllm_check", **point}, f"{type(exc).__name__}: {exc}"[:300])
                continue
            runner.check(f"vllm_{mode}", point, error, vllm_baseline.TOLERANCE[mode])


def _timed(runner, table: str, point: dict, make_fns, nbytes: dict) -> None:
    """Time one point (``make_fns(copies)``); a failure is recorded as a skip, never raised."""
    n = runner.copies(nbytes["bytes"])
    if n * nbytes["bytes"] > runner.usable_bytes():
        runner.skip({"table": table, **point}, "memory")
        return
    try:
        runner.record(table, {**point, "copies": n}, runner.bench(make_fns(n)), nbytes)
    except Exception as exc:  # noqa: BLE001 - a baseline failing must not stop our numbers
        runner.skip({"table": table, **point}, f"{type(exc).__name__}: {exc}"[:300])


def _attention_bytes(runner, mode: str, shape, num_seqs: int, seq_len: int, tokens: int) -> dict:
    kv = vllm_baseline.cache_bytes_per_token(mode, shape) * num_seqs * seq_len
    io = traffic._io_bytes(tokens, shape, runner.dtype.itemsize)
    return {"bytes": kv + sum(io.values()), "breakdown": {"kv": kv, **io}}


def decode_point(runner, shape, batch: int, context: int) -> None:
    for mode in vllm_baseline.MODES:
        _timed(runner, "vllm_decode", {"shape": shape.name, "mode": mode, "batch": batch, "context": context},
               lambda n: vllm_baseline.attention_fns(mode, shape, batch, 1, context, n, runner.device,
                                                     runner.dtype),
               _attention_bytes(runner, mode, shape, batch, context, batch))


def prefill_point(runner, shape, point: dict) -> None:
    seqs, new = point["num_seqs"], point["new_tokens"]
    total = point["context"] + new
    for mode in vllm_baseline.MODES:
        _timed(runner, "vllm_prefill", {**point, "mode": mode},
               lambda n: vllm_baseline.attention_fns(mode, shape, seqs, new, total, n, runner.device,
                                                     runner.dtype),
               _attention_bytes(runner, mode, shape, seqs, total, seqs * new))


def write_points(runner, shape) -> None:
    """vLLM's INT4 write only: its bf16/fp8 writes are CUDA ops the staged kernels lack."""
    mode = "int4_per_token_head"
    for t in sorted(set(runner.grid.write_tokens) | set(runner.grid.batches)):
        parts = {"kv_in": 2 * t * shape.num_kv_heads * shape.head_dim * runner.dtype.itemsize,
                 "slot_mapping": 8 * t, "slots_out": vllm_baseline.cache_bytes_per_token(mode, shape) * t}
        _timed(runner, "vllm_write", {"shape": shape.name, "mode": mode, "tokens": t},
               lambda n: vllm_baseline.write_fns(shape, t, n, runner.device, runner.dtype),
               {"bytes": sum(parts.values()), "breakdown": parts})
