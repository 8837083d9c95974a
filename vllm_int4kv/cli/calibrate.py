"""Calibrate the auto K/V precision policy for a model and print the evidence.

    vllm-int4kv calibrate MODEL [--budget NATS] [--prompts N] [--device cpu|cuda|auto] [--all] [--uniform]
                                [--eval-text FILE --eval-chunks N]

Prints one row per measured uniform candidate (bytes per token per KV head, mean next-token KL against
full precision, top-1 agreement, the perplexity increase the KL implies, the NLL change on the calibration
text, the KL per genre), the INT6/INT8 ratio evidence and the per-layer search (each check of a map), then
stores the decision where engine start-up will find it (same settings only: the key covers them).
Progress goes to stderr while it runs. ``--eval-text`` adds measured perplexity on held-out 512-token
chunks for every candidate and for the decision.
"""
from __future__ import annotations

import json
import math

from ..policy import calibration, decide, placement, session
from ..policy.layer_map import parse_policy_map
from ..policy.progress import Progress, to_stderr
from .args import at_least, output_file
from .model_args import add_session_arguments, check_cache_dir, exit_with_reason, prepare


def add_parser(parser) -> None:
    add_session_arguments(parser)
    parser.add_argument("--all", action="store_true", help="measure every candidate, not only up to the "
                        "decision (the decision is the same)")
    parser.add_argument("--eval-text", default=None, help="held-out text: perplexity of every candidate")
    parser.add_argument("--eval-chunks", type=at_least(1), default=4, help="512-token chunks of --eval-text")
    parser.add_argument("--json", type=output_file, default=None,
                        help="also write the evidence (and perplexities) here")
    parser.add_argument("--no-cache", action="store_true", help="do not store the decision")
    parser.set_defaults(run=run)


def _table(result: calibration.Calibration, ppl: dict) -> str:
    base = ppl.get("fp")
    genres = list(dict.fromkeys(g for m in result.measurements for g in m.by_genre))
    head = (f"{'candidate':<14}{'B/tok/head':>11}{'mean KL':>11}{'top-1':>8}{'est. ppl Δ':>12}"
            f"{'ΔNLL calib':>12}" + "".join(f"{g[:11]:>12}" for g in genres))
    if base:
        head += f"{'eval ppl':>12}{'ppl Δ':>9}"
    rows = [head, "-" * len(head)]
    for m in result.measurements:
        size = "-" if m.bytes_per_token is None else f"{m.bytes_per_token:g}"
        row = (f"{m.name:<14}{size:>11}{m.kl:>11.5f}{m.top1:>8.1%}{m.ppl_delta:>+12.2%}"
               f"{m.dnll:>+12.5f}" + "".join(f"{m.by_genre.get(g, 0.0):>12.5f}" for g in genres))
        if base and m.name in ppl:
            row += f"{ppl[m.name]:>12.5g}{ppl[m.name] / base - 1:>+9.2%}"
        mark = "  <- best uniform" if m.name == result.uniform.name else ""
        mark += "  (measurement only)" if m.bytes_per_token is None else ""
        rows.append(row + mark)
    if base:
        rows.append(f"{'full precision':<14}{'':>11}{'':>11}{'':>8}{'':>12}{'':>12}{base:>12.5g}")
    return "\n".join(rows)


def _search_report(result: calibration.Calibration, ppl: dict) -> str:
    found = result.search
    if found is None:
        return "per layer: not searched (the best uniform policy is the cheapest layout, or --uniform)"
    lines = [f"per layer: {len(found.single)} layers scanned at {', '.join(found.rungs)}"]
    for check in found.checks:
        held_out = f", eval ppl Δ {ppl[check.map] / ppl['fp'] - 1:+.2%}" if check.map in ppl else ""
        lines.append(f"  check {check.map}: {check.bytes_per_token:.1f} B/tok/head, KL {check.kl:.5f} "
                     f"(predicted {check.predicted_kl:.5f}), top-1 {check.top1:.1%}{held_out}"
                     + ("  <- decision" if found.chosen is not None and check.map == found.chosen.name else ""))
    if found.note:
        lines.append(f"  {found.note}")
    return "\n".join(lines)


