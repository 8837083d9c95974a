"""What the format options cost at decode: one layer's step as the backend runs it, with and without them.

Hadamard rotation is not in the kernels: ``attention_ops`` rotates the new K/V before the cache write and
the query before attention, and rotates the output back (small fp32 GEMMs around the kernels). Key
channel groups are in the kernels (more scale/zero loads). So this times the backend's whole per-layer
decode step, ``attention.write_kv`` then ``attention.attend`` for one new token per sequence,
for a policy and its ``-rot`` / ``-g32`` variants, on the same pages. The auto policy picks among these
variants by quality; this gives the speed side of that trade-off.

A per-layer map's decode step is the sum of its layers' steps: ``MAPS`` rows add up the timed layouts
over the shape's layers (``layer_step_map``), beside the uniform policies' whole-model steps.
"""
from __future__ import annotations

import math

import torch

from vllm_int4kv import attention as ops
from vllm_int4kv.policy import parse_policy
from vllm_int4kv.policy.layer_map import parse_policy_map

from . import traffic
from .config import BLOCK_SIZE, ModelShape, make_layout
from .workloads import Pool

# (policy whose pages are timed, variants timed on the same pages): -rot shares its layout
FAMILIES = {"k4v4": ("k4v4", "k4v4-rot"), "k4v4-g32": ("k4v4-g32", "k4v4-g32-rot"),
            "k8v4": ("k8v4", "k8v4-rot"), "k16v16": ("k16v16",)}
POINTS = {"default": ((1, 4096), (16, 4096), (64, 4096), (16, 32768)),
          "quick": ((1, 4096), (64, 4096)),
          "smoke": ((2, 40),)}
SHAPES = {"default": ("llama3-8b", "smollm2-135m"), "quick": ("llama3-8b",), "smoke": ("smollm2-135m",)}
# per-layer maps whose layouts are all timed above: a few fragile layers upgraded, the rest at K4V4
MAPS = ("k4v4-rot;0-1:k8v4-rot", "k4v4-rot;0-1,8:k16v16")


class LayerStepCase:
    """``copies`` decode steps over disjoint pages: ``batch`` sequences of ``context`` tokens each."""

    def __init__(self, pool: Pool, batch: int, context: int, copies: int, rotated: bool):
        shape, dev, dtype = pool.shape, pool.device, pool.dtype
        self.pool, self.rotated = pool, rotated
        blocks = math.ceil(context / BLOCK_SIZE)
        pos = context - 1  # the new token's position
        self.steps = []
        for table in pool.tables(copies, batch, blocks):
            slots = table[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
            meta = ops.Int4KVMetadata(
                num_actual_tokens=batch, max_query_len=1, max_seq_len=context,
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
                seq_lens=torch.full((batch,), context, dtype=torch.int32, device=dev),
                block_table=table, slot_mapping=slots)
            q = torch.randn(batch, shape.num_q_heads, shape.head_dim, device=dev, dtype=dtype)
            k, v = (torch.randn(batch, shape.num_kv_heads, shape.head_dim, device=dev, dtype=dtype)
                    for _ in range(2))
            self.steps.append((q, k, v, meta, torch.empty_like(q)))

    def fns(self):
        layout, cache, rotated = self.pool.layout, self.pool.cache, self.rotated
        sm_scale = self.pool.shape.head_dim ** -0.5

        def step(q, k, v, meta, out):
            ops.write_kv(k, v, cache, meta.slot_mapping, layout, impl="triton", rotated=rotated)
            ops.attend(q, cache, layout, meta, out, impl="triton", rotated=rotated, sm_scale=sm_scale,
                       sliding_window=None, softcap=None)
        return [lambda s=s: step(*s) for s in self.steps]


def step_bytes(shape: ModelShape, layout, batch: int, context: int, elem_bytes: int) -> dict:
    """Attention reads (unsplit count) plus the new rows' write."""
    read = traffic.decode_bytes(shape, layout, batch, context, 1, elem_bytes)
    write = traffic.write_bytes(shape, layout, batch, elem_bytes)
    return {"bytes": read["bytes"] + write["bytes"],
            "breakdown": {**read["breakdown"], **{f"write_{k}": v for k, v in write["breakdown"].items()}}}


def time_layer_steps(runner, shape: ModelShape) -> None:
    """Rows in ``runner.r["layer_step"]``; each variant's ``vs_plain`` is its time over the plain policy's."""
    eb = runner.dtype.itemsize
    for family, variants in FAMILIES.items():
        layout = make_layout(shape, family, eb)
        want = [math.ceil(c / BLOCK_SIZE) * b * runner.copies(traffic.cache_bytes(shape, layout, b, c))
                for b, c in POINTS[runner.mode]]
        if runner.out_of_time() or max(want) * shape.num_kv_heads * layout.run_bytes > runner.usable_bytes():
            runner.skip({"table": "layer_step", "shape": shape.name, "policy": family}, "time or memory")
            continue
        pool = Pool(shape, layout, max(want), runner.device, runner.dtype)
        for batch, context in POINTS[runner.mode]:
            copies = runner.copies(traffic.cache_bytes(shape, layout, batch, context))
            plain_us = None
            for name in variants:
                rotated = parse_policy(name).rotate
                timed = runner.bench(LayerStepCase(pool, batch, context, copies, rotated).fns())
                point = {"shape": shape.name, "policy": name, "batch": batch, "context": context,
                         "copies": copies}
                row = runner.record("layer_step", point, timed, step_bytes(shape, layout, batch, context, eb))
                plain_us = plain_us or row["median_us"]
                row["vs_plain"] = row["median_us"] / plain_us
        del pool
    add_map_rows(runner.r, shape)
    runner.save()


def add_map_rows(results: dict, shape: ModelShape) -> None:
    """``results["layer_step_map"]``: per point, each map's whole-model decode step (the sum over the
    shape's layers of its layouts' timed steps) and the same for the uniform policies it mixes."""
    timed = {(row["policy"], row["batch"], row["context"]): row["median_us"]
             for row in results["layer_step"] if row["shape"] == shape.name}
    points = sorted({(b, c) for _, b, c in timed})
    rows = results.setdefault("layer_step_map", [])
    for name in MAPS:
        policy_map = parse_policy_map(name)
        layouts = [policy_map.for_layer(i).name for i in range(shape.num_layers)]
        for batch, context in points:
            steps = [timed.get((layout, batch, context)) for layout in layouts]
            if None in steps:
                continue
            uniform = {p.name: shape.num_layers * timed[(p.name, batch, context)] for p in policy_map.policies
                       if (p.name, batch, context) in timed}
            rows.append({"shape": shape.name, "policy": policy_map.name, "batch": batch, "context": context,
                         "model_step_us": sum(steps), "uniform_model_step_us": uniform})
