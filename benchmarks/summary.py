"""Render results.json as Markdown: machine, peaks, goals, decode/prefill/write tables, tuning, estimates.

    python benchmarks/summary.py RESULTS.json > summary.md    (recomputes speedups, goals, estimates)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

VLLM_PREFIX = "speedup_vs_vllm_"


def _f(x, fmt="{:.1f}"):
    return "–" if x is None else fmt.format(x)


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _goals(r):
    out = ["## Goals\n"]
    rows = []
    for name, g in r["goals"].items():
        numbers = {k: v for k, v in g.items() if k not in ("goal", "status", "ratios", "note")}
        rows.append([name, g["goal"], f"**{g['status']}**", json.dumps(numbers, default=str)[:400]])
    out.append(_table(["goal", "definition", "status", "measured"], rows))
    if not r.get("timing_meaningful", True):
        out.append("\n*CPU interpreter run: the statuses above are computed but the times mean nothing.*\n")
    return "\n".join(out)


def _decode(r):
    out = ["## Decode attention (one layer, one query token per sequence)\n",
           "Time per call (µs), achieved GB/s of unique bytes (KV rows + scales + block table + Q + out), "
           "% of measured copy bandwidth, speedups measured in this run "
           "(baseline time / our time).\n"]
    sdpa = {(x["shape"], x["batch"], x["context"]): x for x in r["sdpa_decode"]}
    for shape in dict.fromkeys(x["shape"] for x in r["decode"]):
        rows = []
        for x in (x for x in r["decode"] if x["shape"] == shape):
            s = sdpa.get((shape, x["batch"], x["context"]))
            rows.append([x["policy"], x["batch"], x["context"], x["num_splits"], _f(x["median_us"]),
                         _f(x.get("gbs"), "{:.0f}"), _f(x.get("pct_copy"), "{:.0f}%"),
                         _f(x.get("speedup_vs_k16v16"), "{:.2f}x"), _f(x.get("speedup_vs_sdpa"), "{:.2f}x"),
                         _f(s and s["median_us"]), _vs_vllm(x)])
        out.append(f"### {shape}\n")
        out.append(_table(["policy", "batch", "context", "splits", "µs", "GB/s", "% copy", "vs k16v16",
                           "vs SDPA", "SDPA µs", "vs vLLM"], rows))
    return "\n".join(out)


def _vs_vllm(x) -> str:
    """vLLM's time / ours per vLLM cache mode measured at this point (>1: we are faster)."""
    return " ".join(f"{k[len(VLLM_PREFIX):]} {v:.2f}x" for k, v in x.items() if k.startswith(VLLM_PREFIX)) or "–"


def _prefill(r):
    rows = [[x["kind"], x["shape"], x["policy"], x["num_seqs"], x["new_tokens"], x["context"],
             _f(x["median_us"]), _f(x.get("tflops"), "{:.0f}"), _f(x.get("speedup_vs_k16v16"), "{:.2f}x"),
             _f(x.get("speedup_vs_sdpa"), "{:.2f}x"), _vs_vllm(x)] for x in r["prefill"]]
    return ("## Prefill and chunked prefill over the paged cache\n\n"
            + _table(["kind", "shape", "policy", "seqs", "new tokens", "cached", "µs", "TFLOP/s",
                      "vs k16v16", "vs SDPA", "vs vLLM"], rows))


def _write(r):
    rows = [[x["shape"], x["policy"], x["tokens"], _f(x["median_us"]), _f(x.get("gbs"), "{:.0f}"),
             _f(x.get("pct_copy"), "{:.0f}%"), _vs_vllm(x)] for x in r["write"]]
    return ("## Cache write (one layer)\n\nvs vLLM: its INT4 write (Triton); its bf16/fp8 writes are CUDA "
            "ops of vllm._C, not timed.\n\n"
            + _table(["shape", "policy", "tokens", "µs", "GB/s", "% copy", "vs vLLM"], rows))


def _layer_step(r):
    rows = r.get("layer_step") or []
    if not rows:
        return ""
    base = {(x["shape"], x["batch"], x["context"]): x["median_us"] for x in rows if x["policy"] == "k4v4"}

    def vs_k4v4(x):
        plain = base.get((x["shape"], x["batch"], x["context"]))
        return x["median_us"] / plain if plain else None

    table = [[x["shape"], x["policy"], x["batch"], x["context"], _f(x["median_us"]),
              _f(x.get("vs_plain"), "{:.2f}x"), _f(vs_k4v4(x), "{:.2f}x")] for x in rows]
    return ("## Format options at decode (one layer: cache write + attention, through attention_ops)\n\n"
            "`-rot` adds the Hadamard GEMMs around the kernels; `-g32` adds key scale/zero loads. "
            "Same pages within a family.\n\n"
            + _table(["shape", "policy", "batch", "context", "µs", "vs same pages unrotated",
                      "vs k4v4"], table))


def _layer_step_map(r):
    rows = r.get("layer_step_map") or []
    if not rows:
        return ""
    table = [[x["shape"], x["policy"], x["batch"], x["context"], _f(x["model_step_us"]),
              ", ".join(f"{name} {us:.1f}" for name, us in x["uniform_model_step_us"].items())] for x in rows]
    return ("## Per-layer maps at decode (whole model: the sum of each layer's step)\n\n"
            + _table(["shape", "map", "batch", "context", "µs", "the same with every layer at one layout (µs)"],
                     table))


