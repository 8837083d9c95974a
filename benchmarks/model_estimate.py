"""Whole-model decode estimate from measured kernel times, and KV capacity per policy.

A decode step of an L-layer model is estimated as
    weights: max(weight bytes / copy bandwidth, 2 * params * batch / GEMM FLOP/s)   (measured peaks)
  + L * (attention time at (batch, context) + cache-write time of `batch` tokens)   (measured kernels)
Everything else (norms, rotary, sampling, launch gaps) is left out, so tokens/s is an upper bound; the
attention share is what the KV format changes. Points not measured are scaled from the nearest
measured one by bytes (decode is bandwidth-bound), and say so.

    python benchmarks/model_estimate.py RESULTS.json --shape llama3-8b --batch 64 --context 8192 \
        [--policy k4v4] [--kv-gib 40]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    here = Path(__file__).resolve().parent  # the script's folder would shadow modules named like ours
    sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))
    __package__ = "benchmarks"  # noqa: A001

from vllm_int4kv.planner.capacity import ModelKV, sequence_bytes  # noqa: E402
from vllm_int4kv.policy import parse_policy  # noqa: E402

from .config import BLOCK_SIZE, POLICIES, SHAPES, ModelShape, make_layout  # noqa: E402
from .traffic import decode_bytes  # noqa: E402


def _attention_us(results, shape: ModelShape, policy: str, batch: int, context: int):
    rows = [r for r in results["decode"] if r["shape"] == shape.name and r["policy"] == policy]
    for r in rows:
        if r["batch"] == batch and r["context"] == context:
            return r["median_us"], "measured"
    if not rows:
        return None, "no measurement"
    want = batch * context
    near = min(rows, key=lambda r: abs(math.log(r["batch"] * r["context"] / want)))
    layout = make_layout(shape, policy)
    target = decode_bytes(shape, layout, batch, context, 1)["bytes"]
    return near["median_us"] * target / near["bytes"], f"scaled from batch {near['batch']} context {near['context']}"


def _write_us(results, shape: ModelShape, policy: str, tokens: int):
    rows = [r for r in results["write"] if r["shape"] == shape.name and r["policy"] == policy]
    exact = [r for r in rows if r["tokens"] == tokens]
    if exact:
        return exact[0]["median_us"]
    larger = [r for r in rows if r["tokens"] >= tokens]  # launch-bound below, so never scale down
    return min(larger, key=lambda r: r["tokens"])["median_us"] if larger else None


def step_estimate(results, shape: ModelShape, policy: str, batch: int, context: int) -> dict | None:
    attn, how = _attention_us(results, shape, policy, batch, context)
    if attn is None or not results.get("copy_bandwidth_gbs"):
        return None
    weight_bytes = 2 * shape.params_billion * 1e9
    weights_us = weight_bytes / results["copy_bandwidth_gbs"] / 1e3
    tflops = (results.get("gemm") or {}).get("tflops")
    if tflops:
        weights_us = max(weights_us, 2 * shape.params_billion * 1e9 * batch / tflops / 1e6)
    write = _write_us(results, shape, policy, batch)
    step = weights_us + shape.num_layers * (attn + (write or 0.0))
    return {"shape": shape.name, "policy": policy, "batch": batch, "context": context,
            "attention_us_per_layer": attn, "attention_source": how, "write_us_per_layer": write,
            "weights_us": weights_us, "step_us": step, "tokens_per_s": batch / step * 1e6,
            "attention_fraction": shape.num_layers * attn / step,
            "write_fraction": shape.num_layers * (write or 0.0) / step}


def capacity(shape: ModelShape, context: int, kv_gib: float) -> dict:
    """Max concurrent sequences of ``context`` tokens in ``kv_gib`` of KV memory, per policy."""
    model = ModelKV(shape.num_layers, shape.num_kv_heads, shape.head_dim)  # the planner's arithmetic
    return {policy: int(kv_gib * 2 ** 30 // sequence_bytes(model, parse_policy(policy), context, BLOCK_SIZE))
            for policy in POLICIES}


def estimates_for(results: dict, kv_gib: float = 40.0) -> list[dict]:
    """The estimate table the summary prints: every shape, a small and a large batch, two contexts."""
    rows = []
    for r in results["decode"]:
        if r["policy"] != "k4v4":
            continue
        shape = SHAPES[r["shape"]]
        row = {"shape": shape.name, "batch": r["batch"], "context": r["context"]}
        for policy in ("k4v4", "k16v16"):
            est = step_estimate(results, shape, policy, r["batch"], r["context"])
            row[policy] = est and {k: est[k] for k in ("step_us", "tokens_per_s", "attention_fraction",
                                                         "attention_source")}
        row["capacity_seqs"] = capacity(shape, r["context"], kv_gib)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--policy", default=None, choices=sorted(POLICIES), help="default: every policy")
    ap.add_argument("--kv-gib", type=float, default=40.0, help="KV memory for the capacity table")
    args = ap.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    shape = SHAPES[args.shape]
    for policy in [args.policy] if args.policy else POLICIES:
        est = step_estimate(results, shape, policy, args.batch, args.context)
        if est is None:
            print(f"{policy:9s} not measured")
            continue
        print(f"{policy:9s} step {est['step_us'] / 1e3:8.3f} ms  {est['tokens_per_s']:10.0f} tok/s  "
              f"attention {est['attention_fraction']:5.1%} ({est['attention_source']})")
    cap = capacity(shape, args.context, args.kv_gib)
    print(f"capacity at context {args.context} in {args.kv_gib} GiB KV: "
          + ", ".join(f"{p} {n}" for p, n in cap.items()))


if __name__ == "__main__":
    main()
