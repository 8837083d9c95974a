"""The model, budget and calibration-prompt options that ``calibrate`` and ``layers`` share, and the checks
that run before a model loads."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from .. import envs
from ..policy import calibration, decide, placement, session
from .args import above, at_least


def add_session_arguments(parser) -> None:
    """The model, budget and calibration-prompt options of `calibrate` and `layers`."""
    parser.add_argument("model", help="HF model folder or hub id")
    parser.add_argument("--budget", type=above(0), default=None,
                        help="mean KL budget in nats (default: VLLM_INT4KV_KL_BUDGET or "
                             f"{calibration.DEFAULT_KL_BUDGET})")
    parser.add_argument("--margin", type=above(0), default=None,
                        help="fraction of the budget a layout may cost on the calibration prompts, so that "
                             "text unlike them stays within the budget (default: VLLM_INT4KV_KL_MARGIN or "
                             f"{calibration.DEFAULT_MARGIN})")
    parser.add_argument("--prompts", type=at_least(1), default=calibration.DEFAULT_PROMPTS,
                        help="calibration prompts per genre (speeches, fiction, encyclopedic, technical, code, "
                             "dialogue; at most 2)")
    parser.add_argument("--max-tokens", type=at_least(2), default=calibration.DEFAULT_MAX_TOKENS,
                        help="tokens kept per prompt")
    parser.add_argument("--long-tokens", type=at_least(0), default=calibration.DEFAULT_LONG_TOKENS,
                        help="tokens of the long calibration document (0: leave it out)")
    parser.add_argument("--uniform", action="store_true",
                        help="one policy for every layer: skip the per-layer search")
    parser.add_argument("--device", type=device_name, default=None,
                        help="cuda, cpu, or auto: spread over every GPU, then CPU memory, for models one GPU "
                             "cannot hold (needs accelerate). Default: cuda when available")
    parser.add_argument("--dtype", default="auto", choices=placement.DTYPE_CHOICES,
                        help="the dtype you serve with (vllm serve --dtype): sizes of 16-bit planes, and what "
                             "GPU runs compute in. Default: what vLLM picks for the checkpoint")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")


def settings_from_args(args) -> calibration.Settings:
    settings = replace(decide.settings_from_env(), n_prompts=args.prompts, max_tokens=args.max_tokens,
                       long_tokens=args.long_tokens, per_layer=not args.uniform)
    if args.budget is not None:
        settings = replace(settings, budget=args.budget)
    if args.margin is not None:
        settings = replace(settings, margin=args.margin)  # > 1 is refused by Settings, with the reason
    return settings


def device_name(text: str) -> str:
    name = text.strip().lower()
    if name in ("cpu", placement.SPREAD):
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
        prompts = calibration.load_prompts(settings)
    except ValueError as exc:
        raise stop(exc) from None
    try:
        head_dim, elem_bytes, dtype = decide.model_facts(args.model, args.revision, args.dtype,
                                                        args.trust_remote_code)
        calibration.candidate_policies(head_dim, elem_bytes)  # a head size the cache cannot hold
        if check_head_dim is not None:
            check_head_dim(head_dim, elem_bytes)
        token_ids = session.prompt_token_ids(args.model, prompts, settings.max_tokens, revision=args.revision,
                                             trust_remote_code=args.trust_remote_code,
                                             long_tokens=settings.long_tokens)
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


def load_session(args, token_ids, dtype) -> session.Session:
    return session.Session.load(args.model, token_ids, revision=args.revision, dtype=dtype,
                                    trust_remote_code=args.trust_remote_code, device=args.device)


@contextlib.contextmanager
def exit_with_reason(command: str):
    """A model the calibration cannot see into, or that does not fit, ends the command with the reason
    and what to do, no traceback."""
    try:
        yield
    except (NotImplementedError, placement.PlacementError) as exc:
        raise SystemExit(f"vllm-int4kv {command}: {exc}") from exc
