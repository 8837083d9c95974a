"""Quality of vLLM's own quantized KV caches beside ours, measured the same way on the same model.

    python benchmarks/vllm_quality.py MODEL --eval-text FILE [--eval-chunks 6] [--maps MAP,...] [--out DIR]

One calibration session (HF transformers, the prompts ``auto`` calibrates on): every uniform candidate of
ours (which also gives ``auto``'s best uniform policy), the per-layer maps given (``--maps``: e.g. the one
``vllm-int4kv calibrate`` chose), then vLLM 0.32's ``fp8``, ``fp8_per_token_head``,
``int8_per_token_head`` and ``int4_per_token_head`` caches through the emulations in ``vllm_formats.py``
(checked against vLLM's own kernels in ``tests/test_vllm_kernels.py``). Per layout: bytes per token per
KV head (16-bit model), mean next-token KL against full precision and top-1 agreement on the calibration
prompts, and perplexity on held-out text. Writes ``vllm-formats.json`` and ``vllm-formats.md``.

vLLM's fp8 cache is measured with its default per-tensor scale of 1.0 (what ``--kv-cache-dtype fp8``
gives a checkpoint without KV scales).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.vllm_formats import FORMATS  # noqa: E402
from vllm_int4kv.policy import calibration, session  # noqa: E402
from vllm_int4kv.policy import decide as auto  # noqa: E402
from vllm_int4kv.policy.layer_map import parse_policy_map  # noqa: E402

BF16_BYTES = 2  # sizes are for a 16-bit model, the usual serving dtype


def measure(model: str, eval_text: str | None, eval_chunks: int, settings: calibration.Settings,
            device: str | None = None, maps: list[str] = (), formats: list[str] | None = None,
            every_candidate: bool = True, uniform_search: bool = True) -> dict:
    """Our layouts and vLLM's formats on one loaded model; a JSON-ready dict.

    ``formats``: the vLLM formats to measure (None: all). ``every_candidate=False`` measures our uniform
    candidates only up to the best uniform policy (cheapest first), as ``auto`` does;
    ``uniform_search=False`` none of them: only ``maps`` (policies or per-layer maps) of ours.
    """
    unknown = sorted(set(formats or ()) - set(FORMATS))
    if unknown:
        raise SystemExit(f"unknown vLLM formats {unknown}; choose from {sorted(FORMATS)}")
    import transformers

    prompts = calibration.load_prompts(settings)
    head_dim = session.head_dim_of(transformers.AutoConfig.from_pretrained(model))
    token_ids = session.prompt_token_ids(model, prompts, settings.max_tokens, long_tokens=settings.long_tokens)
    chunks = session.text_chunks(model, eval_text, eval_chunks) if eval_text else []
    start = time.perf_counter()
    rows = []
    with session.Session.load(model, token_ids, device=device) as loaded:
        result, measured = None, []
        if uniform_search:
            uniform_only = replace(settings, per_layer=False)
            result = calibration.calibrate(loaded, head_dim, uniform_only, elem_bytes=BF16_BYTES,
                                           measure_all=every_candidate)
            measured = [m for m in result.measurements if m.bytes_per_token is not None]  # (k6v4: the ratio's)
        base = loaded.perplexity(chunks, None) if chunks else None
        layers = loaded.attention_layers
        for name in maps:
            policy_map = parse_policy_map(name)
            measured.append(loaded.measure(policy_map.name, session.spec_of_map(policy_map),
                                           policy_map.mean_slot_bytes(layers, head_dim, BF16_BYTES)))
        for m in measured:
            spec = session.spec_of_map(parse_policy_map(m.name))
            rows.append({"cache": m.name, "by": "vllm-int4kv", "bytes_per_token": m.bytes_per_token,
                         "kl": m.kl, "top1": m.top1, "auto": result is not None and m.name == result.uniform.name,
                         "ppl": (base if m.exact else loaded.perplexity(chunks, spec)) if chunks else None})
        for fmt in FORMATS.values():
            if formats is not None and fmt.name not in formats:
                continue
            m = loaded.measure(fmt.name, fmt.fake_quantize_kv, fmt.bytes_per_token(head_dim))
            rows.append({"cache": fmt.name, "by": "vLLM 0.32", "bytes_per_token": m.bytes_per_token,
                         "kl": m.kl, "top1": m.top1, "auto": False,
                         "ppl": loaded.perplexity(chunks, fmt.fake_quantize_kv) if chunks else None})
        dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
        dev = str(loaded.device)
    for row in rows:
        row["within_budget"] = row["kl"] <= settings.target  # as auto decides: the budget times the margin
        row["ppl_delta"] = row["ppl"] / base - 1 if base else None
    rows.sort(key=lambda r: (r["bytes_per_token"], r["by"] != "vLLM 0.32"))
    return {"model": model, "head_dim": head_dim, "budget": settings.budget, "margin": settings.margin,
            "target": settings.target,
            "decision": result.uniform.name if result else None, "ratio": result.ratio if result else None,
            "rows": rows, "full_precision_ppl": base,
            "calibration": {"prompts": len(token_ids), "tokens": sum(len(ids) for _, ids in token_ids)},
            "eval": {"text": eval_text, "chunks": len(chunks), "tokens_per_chunk": 512},
            "seconds": round(time.perf_counter() - start, 1),
            "machine": {"device": dev, "dtype": dtype, "cpu": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__}}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# KV-cache quality: vLLM's formats beside vllm-int4kv, {Path(report['model']).name}", "",
             f"`{report.get('command', '')}`", "",
             f"{report['calibration']['prompts']} calibration prompts ({report['calibration']['tokens']} "
             f"tokens) for KL and top-1; held-out perplexity on {report['eval']['chunks']} x 512 tokens of "
             f"`{report['eval']['text']}`. {m['device']} {m['dtype']}, {m['cpu']}; Python {m['python']}, "
             f"torch {m['torch']}, transformers {m['transformers']}; {report['seconds']} s. Bytes per token "
             f"per KV head for a 16-bit model (head_dim {report['head_dim']}). Target: mean KL ≤ "
             f"{report.get('target', report['budget']):g} nats on the calibration prompts (budget "
             f"{report['budget']:g} x margin {report.get('margin', 1.0):g}).", "",
             "| cache | by | B/token/KV head | mean KL (nats) | top-1 | within target | held-out ppl "
             "| ppl Δ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        name = f"**{r['cache']} ← best uniform**" if r["auto"] else r["cache"]
        ppl = "—" if r["ppl"] is None else f"{r['ppl']:.3f}"
        delta = "—" if r["ppl_delta"] is None else f"{r['ppl_delta']:+.2%}"
        lines.append(f"| {name} | {r['by']} | {r['bytes_per_token']:.4g} | {r['kl']:.5f} | {r['top1']:.1%} | "
                     f"{'yes' if r['within_budget'] else 'no'} | {ppl} | {delta} |")
    if report["full_precision_ppl"]:
        lines += ["", f"Full precision: perplexity {report['full_precision_ppl']:.3f}."]
    if report["decision"]:
        lines += ["", f"auto's best uniform policy: {report['decision']} (INT6/INT8 ratio {report['ratio']:.2f})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF model folder")
    ap.add_argument("--eval-text", default=None, help="held-out text for perplexity")
    ap.add_argument("--eval-chunks", type=int, default=6, help="512-token chunks of --eval-text")
    ap.add_argument("--prompts", type=int, default=calibration.DEFAULT_PROMPTS)
    ap.add_argument("--max-tokens", type=int, default=calibration.DEFAULT_MAX_TOKENS)
    ap.add_argument("--long-tokens", type=int, default=calibration.DEFAULT_LONG_TOKENS)
    ap.add_argument("--maps", default="", help="per-layer maps measured beside the uniform candidates")
    ap.add_argument("--vllm-formats", default="", help="comma-separated vLLM formats to measure (default: all)")
    ap.add_argument("--until-best-uniform", action="store_true",
                    help="measure our uniform candidates only up to the best one within budget (cheapest first)")
    ap.add_argument("--no-uniform-search", action="store_true",
                    help="measure none of our uniform candidates, only --maps (policies or per-layer maps)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "quality")
    args = ap.parse_args(argv)
    settings = replace(auto.settings_from_env(), n_prompts=args.prompts, max_tokens=args.max_tokens,
                       long_tokens=args.long_tokens)
    from vllm_int4kv.policy.layer_map import split_policy_list

    formats = [f.strip() for f in args.vllm_formats.split(",") if f.strip()] or None
    report = measure(args.model, args.eval_text, args.eval_chunks, settings, args.device,
                     split_policy_list(args.maps), formats, every_candidate=not args.until_best_uniform,
                     uniform_search=not args.no_uniform_search)
    argv = sys.argv[1:] if argv is None else argv
    report["command"] = "python benchmarks/vllm_quality.py " + " ".join(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm-formats.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "vllm-formats.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
