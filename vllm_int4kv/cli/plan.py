"""``vllm-int4kv plan``: the capacity planner's command line, table and plot (arithmetic in planner.py)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from ..planner.capacity import (GIB, DEFAULT_POLICIES, _ELEM_BYTES, ModelKV, load_config, model_from_config, round_up, sequence_bytes, PolicyPlan, PlanInputs, plan, measured_bandwidth)
from ..policy.layer_map import parse_policy_map, split_policy_list
from .args import above, at_least, fraction, output_file

def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def format_table(rows: list[PolicyPlan], x: PlanInputs, x_kept: bool = False) -> str:
    lines = [
        ("bytes/token, all layers", lambda r: f"{r.bytes_per_token}"),
        ("bytes/token/layer (mean)" if x_kept else "bytes/token/layer", lambda r: f"{r.bytes_per_token_per_layer}"),
        ("capacity vs BF16", lambda r: f"{r.capacity_vs_bf16:.2f}x"),
        (f"KV per sequence @ {x.context}", lambda r: fmt_bytes(r.seq_bytes)),
        ("max tokens (1 sequence)", lambda r: "unbounded" if r.max_tokens is None else f"{r.max_tokens}"),
        (f"max sequences @ {x.context}", lambda r: f"{r.max_seqs}"),
        (f"HBM read/step, batch {x.batch}", lambda r: fmt_bytes(r.step_read_bytes)),
        (f"KV positions over G={x.gen_tokens}", lambda r: f"{r.gen_positions}"),
        (f"HBM read over G, batch {x.batch}", lambda r: fmt_bytes(r.gen_read_bytes)),
        ("attention time/step", lambda r: fmt_seconds(r.step_time_s)),
        ("attention time over G", lambda r: fmt_seconds(r.gen_time_s)),
    ]
    table = [["metric", *(r.policy for r in rows)]] + [[name, *map(f, rows)] for name, f in lines]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in table]
    return "\n".join([out[0], "-" * len(out[0]), *out[1:]])


def plot(model: ModelKV, policies, x: PlanInputs, path: str, weights_bytes: int | None) -> None:
    """KV memory of ``batch`` sequences against context, per policy, with the KV budget and weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(4 * x.context, 32768)
    contexts = sorted({round_up(int(256 * (top / 256) ** (i / 63)), x.block_size) for i in range(64)})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in policies:
        gib = [x.batch * sequence_bytes(model, p, c, x.block_size, x.tp) / GIB for c in contexts]
        ax.plot(contexts, gib, label=p.name)
    budget_gib = x.kv_budget_bytes / GIB
    ax.axhline(budget_gib, color="k", ls="--", label=f"KV budget {budget_gib:.1f} GiB")
    if weights_bytes:
        ax.axhline(weights_bytes / GIB, color="gray", ls=":", label=f"weights {weights_bytes / GIB:.1f} GiB")
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="context (tokens)", ylabel=f"KV memory, batch {x.batch} (GiB per rank)",
           title=f"{model.name}: KV memory per policy (tp {x.tp})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------------

_CONFIG_FLAGS = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads",
                 "num_attention_heads": "num_attention_heads", "head_dim": "head_dim",
                 "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                 "vocab_size": "vocab_size", "sliding_window": "sliding_window"}


