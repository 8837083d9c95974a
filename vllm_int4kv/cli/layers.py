"""Which layers carry a layout's error, and which ones to keep unquantized.

    vllm-int4kv layers MODEL [--policy k4v4 | MAP] [--budget NATS] [--max-skip N] [--prompts N]
                             [--device cpu|cuda] [--json FILE]

First each layer alone is stored at its layout of ``--policy`` (a policy, or a per-layer map; every other
layer in full precision) and measured as ``calibrate`` measures whole policies: mean next-token KL against
full precision on the calibration prompts. Then the whole model is stored as ``--policy`` says while the
worst layers stay unquantized, one more at a time in the order of their single-layer KL, until the KL is
within the budget or ``--max-skip`` layers are kept. Every step is measured, not added up; the order is
greedy (layers are ranked alone, not by how their errors combine). The first step within budget is printed
as the map that serves it. ``auto`` searches over more layouts per layer than this (``calibrate``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict

from ..policy.layer_map import parse_policy_map
from ..policy.layout import UNQUANTIZED
from ..policy.sensitivity import Sweep, sweep
from .args import at_least, output_file
from .model_args import add_session_arguments, exit_with_reason, load_session, prepare


def add_parser(parser) -> None:
    add_session_arguments(parser)
    parser.add_argument("--policy", default="k4v4",
                        help="the layout of the quantized layers: a policy or a per-layer map (default k4v4)")
    parser.add_argument("--max-skip", type=at_least(0), default=8, help="most layers to keep unquantized")
    parser.add_argument("--json", type=output_file, default=None, help="also write every measurement here")
    parser.set_defaults(run=run)


def serve_flags(model: str, policy: str) -> str:
    return f"VLLM_INT4KV_POLICY='{policy}' vllm serve {model} --attention-backend CUSTOM"


def report(result: Sweep, model: str) -> str:
    total = sum(result.single.values())
    lines = [f"{'layer':>6}{'KL, this layer alone at ' + result.policy:>34}{'share':>8}"]
    for layer in sorted(result.single, key=result.single.get, reverse=True):
        share = result.single[layer] / total if total else 0.0
        lines.append(f"{layer:>6}{result.single[layer]:>34.5f}{share:>8.1%}")
    lines += ["", f"{'kept unquantized':<28}{'mean B/token/KV head':>22}{'mean KL':>10}{'top-1':>8}"]
    for step in result.steps:
        kept = " ".join(map(str, step.kept)) or "(none)"
        mark = "  <- within budget" if step is result.within_budget else ""
        lines.append(f"{kept:<28}{step.bytes_per_token:>22.1f}{step.kl:>10.5f}{step.top1:>8.1%}{mark}")
    chosen = result.within_budget
    lines.append("")
    if chosen is None:
        last = result.steps[-1]
        lines.append(f"no set of up to {len(last.kept)} unquantized layers brings {result.policy} within "
                     f"{result.budget:g} nats (KL {result.steps[0].kl:.4g} -> {last.kl:.4g}); compare whole "
                     "policies with `vllm-int4kv calibrate`")
    elif not chosen.kept:
        lines.append(f"{result.policy} is within budget on every layer: {serve_flags(model, result.policy)}")
    else:
        lines.append(f"within budget: {serve_flags(model, chosen.policy)}")
    return "\n".join(lines)


def run(args) -> int:
    if args.policy.strip().lower() == "auto":
        raise SystemExit("vllm-int4kv layers: --policy is the quantized layers' policy: give a fixed one such "
                         "as k4v4 (`vllm-int4kv calibrate` chooses auto's)")
    try:
        policy = parse_policy_map(args.policy)
    except ValueError as exc:
        raise SystemExit(f"vllm-int4kv layers: --policy: {exc}") from None
    if not policy.quantized:
        raise SystemExit("vllm-int4kv layers: --policy must quantize something (k16v16 has no error)")

    def check_policy(head_dim: int, elem_bytes: int) -> None:  # a policy this head size cannot take
        try:
            policy.check_head_dim(head_dim, elem_bytes)
        except ValueError as exc:
            raise ValueError(f"--policy: {exc}") from None

    settings, _, head_dim, elem_bytes, dtype, token_ids = prepare(args, "layers", check_policy)
    target = settings.target
    with exit_with_reason("layers"), load_session(args, token_ids, dtype) as session:
        num_layers = len(session.attention_layers)
        policy.check_layers(session.attention_layers)
        size = policy.mean_slot_bytes(session.attention_layers, head_dim, elem_bytes)
        print(f"model {args.model}: {num_layers} attention layers, head_dim {head_dim}; {policy.name}: "
              f"{size:g} B/token/KV head, unquantized layers "
              f"{UNQUANTIZED.slot_bytes(head_dim, elem_bytes)}; target {target:g} nats (budget "
              f"{settings.budget:g}, ≈ {math.expm1(settings.budget):+.2%} ppl, x margin {settings.margin:g}); "
              f"{session.n_tokens} tokens on {session.device}", flush=True)
        result = sweep(session, policy, head_dim, elem_bytes, target, args.max_skip)
    print(report(result, args.model))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "n_tokens": session.n_tokens, **asdict(result)}, f, indent=1)
    return 0
