"""Benchmark the INT4 paged KV-cache kernels on a GPU; write results.json, summary.md and plots to --out.

    python benchmarks/run.py --out DIR [--quick | --smoke] [--tune] [--shapes a,b] [--policies x,y]
                             [--budget-s SECONDS]

--smoke: tiny sizes on the CPU under the Triton interpreter (no timing meaning): every code path runs
and every kernel output is checked against the torch reference. --tune: only sweep the split count of
decode and compare the launcher's heuristic with the best, then warps and pipelining stages for decode
and prefill. --budget-s: stop starting new points after
this many seconds (results so far are still written).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede any triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")
if __package__ in (None, ""):
    here = Path(__file__).resolve().parent  # the script's folder would shadow modules named like ours
    sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))
    __package__ = "benchmarks"  # noqa: A001

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

from vllm_int4kv.kernels.attention import choose_num_splits, tile_tokens  # noqa: E402

from . import layer_step, timing, traffic, tuning, vllm_baseline, vllm_points  # noqa: E402
from .analysis import derive  # noqa: E402
from .config import GRIDS, POLICIES, SHAPES, make_layout  # noqa: E402
from .workloads import AttentionCase, Pool, SdpaCase, WriteCase  # noqa: E402

ROTATE_L2_MULTIPLE = 4  # rotate copies until the working set is >= 4x L2
MAX_COPIES = 64  # enough for a ~3 MiB working set (batch 1, short context) to cycle past L2
CHECK_TOLERANCE = 2e-2  # bf16/fp16 output vs the fp32 reference on the same (dequantized) cache


class Runner:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float16
        self.mode = "smoke" if args.smoke else "quick" if args.quick else "default"
        grid = GRIDS[self.mode]
        self.grid = grid
        self.shapes = [SHAPES[s] for s in (args.shapes.split(",") if args.shapes else grid.shapes)]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        header = timing.machine_header(self.device)
        l2 = header.get("l2_bytes") or 50 * 2 ** 20
        self.rotate_bytes = ROTATE_L2_MULTIPLE * l2 if self.device.type == "cuda" else 0
        self.r = {"schema": 1, "mode": self.mode, "tune": bool(args.tune), "machine": header,
                  "timing_meaningful": self.device.type == "cuda", "dtype": str(self.dtype),
                  "block_size": 16, "copy_bandwidth_gbs": None, "copy": None, "gemm": None,
                  "vllm": {"status": vllm_baseline.availability(self.device) or "measured",
                           "source": vllm_baseline.SOURCE},
                  "decode": [], "sdpa_decode": [], "vllm_decode": [], "prefill": [], "sdpa_prefill": [],
                  "vllm_prefill": [], "vllm_write": [],
                  "write": [], "layer_step": [], "layer_step_map": [], "tune_splits": [], "tune_prefill": [], "checks": [], "skipped": [],
                  "notes": [], "errors": [],
                  "goals": {}, "model_estimates": []}
        self.r["notes"] += [
            "GB/s counts unique bytes (KV rows + scale planes + block table + Q + out); split partials are "
            "listed per row (partial_bytes) but not counted",
            "SDPA baselines: contiguous K/V in the model dtype with enable_gqa=True; chunked prefill needs an "
            "explicit mask, which rules out torch's GQA fast paths, so there K/V are expanded to the query "
            "heads outside the timed call (bytes still count the unexpanded K/V)",
            f"L2 rotation: each point cycles through up to {MAX_COPIES} disjoint copies so that the working "
            f"set reaches {ROTATE_L2_MULTIPLE}x L2 ({self.rotate_bytes / 2**20:.0f} MiB)"]
        timing.print_header(header)

    # -- bookkeeping ----------------------------------------------------------------------------
    def log(self, msg):
        print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def out_of_time(self):
        return self.args.budget_s is not None and time.time() - self.t0 > self.args.budget_s

    def skip(self, what: dict, why: str):
        self.r["skipped"].append({**what, "reason": why})

    def save(self):
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.r, indent=1))
        tmp.replace(self.out / "results.json")

    def usable_bytes(self) -> int:
        if self.device.type != "cuda":
            return 1 << 30
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(self.device)[0] * 0.85) - (2 << 30)

    def copies(self, working_bytes: int) -> int:
        return max(1, min(MAX_COPIES, math.ceil(self.rotate_bytes / max(working_bytes, 1))))

    def policies(self, shape):
        if self.args.policies:
            return self.args.policies.split(",")
        if self.args.tune and not self.args.smoke:
            return list(self.grid.tune_policies)
        return list(self.grid.policies.get(shape.name, ("k4v4", "k16v16")))  # (a shape named by --shapes)

    def record(self, table: str, row: dict, timed: dict, nbytes: dict):
        row = {**row, **timed, "bytes": nbytes["bytes"], "breakdown": nbytes["breakdown"]}
        for extra in ("partial_bytes", "kv_streamed_bytes", "flops"):
            if extra in nbytes:
                row[extra] = nbytes[extra]
        row["gbs"] = nbytes["bytes"] / timed["median_us"] / 1e3
        copy_bw = self.r["copy_bandwidth_gbs"]
        row["pct_copy"] = 100 * row["gbs"] / copy_bw if copy_bw else None
        if "flops" in nbytes:
            row["tflops"] = nbytes["flops"] / timed["median_us"] / 1e6
        self.r[table].append(row)
        pct = f" ({row['pct_copy']:.0f}% copy)" if row["pct_copy"] is not None else ""
        label = " ".join(f"{k}={v}" for k, v in row.items() if k in ("shape", "policy", "mode", "kind",
                         "batch", "context", "num_seqs", "new_tokens", "tokens", "num_splits"))
        self.log(f"{table} {label}: {timed['median_us']:.1f} us, {row['gbs']:.0f} GB/s{pct}")
        return row

    def bench(self, fns):
        return timing.bench(fns, self.device)

    # -- sections -------------------------------------------------------------------------------
    def peaks(self):
        cuda = self.device.type == "cuda"
        copy = timing.copy_bandwidth(self.device, (2 << 30) if cuda else (8 << 20))
        self.r["copy"], self.r["copy_bandwidth_gbs"] = copy, copy["gbs"]
        self.r["gemm"] = timing.gemm_tflops(self.device, 8192 if cuda else 128, self.dtype)
        self.log(f"copy bandwidth {copy['gbs']:.0f} GB/s; GEMM {self.r['gemm']['tflops']:.0f} TFLOP/s")

    def baselines(self, shape):
        """torch SDPA (and vLLM when importable) at every decode and prefill point of this shape."""
        eb = self.dtype.itemsize
        for b in self.grid.batches:
            for c in self.grid.contexts:
                point = {"shape": shape.name, "batch": b, "context": c}
                need = traffic.sdpa_bytes(shape, b, c, 1, eb)
                n = self.copies(need["bytes"])
                if self.out_of_time() or n * need["bytes"] > self.usable_bytes():
                    self.skip({"table": "sdpa_decode", **point}, "time budget" if self.out_of_time()
                              else f"needs {n * need['bytes'] / 2**30:.1f} GiB")
                    continue
                case = SdpaCase(shape, b, 1, c, n, self.device, self.dtype)
                self.record("sdpa_decode", {**point, "copies": n}, self.bench(case.fns()), need)
                del case
                if self.with_vllm(shape):
                    vllm_points.decode_point(self, shape, b, c)
        for p in self.grid.prefill:
            point = {"kind": p.kind, "shape": shape.name, "num_seqs": p.num_seqs,
                     "new_tokens": p.new_tokens, "context": p.context}
            total = p.context + p.new_tokens
            need = traffic.sdpa_bytes(shape, p.num_seqs, total, p.new_tokens, eb)["bytes"]
            if p.kind == "chunked_prefill":
                need *= 1 + shape.group  # K/V expanded to the query heads (SdpaCase)
            if self.out_of_time() or need > self.usable_bytes():
                self.skip({"table": "sdpa_prefill", **point}, "time budget" if self.out_of_time()
                          else f"needs {need / 2**30:.1f} GiB")
                continue
            case = SdpaCase(shape, p.num_seqs, p.new_tokens, total, 1, self.device, self.dtype)
            self.record("sdpa_prefill", point, self.bench(case.fns()),
                        traffic.sdpa_bytes(shape, p.num_seqs, total, p.new_tokens, eb))
            if self.with_vllm(shape) and self.grid.vllm_prefill_and_write:
                vllm_points.prefill_point(self, shape, point)
        if self.with_vllm(shape) and self.grid.vllm_prefill_and_write:
            vllm_points.write_points(self, shape)
        self.save()

    def smallest_shape(self):
        return min(self.shapes, key=lambda s: s.num_q_heads * s.head_dim)

    def with_vllm(self, shape) -> bool:
        """vLLM's kernels as baselines here; under the interpreter (smoke) on the smallest shape only."""
        return self.r["vllm"]["status"] == "measured" and (not self.args.smoke or shape is self.smallest_shape())

    def pool_for(self, shape, layout):
        """One pool big enough for every point of this (shape, policy) that fits in memory."""
        want = [math.ceil(c / layout.block_size) * b * self.copies(traffic.cache_bytes(shape, layout, b, c))
                for b in self.grid.batches for c in self.grid.contexts]
        want += [p.num_seqs * math.ceil((p.context + p.new_tokens) / layout.block_size)
                 for p in self.grid.prefill]
        per_block = shape.num_kv_heads * layout.run_bytes
        limit = self.usable_bytes() // per_block
        blocks = max([w for w in want if w <= limit] or [1])
        return Pool(shape, layout, blocks, self.device, self.dtype)

    def ours(self, shape, policy):
        layout = make_layout(shape, policy, self.dtype.itemsize)
        if self.out_of_time():  # do not even build the pool
            self.skip({"table": "all", "shape": shape.name, "policy": policy}, "time budget")
            return
        pool = self.pool_for(shape, layout)
        eb, first = self.dtype.itemsize, True
        tile_n = tile_tokens(shape.head_dim, eb)
        for b in self.grid.batches:
            for c in self.grid.contexts:
                point = {"shape": shape.name, "policy": policy, "batch": b, "context": c}
                n = self.copies(traffic.cache_bytes(shape, layout, b, c))
                if self.out_of_time() or n * b * math.ceil(c / layout.block_size) > pool.num_blocks:
                    self.skip({"table": "decode", **point}, "time budget" if self.out_of_time() else
                              f"needs {traffic.cache_bytes(shape, layout, b, c) / 2**30:.1f} GiB of pages")
                    continue
                splits = choose_num_splits(b, shape.num_kv_heads, 1, c, tile_n, self.device)
                case = AttentionCase(pool, b, 1, c, n)
                tuned = None
                if self.args.tune or (self.args.smoke and policy in self.grid.tune_policies):
                    tuned = tuning.split_sweep(self, case, point, splits, tile_n)
                if not self.args.tune:
                    timed = tuned or self.bench(case.fns())  # the sweep already timed the heuristic
                    self.record("decode", {**point, "num_splits": splits, "copies": n}, timed,
                                traffic.decode_bytes(shape, layout, b, c, splits, eb))
                    if first or self.args.smoke:  # correctness on the GPU too: the smallest point
                        self.check("decode", point, case.check())
                        first = False
        if self.args.tune or (self.args.smoke and policy in self.grid.tune_policies
                              and shape is self.smallest_shape()):  # interpreter time: one shape
            tuning.prefill(self, shape, policy, layout, pool)
        if not self.args.tune:
            self.prefill(shape, policy, layout, pool)
            self.write(shape, policy, layout, pool)
        del pool
        self.save()

    def prefill_cases(self, table, shape, policy, layout, pool):
        """(point, case) for each prefill point of the grid that fits in time and in the pool."""
        for p in self.grid.prefill:
            point = {"kind": p.kind, "shape": shape.name, "policy": policy, "num_seqs": p.num_seqs,
                     "new_tokens": p.new_tokens, "context": p.context}
            total = p.context + p.new_tokens
            if self.out_of_time() or p.num_seqs * math.ceil(total / layout.block_size) > pool.num_blocks:
                self.skip({"table": table, **point}, "time budget or memory")
                continue
            yield point, AttentionCase(pool, p.num_seqs, p.new_tokens, total, 1)

    def prefill(self, shape, policy, layout, pool):
        if self.args.smoke and policy not in ("k4v4", "k16v16"):
            return  # interpreter time: the bit widths are covered by decode, the prefill tiling here
        for point, case in self.prefill_cases("prefill", shape, policy, layout, pool):
            self.record("prefill", point, self.bench(case.fns()),
                        traffic.prefill_bytes(shape, layout, point["num_seqs"], point["new_tokens"],
                                              point["context"], self.dtype.itemsize))
            if self.args.smoke:
                self.check("prefill", point, case.check())

    def write(self, shape, policy, layout, pool):
        tokens = set(self.grid.write_tokens) | (set() if self.args.smoke else set(self.grid.batches))
        for t in sorted(tokens):  # the decode batches too: the write share of a decode step
            point = {"shape": shape.name, "policy": policy, "tokens": t}
            nbytes = traffic.write_bytes(shape, layout, t, self.dtype.itemsize)
            n = self.copies(nbytes["bytes"])
            if self.out_of_time() or n * math.ceil(t / layout.block_size) > pool.num_blocks:
                self.skip({"table": "write", **point}, "time budget or memory")
                continue
            case = WriteCase(pool, t, n)
            self.record("write", {**point, "copies": n}, self.bench(case.fns()), nbytes)
            if t == min(self.grid.write_tokens) or self.args.smoke:
                self.check("write", point, case.check())

    def check(self, what, point, error, tolerance=CHECK_TOLERANCE):
        ok = error == error and error <= tolerance  # NaN fails
        self.r["checks"].append({"what": what, **point, "error": error, "tolerance": tolerance, "ok": ok})
        if not ok:
            self.log(f"CHECK FAILED {what} {point}: error {error:.3g} > {tolerance}")

    # -- driver ---------------------------------------------------------------------------------
    def guarded(self, what: dict, fn, *args):
        """One failing section (OOM, a capture error) is recorded and the run goes on."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            self.log(f"FAILED {what}: {type(exc).__name__}: {exc}")
            self.r["errors"].append({**what, "error": f"{type(exc).__name__}: {exc}"[:500]})
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception as sticky:  # noqa: BLE001 - e.g. an illegal address: the context is gone
                    self.log(f"CUDA context lost ({type(sticky).__name__}); saving what was measured")
                    self.r["errors"].append({**what, "error": f"CUDA context lost: {sticky}"[:500]})
                    self.save()
                    raise SystemExit(4) from sticky

    def run(self):
        """Baselines first, then our policies rank by rank across shapes (k4v4 and k16v16 lead), so a
        time budget that runs out cuts the least important points."""
        self.peaks()
        if not self.args.tune and self.r["vllm"]["status"] == "measured":
            self.guarded({"section": "vllm_checks"}, vllm_points.checks, self)
        if not self.args.tune:
            for shape in self.shapes:
                self.guarded({"section": "baselines", "shape": shape.name}, self.baselines, shape)
            for shape in self.shapes:  # the format options' cost (rotation, key groups): small, kept early
                if shape.name in layer_step.SHAPES[self.mode]:
                    self.guarded({"section": "layer_step", "shape": shape.name},
                                 layer_step.time_layer_steps, self, shape)
        ranked = {s.name: sorted(self.policies(s), key=lambda p: (p not in ("k4v4", "k16v16"),))
                  for s in self.shapes}
        for rank in range(max(map(len, ranked.values()), default=0)):
            for shape in self.shapes:
                if rank < len(ranked[shape.name]):
                    policy = ranked[shape.name][rank]
                    if policy not in POLICIES:
                        raise SystemExit(f"unknown policy {policy}; choose from {sorted(POLICIES)}")
                    self.guarded({"section": "ours", "shape": shape.name, "policy": policy},
                                 self.ours, shape, policy)
        failed = self.finish()
        return failed

    def finish(self):
        derive(self.r)
        self.r["elapsed_s"] = time.time() - self.t0
        from .plots import make_plots
        from .summary import render
        self.r["plots"] = make_plots(self.r, self.out)
        self.save()
        (self.out / "summary.md").write_text(render(self.r))
        failed = [c for c in self.r["checks"] if not c["ok"]]
        self.log(f"done: {len(self.r['decode'])} decode, {len(self.r['prefill'])} prefill, "
                 f"{len(self.r['write'])} write points; {len(failed)} failed checks; -> {self.out}")
        return failed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--shapes", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--policies", help=f"comma list of {sorted(POLICIES)}")
    ap.add_argument("--budget-s", type=float, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no CUDA device: timing needs a GPU (use --smoke on CPU)")
    runner = Runner(args)
    failed = runner.run()
    return 1 if failed or runner.r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
