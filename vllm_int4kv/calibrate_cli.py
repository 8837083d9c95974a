"""Calibrate the auto K/V precision policy for a model and print the evidence.

    vllm-int4kv calibrate MODEL [--budget NATS] [--prompts N] [--device cpu|cuda|auto] [--all]
                                [--eval-text FILE --eval-chunks N]

Prints one row per measured candidate (bytes per token per KV head, mean next-token KL against full
precision, top-1 agreement, the perplexity increase the KL implies, the NLL change on the calibration
text) and the INT6/INT8 ratio evidence, then stores the decision where engine start-up will find it
(same settings only: the key covers them). ``--eval-text`` adds measured perplexity on held-out
512-token chunks for every candidate.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from . import auto, calibration, calibration_device, decision_cache, envs
from .cli_args import above, at_least, output_file
from .policy import parse_policy


def add_session_arguments(parser) -> None:
    """The model, budget and calibration-prompt options of `calibrate` and `layers`."""
    parser.add_argument("model", help="HF model folder or hub id")
    parser.add_argument("--budget", type=above(0), default=None,
                        help="mean KL budget in nats (default: VLLM_INT4KV_KL_BUDGET or "
                             f"{calibration.DEFAULT_KL_BUDGET})")
    parser.add_argument("--prompts", type=at_least(1), default=calibration.DEFAULT_PROMPTS,
                        help="number of calibration prompts")
    parser.add_argument("--max-tokens", type=at_least(2), default=calibration.DEFAULT_MAX_TOKENS,
                        help="tokens kept per prompt")
    parser.add_argument("--device", type=device_name, default=None,
                        help="cuda, cpu, or auto: spread over every GPU, then CPU memory, for models one GPU "
                             "cannot hold (needs accelerate). Default: cuda when available")
    parser.add_argument("--dtype", default="auto", choices=calibration_device.DTYPE_CHOICES,
                        help="the dtype you serve with (vllm serve --dtype): sizes of 16-bit planes, and what "
                             "GPU runs compute in. Default: what vLLM picks for the checkpoint")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")


def settings_from_args(args) -> calibration.Settings:
    settings = replace(auto.settings_from_env(), n_prompts=args.prompts, max_tokens=args.max_tokens)
    return settings if args.budget is None else replace(settings, budget=args.budget)


def device_name(text: str) -> str:
    name = text.strip().lower()
    if name in ("cpu", calibration_device.SPREAD):
        return name
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible here; use --device cpu")
    return name


def prepare(args, command: str, check_head_dim=None):
    """Everything checked before the model loads, each problem ending the command with its reason:
    (settings, prompts, head_dim, bytes of an unquantized element, serving dtype, prompt token ids).
    ``check_head_dim(head_dim, elem_bytes)`` may refuse more, before the tokenizer loads."""
    def stop(problem) -> SystemExit:
        return SystemExit(f"vllm-int4kv {command}: {problem}")

    try:
        settings = settings_from_args(args)
        prompts = calibration.load_prompts(settings.n_prompts)
    except ValueError as exc:
        raise stop(exc) from None
    try:
        head_dim, elem_bytes, dtype = auto._model_facts(args.model, args.revision, args.dtype,
                                                        args.trust_remote_code)
        calibration.candidate_policies(head_dim, elem_bytes)  # a head size the cache cannot hold
        if check_head_dim is not None:
            check_head_dim(head_dim, elem_bytes)
        token_ids = calibration.prompt_token_ids(args.model, prompts, settings.max_tokens,
                                                 revision=args.revision, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise stop(model_problem(args.model, exc)) from None
    return settings, prompts, head_dim, elem_bytes, dtype, token_ids


def model_problem(model: str, exc: Exception) -> str:
    text = str(exc).strip()
    folder = Path(model).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        return f"{model} holds no config.json: pass the folder of a Hugging Face model"
    if "trust_remote_code" in text:
        return f"{model!r} runs code of its own: pass --trust-remote-code if you trust it"
    if isinstance(exc, OSError):
        first_line = (text.splitlines() or [type(exc).__name__])[0]
        return (f"cannot read the config and tokenizer of {model!r} ({first_line}). Pass a local model "
                "folder holding config.json and the tokenizer, or a hub id while the hub is reachable")
    return text  # e.g. an unsupported head size, or a model type this transformers does not know


def check_cache_dir(command: str) -> None:
    """The decision is stored after the whole calibration: find out now whether it can be."""
    directory = envs.cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        writable = os.access(directory, os.W_OK | os.X_OK)
    except OSError as exc:
        writable, directory = False, f"{directory} ({exc.strerror or exc})"
    if not writable:
        raise SystemExit(f"vllm-int4kv {command}: cannot store decisions in {directory}; set "
                         "VLLM_INT4KV_CACHE_DIR to a writable folder, or pass --no-cache")


def load_session(args, token_ids, dtype) -> calibration.Session:
    return calibration.Session.load(args.model, token_ids, revision=args.revision, dtype=dtype,
                                    trust_remote_code=args.trust_remote_code, device=args.device)


@contextlib.contextmanager
def exit_with_reason(command: str):
    """A model the calibration cannot see into, or that does not fit, ends the command with the reason
    and what to do, no traceback."""
    try:
        yield
    except (NotImplementedError, calibration_device.PlacementError) as exc:
        raise SystemExit(f"vllm-int4kv {command}: {exc}") from exc


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
    head = (f"{'candidate':<14}{'B/tok/head':>11}{'mean KL':>11}{'top-1':>8}{'est. ppl Δ':>12}"
            f"{'ΔNLL calib':>12}")
    if base:
        head += f"{'eval ppl':>12}{'ppl Δ':>9}"
    rows = [head, "-" * len(head)]
    for m in result.measurements:
        size = "-" if m.bytes_per_token is None else str(m.bytes_per_token)
        row = (f"{m.name:<14}{size:>11}{m.kl:>11.5f}{m.top1:>8.1%}{m.ppl_delta:>+12.2%}"
               f"{m.dnll:>+12.5f}")
        if base and m.name in ppl:
            row += f"{ppl[m.name]:>12.5g}{ppl[m.name] / base - 1:>+9.2%}"
        mark = "  <- decision" if m.name == result.policy.name else ""
        mark += "  (measurement only)" if m.bytes_per_token is None else ""
        rows.append(row + mark)
    if base:
        rows.append(f"{'full precision':<14}{'':>11}{'':>11}{'':>8}{'':>12}{'':>12}{base:>12.5g}")
    return "\n".join(rows)


def serving_hint(args, settings: calibration.Settings, dtype, policy: str) -> str:
    """How `vllm serve` gets this decision: found under auto only when the engine computes the same key,
    i.e. the same device type and dtype, and the settings the engine itself uses."""
    fixed = f"set VLLM_INT4KV_POLICY={policy}"
    if settings != auto.settings_from_env():
        return (f"`vllm serve` calibrates with the default prompts and VLLM_INT4KV_KL_BUDGET, not with this "
                f"run's --prompts/--max-tokens/--budget, so it will not find this decision: {fixed}")
    device = calibration_device.device_type(calibration_device.pick_device(args.device))
    return (f"`vllm serve` with VLLM_INT4KV_POLICY=auto finds it on {device} with --dtype "
            f"{str(dtype).removeprefix('torch.')}; anywhere else, {fixed}")


def run(args) -> int:
    settings, prompts, head_dim, elem_bytes, dtype, token_ids = prepare(args, "calibrate")
    if not args.no_cache:
        check_cache_dir("calibrate")
    chunks = []
    if args.eval_text:  # before the model loads: a bad file fails at once
        try:
            chunks = calibration.text_chunks(args.model, args.eval_text, args.eval_chunks,
                                             revision=args.revision, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--eval-text: {exc}") from exc
    ppl = {}
    with exit_with_reason("calibrate"), load_session(args, token_ids, dtype) as session:
        result = calibration.calibrate(session, head_dim, settings, elem_bytes=elem_bytes,
                                       measure_all=args.all or bool(args.eval_text))
        if chunks:
            ppl["fp"] = session.perplexity(chunks, None)
            for m in result.measurements:
                spec = ((6, 4, None, False) if m.name == "k6v4"
                        else calibration.spec_of(parse_policy(m.name)))
                ppl[m.name] = ppl["fp"] if m.exact else session.perplexity(chunks, spec)
    ev = result.evidence()
    print(f"model {args.model}: head_dim {head_dim}, {ev['n_prompts']} prompts / {ev['n_tokens']} tokens, "
          f"{ev['device']} {ev['dtype']}, budget {settings.budget:g} nats "
          f"(≈ {math.expm1(settings.budget):+.2%} ppl)")
    print(_table(result, ppl))
    print(f"ratio classifier: err(K INT8, V INT4) = {ev['err_int8']:.5f}, err(K INT6, V INT4) = "
          f"{ev['err_int6']:.5f}, ratio = {ev['ratio']:.2f} (tau {settings.tau:g}) -> keys {ev['keys']}; "
          f"err(K4V4) = {ev['err_k4v4']:.5f}")
    print(f"decision: {result.policy.name}, {ev['bytes_per_token_per_head']} B/token/KV head; "
          f"calibration {result.seconds:.1f} s")
    if args.eval_text:
        ev["eval"] = {"text": args.eval_text, "chunks": len(chunks), "tokens_per_chunk": 512,
                      "perplexity": ppl}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(ev, f, indent=1)
    if not args.no_cache:
        key = auto.calibration_key(args.model, settings, prompts, head_dim, elem_bytes, args.revision,
                                   dtype, args.device)
        print(f"stored: {decision_cache.store(key, auto.record_of(args.model, result))}")
        print(serving_hint(args, settings, dtype, result.policy.name))
    return 0