def _options(x) -> list[str]:
    return [" ".join(f"{k}:{v:.1f}" for k, v in x.get(key, {}).items())
            for key in ("warps_us", "stages_us", "tiles_us")]


def _tune(r):
    if not r["tune_splits"] and not r.get("tune_prefill"):
        return ""
    rows = [[x["shape"], x["policy"], x["batch"], x["context"], x["heuristic"], x["best"],
             _f(x["heuristic_over_best"], "{:.2f}"),
             " ".join(f"{k}:{v:.1f}" for k, v in x["times_us"].items()), *_options(x)] for x in r["tune_splits"]]
    worst = max((x["heuristic_over_best"] for x in r["tune_splits"]), default=float("nan"))
    text = ("## Split-count, warp, stage and tile-route tuning (choose_num_splits vs best measured; the "
            "launcher uses 4 warps, Triton's default stages, and passes converted KV tiles to the dot "
            "through shared memory: `shared`; `per-warp`: in the dot's layout)\n\nWorst heuristic/best time "
            f"ratio: {worst:.2f}\n\n" + _table(["shape", "policy", "batch", "context", "heuristic", "best",
                                                "heur/best", "µs by splits", "µs by warps (best splits)",
                                                "µs by stages (best splits, 4 warps)",
                                                "µs by tile route (best splits)"], rows))
    if r.get("tune_prefill"):
        rows = [[x["kind"], x["shape"], x["policy"], x["num_seqs"], x["new_tokens"], x["context"], *_options(x)]
                for x in r["tune_prefill"]]
        text += ("\nPrefill:\n\n" + _table(["kind", "shape", "policy", "seqs", "new tokens", "context",
                                                "µs by warps", "µs by stages (4 warps)",
                                                "µs by tile route"], rows))
    return text


def _estimates(r):
    if not r["model_estimates"]:
        return ""
    def ends_and_middle(values):
        v = sorted(set(values))
        return {v[0], v[len(v) // 2], v[-1]}
    batches = ends_and_middle(e["batch"] for e in r["model_estimates"])
    contexts = ends_and_middle(e["context"] for e in r["model_estimates"])
    rows = []
    for e in r["model_estimates"]:
        if e["batch"] not in batches or e["context"] not in contexts:
            continue  # the JSON has every point; the table shows the corners and the middle
        cells = [e["shape"], e["batch"], e["context"]]
        for p in ("k4v4", "k16v16"):
            est = e.get(p)
            cells += [_f(est and est["tokens_per_s"], "{:.0f}"), _f(est and 100 * est["attention_fraction"], "{:.0f}%")]
        cap = e["capacity_seqs"]
        cells += [cap.get("k4v4"), cap.get("k8v4"), cap.get("k16v16")]
        rows.append(cells)
    return ("## Model-level estimate (all layers; see model_estimate.py for the formula)\n\n"
            "tokens/s upper bound of a decode step (weights at copy bandwidth or GEMM peak + measured "
            "attention + cache write per layer); capacity = max concurrent sequences at that context in "
            "40 GiB of KV.\n\n"
            + _table(["shape", "batch", "context", "k4v4 tok/s", "k4v4 attn", "k16v16 tok/s", "k16v16 attn",
                      "cap k4v4", "cap k8v4", "cap k16v16"], rows))


def render(r: dict) -> str:
    m = r["machine"]
    parts = [f"# INT4 KV-cache kernel benchmark ({r['mode']}{', tune' if r.get('tune') else ''})\n",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items() if v is not None) + "\n",
             f"Copy bandwidth (measured: bytes read + written by a {(r['copy'] or {}).get('bytes', 0) / 2 ** 21:.0f}"
             f" MiB device copy / time): **{_f(r['copy_bandwidth_gbs'], '{:.0f}')} GB/s**; bf16 GEMM "
             f"{_f((r['gemm'] or {}).get('tflops'), '{:.0f}')} TFLOP/s. Model dtype {r['dtype']}, "
             f"block size {r['block_size']}.\n",
             f"vLLM unified attention: {r['vllm']['status']}.\n"]
    parts += [f"- {n}\n" for n in r["notes"]]
    parts += [f"- ERROR {e}\n" for e in r.get("errors", [])]
    failed = [c for c in r["checks"] if not c["ok"]]
    parts.append(f"Correctness checks against the torch reference: {len(r['checks']) - len(failed)}/"
                 f"{len(r['checks'])} passed" + (f" — FAILED: {failed}" if failed else "") + ".\n")
    if r["skipped"]:
        reasons = {}
        for s in r["skipped"]:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        parts.append("Skipped points: " + "; ".join(f"{n}× {k}" for k, n in reasons.items()) + ".\n")
    if r.get("plots"):
        parts.append("Plots: " + ", ".join(f"`{p}`" for p in r["plots"]) + "\n")
    for section in (_goals, _decode, _prefill, _write, _layer_step, _layer_step_map, _tune, _estimates):
        if section is not _goals or r["goals"]:
            parts.append(section(r))
    return "\n".join(parts)


if __name__ == "__main__":  # re-derives first, so a run cut short (results.json only) still renders
    here = Path(__file__).resolve().parent
    sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))
    from benchmarks.analysis import derive

    results = json.loads(Path(sys.argv[1]).read_text())
    results.setdefault("errors", [])
    sys.stdout.write(render(derive(results)))
