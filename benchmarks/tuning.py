"""Launch-parameter sweeps (``run.py --tune``, and a tiny pass in ``--smoke``): the decode split count
against ``choose_num_splits``, then warps and pipelining stages for decode and prefill.

Rows go to ``tune_splits`` and ``tune_prefill``; the functions take the ``Runner`` for timing, checks
and recording, as ``layer_step`` does.
"""
from __future__ import annotations

import math

from vllm_int4kv.kernels.attention import can_share_tiles


def split_sweep(runner, case, point: dict, heuristic: int, tile_n: int) -> dict:
    """Time every split count of the grid that the context can use (and the heuristic's); returns the
    heuristic's timing, which stands for the plain decode point."""
    tiles = math.ceil(case.seq_len / tile_n)
    sweep = sorted({s for s in runner.grid.tune_splits if s <= max(1, tiles)} | {heuristic})
    timed = {}
    for s in sweep:
        timed[s] = runner.bench(case.fns(s))
        if runner.args.smoke:  # the split path and the reduce kernel against the reference
            runner.check("decode_splits", {**point, "num_splits": s}, case.check())
    times = {s: t["median_us"] for s, t in timed.items()}
    best = min(times, key=times.get)
    options = launch_options(runner, case, "decode", {**point, "num_splits": best}, times[best],
                             num_splits=best)
    runner.r["tune_splits"].append({
        **point, "heuristic": heuristic, "best": best, "times_us": {str(k): v for k, v in times.items()},
        "heuristic_over_best": times[heuristic] / times[best], **options})
    runner.log(f"tune {point}: heuristic {heuristic} ({times[heuristic]:.1f} us), best {best} "
               f"({times[best]:.1f} us); " + _options_text(options))
    return timed[heuristic]


def launch_options(runner, case, what: str, point: dict, base_us: float, **launch) -> dict:
    """Warps (at Triton's default stages) and pipelining stages (at the launcher's 4 warps) around the
    launcher's choice, whose time ``base_us`` the caller measured.

    ptxas gives the decode kernel ~110-170 registers per thread at 4 warps and the default 3 stages
    (benchmarks/compile): 2 warps issue fewer instructions per KV byte (fewer cross-warp reductions)
    with ~180 registers, 8 warps trade registers per thread for more warps in flight, fewer stages
    trade prefetching for registers and shared memory. Converted KV tiles reach the dot through shared
    memory (``share_tiles``, fewer instructions, a round trip through shared memory) or straight in the
    dot's layout; both are timed where the GPU can do both.
    """
    warps, stages, tiles = {4: base_us}, {"default": base_us}, {"launcher": base_us}
    variants = [(warps, w, "warps", {"num_warps": w}) for w in runner.grid.tune_warps]
    variants += [(stages, n, "stages", {"num_stages": n}) for n in runner.grid.tune_stages]
    routes = (True, False) if can_share_tiles(case.queries[0]) else (False,)
    variants += [(tiles, "shared" if r else "per-warp", "tiles", {"share_tiles": r}) for r in routes]
    for times, key, name, option in variants:
        try:  # one variant failing to compile or launch is recorded; the others still count
            times[key] = runner.bench(case.fns(**option, **launch))["median_us"]
        except Exception as exc:  # noqa: BLE001
            runner.skip({"table": f"tune_{what}", **point, **option}, f"{type(exc).__name__}: {exc}"[:300])
            continue
        if runner.args.smoke:
            runner.check(f"{what}_{name}", {**point, **option}, case.check())
    return {"warps_us": {str(k): v for k, v in warps.items()}, "best_warps": min(warps, key=warps.get),
            "stages_us": {str(k): v for k, v in stages.items()}, "best_stages": min(stages, key=stages.get),
            "tiles_us": tiles, "best_tiles": min(tiles, key=tiles.get)}


def prefill(runner, shape, policy: str, layout, pool) -> None:
    """Warps and stages for prefill and chunked prefill (no splits there)."""
    for point, case in runner.prefill_cases("tune_prefill", shape, policy, layout, pool):
        base = runner.bench(case.fns())["median_us"]
        options = launch_options(runner, case, "prefill", point, base)
        runner.r["tune_prefill"].append({**point, **options})
        runner.log(f"tune {point}: " + _options_text(options))


def _options_text(options: dict) -> str:
    return "; ".join(name + " " + " ".join(f"{k}:{v:.1f}" for k, v in options[f"{name}_us"].items())
                     for name in ("warps", "stages", "tiles"))