def add_parser(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model (a local HF folder and/or config values; values override)")
    m.add_argument("--model", help="local Hugging Face model folder or its config.json")
    m.add_argument("--name", help="name shown in the report")
    for flag in _CONFIG_FLAGS:  # --sliding-window 0: plan without the config's window
        m.add_argument("--" + flag.replace("_", "-"), type=at_least(0 if flag == "sliding_window" else 1))
    m.add_argument("--sliding-layers", help="which layers use --sliding-window: all, even, odd, or a "
                   "list of indices and ranges like 0-13,20 (default: the config's rule, else all)")
    m.add_argument("--sliding-pattern", type=at_least(2), help="Gemma-style: every N-th layer is global")
    m.add_argument("--dtype", choices=sorted(_ELEM_BYTES),
                   help="served dtype (default: 16-bit, as vLLM serves even fp32 checkpoints under --dtype auto)")
    b = parser.add_argument_group("memory budget (per GPU)")
    b.add_argument("--kv-budget-gib", type=above(0), help="KV cache budget; or give --gpu-memory-gib")
    b.add_argument("--gpu-memory-gib", type=above(0), help="GPU memory; KV budget = this * utilization "
                   "- weights/tp - overhead")
    b.add_argument("--gpu-memory-utilization", type=fraction, default=0.9)
    b.add_argument("--weights-gib", type=at_least(0.0, float),
                   help="model weights (default: estimated from config)")
    b.add_argument("--overhead-gib", type=at_least(0.0, float), default=0.0, help="activations etc. (default 0)")
    w = parser.add_argument_group("workload")
    w.add_argument("--context", type=at_least(1), default=8192,
                   help="context length C (and cached prefix C0)")
    w.add_argument("--batch", type=at_least(1), default=1)
    w.add_argument("--gen-tokens", type=at_least(0), default=1024, help="generated tokens G after the context")
    w.add_argument("--block-size", type=at_least(1), default=16)
    w.add_argument("--tensor-parallel-size", "-tp", type=at_least(1), default=1)
    w.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma-separated policies or per-layer maps (e.g. k16v16,'k4v4-rot;0-2,8:k8v4')")
    w.add_argument("--skip-layers", help="layers kept unquantized (K16V16), as --kv-cache-dtype-skip-layers "
                   "serves them: e.g. 0,1 or 0-3, or sliding_window for every sliding-window layer")
    w.add_argument("--bandwidth-gbs", type=above(0), help="HBM bandwidth (default: measured, else datasheet)")
    parser.add_argument("--plot", type=plot_file,
                        help="write a plot of KV memory against context (.png, .svg, .pdf)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")  # matplotlib picks the format from the name


def plot_file(text: str) -> str:
    if not text.lower().endswith(PLOT_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{text}: give a file name ending in {', '.join(PLOT_SUFFIXES)}")
    return output_file(text)


def parse_layers(spec: str, n: int, flag: str = "--sliding-layers") -> set[int]:
    """``all``, ``even``, ``odd`` (``--sliding-layers`` only: vLLM's skip flag has no such names) or
    ``0-13,20`` -> layer indices."""
    named = {"all": range(n), "even": range(0, n, 2), "odd": range(1, n, 2)}
    if spec in named and flag == "--sliding-layers":
        return set(named[spec])
    layers = set()
    strict = flag == "--skip-layers"  # vLLM compares its entries with str(index): 01 keeps nothing
    for part in spec.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.isdigit() and (b == str(int(b)) or not strict) for b in bounds):
            hint = "; vLLM ignores entries such as 01" if strict else ", or all, even, odd"
            raise ValueError(f"{flag} {spec!r}: give layer indices as plain numbers such as 0,1 or ranges "
                             f"such as 0-3{hint}")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if lo > hi:
            raise ValueError(f"{flag} {spec!r}: the range {part.strip()} runs backwards; write {hi}-{lo}")
        layers.update(range(lo, hi + 1))
    if max(layers) >= n:
        raise ValueError(f"{flag} {spec!r} names layers outside 0..{n - 1}")
    return layers


def model_from_args(args) -> ModelKV:
    cfg = load_config(args.model) if args.model else {}
    cfg.update({key: getattr(args, flag) for flag, key in _CONFIG_FLAGS.items()
                if getattr(args, flag) is not None})
    if args.num_kv_heads and not cfg.get("num_attention_heads"):
        cfg["num_attention_heads"] = args.num_kv_heads  # only the KV heads matter for the cache
    if args.sliding_pattern:
        cfg.pop("layer_types", None)
        cfg["sliding_window_pattern"] = args.sliding_pattern
    if args.sliding_layers:
        if not cfg.get("sliding_window"):
            raise ValueError("--sliding-layers needs --sliding-window (or a config that sets it)")
        n = cfg.get("num_hidden_layers") or 0
        sliding = parse_layers(args.sliding_layers, n)
        cfg["layer_types"] = ["sliding_attention" if i in sliding else "full_attention" for i in range(n)]
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise ValueError(f"{kv_heads} KV heads must divide {heads} attention heads (--num-kv-heads, "
                         "--num-attention-heads)")
    name = args.name or (Path(args.model).name if args.model else "model")
    model = model_from_config(cfg, name, _ELEM_BYTES[args.dtype] if args.dtype else None)
    if args.skip_layers == "sliding_window":
        # vLLM keeps the layers it gives a sliding window; Llama 4's chunked layers, whose span the plan
        # counts as a window too, are not among them
        types = cfg.get("layer_types") or ()
        kept = [i for i, w in enumerate(model.windows) if w and (not types or types[i] == "sliding_attention")]
        if not kept:
            raise ValueError("--skip-layers sliding_window: this model has no sliding-window layer")
        model = replace(model, kept=tuple(kept))
    elif args.skip_layers:
        model = replace(model, kept=tuple(parse_layers(args.skip_layers, model.num_layers, "--skip-layers")))
    return model


def _budget(args, model: ModelKV, weights: int | None, tp: int) -> tuple[int, str]:
    if args.kv_budget_gib is not None:
        if args.gpu_memory_gib is not None:
            raise ValueError("give --kv-budget-gib or --gpu-memory-gib, not both")
        return int(args.kv_budget_gib * GIB), f"{args.kv_budget_gib:g} GiB KV (given)"
    if args.gpu_memory_gib is None:
        raise ValueError("give --kv-budget-gib or --gpu-memory-gib")
    if weights is None:
        raise ValueError("weights size unknown from config; pass --weights-gib or --kv-budget-gib")
    usable = args.gpu_memory_gib * GIB * args.gpu_memory_utilization
    budget = int(usable - weights / tp - args.overhead_gib * GIB)
    if budget <= 0:
        raise ValueError(f"no memory left for KV: {fmt_bytes(usable)} usable, weights/rank "
                         f"{fmt_bytes(weights / tp)}")
    return budget, (f"{fmt_bytes(budget)} KV = {args.gpu_memory_gib:g} GiB x {args.gpu_memory_utilization:g}"
                    f" - weights/rank {fmt_bytes(weights / tp)} - overhead {args.overhead_gib:g} GiB")


def run(args) -> int:
    try:
        model = model_from_args(args)
        weights = int(args.weights_gib * GIB) if args.weights_gib is not None else model.weights_bytes
        tp = args.tensor_parallel_size
        budget, budget_text = _budget(args, model, weights, tp)
        bandwidth, bw_text = ((args.bandwidth_gbs, f"{args.bandwidth_gbs:g} GB/s (given)")
                              if args.bandwidth_gbs else measured_bandwidth())
        names = split_policy_list(args.policies)
        if not names or "auto" in (n.lower() for n in names):
            raise ValueError("--policies: give fixed policies or maps such as k16v16,k8v4,k4v4 (auto is decided "
                             "per model by `vllm-int4kv calibrate`, which prints the policy to plan with)")
        policies = [parse_policy_map(n) for n in names]
        inputs = PlanInputs(args.context, args.batch, args.gen_tokens, budget, bandwidth,
                            args.block_size, tp)
        rows = plan(model, policies, inputs)
    except (ValueError, FileNotFoundError) as err:  # UnsupportedModel included
        print(f"vllm-int4kv plan: {err}")
        return 2
    if args.json:
        print(json.dumps({"model": asdict(model), "inputs": asdict(inputs), "bandwidth": bw_text,
                          "policies": [asdict(r) for r in rows]}, indent=2))
    else:
        print(_header(model, inputs, weights, budget_text, bw_text))
        print(format_table(rows, inputs, bool(model.kept) or any(p.single is None for p in policies)))
        for r in rows:
            if r.max_seqs < args.batch:
                print(f"note: batch {args.batch} does not fit with {r.policy} at context {args.context} "
                      f"(at most {r.max_seqs} sequences)")
    if args.plot:
        plot(model, policies, inputs, args.plot, weights)
        print(f"plot written to {args.plot}")
    return 0


def _header(model: ModelKV, x: PlanInputs, weights: int | None, budget_text: str, bw_text: str) -> str:
    windows = sorted({w for w in model.windows if w})
    sliding = f", {model.num_sliding} sliding with window {'/'.join(map(str, windows))}" if windows else ""
    return "\n".join([
        f"model {model.name}: {model.num_layers} layers ({model.num_layers - model.num_sliding} global"
        f"{sliding}), {model.num_kv_heads} KV heads ({model.kv_heads_per_rank(x.tp)} per rank, tp {x.tp}), "
        f"head dim {model.head_dim}, {8 * model.elem_bytes}-bit model dtype"
        + (f", weights {fmt_bytes(weights)}" if weights else ""),
        *([f"layers kept unquantized (K16V16 in every policy): {','.join(map(str, model.kept))}"]
          if model.kept else []),
        f"budget per rank: {budget_text}; block size {x.block_size}",
        f"workload: context C0 = {x.context}, batch {x.batch}, G = {x.gen_tokens} generated tokens",
        f"bandwidth: {bw_text}; times count decode-attention KV reads only",
        "all numbers per rank",
        "",
    ])