def serving_hint(args, settings: calibration.Settings, dtype, policy: str) -> str:
    """How `vllm serve` gets this decision: found under auto only when the engine computes the same key,
    i.e. the same device type and dtype, and the settings the engine itself uses."""
    fixed = f"set VLLM_INT4KV_POLICY='{policy}'"
    if settings != decide.settings_from_env():
        return (f"`vllm serve` calibrates with the default prompts, VLLM_INT4KV_KL_BUDGET and _MARGIN, not with "
                f"this run's --prompts/--max-tokens/--long-tokens/--uniform/--budget/--margin, so it will not find this decision: "
                f"{fixed}")
    device = placement.device_type(placement.pick_device(args.device))
    return (f"`vllm serve` with VLLM_INT4KV_POLICY=auto finds it on {device} with --dtype "
            f"{str(dtype).removeprefix('torch.')}; anywhere else, {fixed}")


def run(args) -> int:
    settings, _, head_dim, elem_bytes, dtype, _ = prepare(args, "calibrate")
    if not args.no_cache:
        check_cache_dir("calibrate")
    chunks = []
    if args.eval_text:  # before the model loads: a bad file fails at once
        try:
            chunks = session.text_chunks(args.model, args.eval_text, args.eval_chunks,
                                         revision=args.revision, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--eval-text: {exc}") from exc
    ppl, measured = {}, []

    def held_out_perplexity(loaded, result) -> None:
        measured.append(result)
        if chunks:
            ppl["fp"] = loaded.perplexity(chunks, None)
            for m in result.measurements:
                spec = (6, 4, None, False) if m.name == "k6v4" else session.spec_of_map(parse_policy_map(m.name))
                ppl[m.name] = ppl["fp"] if m.exact else loaded.perplexity(chunks, spec)
            for check in result.search.checks if result.search else []:
                ppl[check.map] = loaded.perplexity(chunks, session.spec_of_map(parse_policy_map(check.map)))

    target = decide.ModelTarget(args.model, args.revision, dtype, args.trust_remote_code, args.device)
    with exit_with_reason("calibrate"):
        decision = decide.decide("auto", target, settings=settings, fresh=True, store=not args.no_cache,
                                 measure_all=args.all or bool(args.eval_text), with_session=held_out_perplexity,
                                 progress=Progress(to_stderr, "calibrate"))
    [result] = measured
    ev = decision.evidence
    print(f"model {args.model}: head_dim {head_dim}, {ev['attention_layers']} attention layers, "
          f"{ev['n_prompts']} prompts ({', '.join(ev['genres'])}) / {ev['n_tokens']} tokens, {ev['device']} "
          f"{ev['dtype']}, budget {settings.budget:g} nats (≈ {math.expm1(settings.budget):+.2%} ppl), "
          f"target on these prompts {settings.target:g} (margin {settings.margin:g})")
    print(_table(result, ppl))
    print(f"ratio classifier: err(K INT8, V INT4) = {ev['err_int8']:.5f}, err(K INT6, V INT4) = "
          f"{ev['err_int6']:.5f}, ratio = {ev['ratio']:.2f} (tau {settings.tau:g}) -> keys {ev['keys']}; "
          f"err(K4V4) = {ev['err_k4v4']:.5f}")
    print(_search_report(result, ppl))
    print(f"decision: {decision.policy.name}, {ev['bytes_per_token']:g} B/token/KV head, KL {ev['kl']:.5f}; "
          f"best uniform {ev['uniform']}; calibration {result.seconds:.1f} s")
    if args.eval_text:
        ev = {**ev, "eval": {"text": args.eval_text, "chunks": len(chunks), "tokens_per_chunk": 512,
                             "perplexity": ppl}}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(ev, f, indent=1)
    if decision.stored:
        print(f"stored: {decision.stored}")
        print(serving_hint(args, settings, dtype, decision.policy.name))
    return 0
