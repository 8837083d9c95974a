"""Which K/V precision policy a model gets: the one decision function, used by engine start-up and by
``vllm-int4kv calibrate``.

Order (``decide``): an explicit request (anything but ``auto``) → the cached decision for this exact
model and these calibration settings → a fresh calibration (then cached). There is no silent default:
if calibration cannot run, the caller gets the reason.

Calibration picks the cheapest layout, in bytes per token for the model's head dim, whose mean
next-token KL against full precision stays within the budget (``VLLM_INT4KV_KL_BUDGET``, default
0.01 nats ≈ 1 % perplexity). K16V16 has KL 0, so there is always an answer. The INT6/INT8 ratio
classifier is measured and reported alongside (see ``calibration``).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import envs
from . import calibration, decision_cache, placement, session
from .layer_map import PolicyMap, parse_policy_map
from .progress import SILENT, Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelTarget:
    """The model a decision is for, as the engine serves it (``dtype`` None or ``auto``: as vLLM resolves
    it) and where a calibration would run (``device`` None: cuda when available)."""

    model: str
    revision: str | None = None
    dtype: object = None
    trust_remote_code: bool = False
    device: str | None = None


@dataclass(frozen=True)
class Decision:
    policy: PolicyMap
    summary: str  # one log line: the decision and why
    evidence: dict  # JSON-serialisable measurements behind it
    source: str  # "explicit" | "cache" | "calibration"
    stored: Path | None = None  # where a fresh calibration was cached


def settings_from_env() -> calibration.Settings:
    return calibration.Settings(budget=envs.kl_budget(calibration.DEFAULT_KL_BUDGET),
                                margin=envs.kl_margin(calibration.DEFAULT_MARGIN))


def summarize(model: str, evidence: dict, source: str) -> str:
    """One line: what was chosen, what it costs, why, and where the decision came from."""
    head_dim, elem, budget = evidence["head_dim"], evidence["elem_bytes"], evidence["budget"]
    target = evidence.get("target", budget)
    size, kl = evidence["bytes_per_token"], evidence["kl"]
    uniform = next(c for c in evidence["candidates"] if c["name"] == evidence["uniform"])
    rejected = [c for c in evidence["candidates"] if c["kl"] > target and c["bytes_per_token"]
                and c["bytes_per_token"] < uniform["bytes_per_token"]]
    over = ", ".join("{} {:.3g}".format(c["name"], c["kl"]) for c in rejected)
    why = f"cheaper uniform layouts over the target: {over}" if rejected else "the cheapest layout"
    if evidence["decision"] != evidence["uniform"]:
        why = (f"a layout per layer, verified; the best uniform policy, {uniform['name']}, costs "
               f"{uniform['bytes_per_token']} B (KL {uniform['kl']:.3g}); {why}")
    elif evidence.get("per_layer"):
        why += f"; per layer: {evidence['per_layer']['note']}"
    origin = "cached decision" if source == "cache" else f"calibrated in {evidence['seconds']:.1f} s"
    return (f"int4kv auto policy for {model}: {evidence['decision']} ({size:g} B/token/KV head, "
            f"{2 * head_dim * elem / size:.2f}x smaller than {8 * elem}-bit K/V); "
            f"mean KL {kl:.3g} nats <= target {target:g} (budget {budget:g} x margin "
            f"{evidence.get('margin', 1.0):g}); {why}; keys {evidence['keys']} (INT6/INT8 error "
            f"ratio {evidence['ratio']:.2f}, tau {evidence['tau']:g}; K4V4 KL {evidence['err_k4v4']:.3g}); "
            f"{evidence['n_prompts']} prompts / {evidence['n_tokens']} tokens on {evidence['device']}; "
            f"{origin}")


def model_facts(model, revision, dtype, trust_remote_code):
    """(head_dim, bytes of an unquantized K/V element, serving dtype): ``dtype`` ``auto`` or None is
    resolved as vLLM resolves it, so the engine and ``vllm-int4kv calibrate`` compute the same key."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    serving = placement.serving_dtype(dtype, config, model=model, revision=revision)
    return session.head_dim_of(config), serving.itemsize, serving


def mixes_layer_types(model, revision=None, trust_remote_code=False) -> bool:
    """Whether the model's layers are of more than one type (sliding-window, state or linear-attention
    layers beside full attention), as the config's ``layer_types`` lists them: vLLM then pads pages."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    text = getattr(config, "get_text_config", lambda: config)()
    return len(set(getattr(text, "layer_types", None) or ())) > 1


def _quantizer_digest() -> str:
    """Hash of the code that defines what the cache stores and how a layout is measured: a changed
    quantizer or measurement recalibrates."""
    from ..kernels import page_format, reference
    from . import search

    digest = hashlib.sha256()
    for module in (page_format, reference, calibration, session, search):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def calibration_key(model: str, settings: calibration.Settings, prompts: list[str], head_dim: int,
                    elem_bytes: int, revision: str | None = None, dtype=None, device: str | None = None) -> str:
    candidates = [[p.name, p.slot_bytes(head_dim, elem_bytes)]
                  for p in calibration.candidate_policies(head_dim, elem_bytes)]
    # Where and in which dtype the measurement runs changes its numbers (CPU always runs fp32).
    run_on = placement.pick_device(device)
    compute = f"{placement.device_type(run_on)}/{placement.compute_dtype(dtype, run_on)}"
    return decision_cache.make_key(
        decision_cache.model_identity(model, revision),
        {**asdict(settings), "prompts_sha256": calibration.prompts_digest(prompts), "candidates": candidates,
         "compute": compute, "quantizer": _quantizer_digest()})


def record_of(model: str, result: calibration.Calibration) -> dict:
    return {"model": model, "created": time.time(),
            "decision": {"policy": result.policy.name, "evidence": result.evidence()}}


def decision_from_record(model: str, record: dict, source: str, stored: Path | None = None) -> Decision:
    evidence = record["decision"]["evidence"]
    return Decision(parse_policy_map(record["decision"]["policy"]), summarize(model, evidence, source),
                    evidence, source, stored)


def run_calibration(model: str, settings: calibration.Settings, prompts: list, *, head_dim: int,
                    elem_bytes: int, revision=None, dtype=None, trust_remote_code=False, device=None,
                    measure_all: bool = False, with_session=None,
                    progress: Progress = SILENT) -> calibration.Calibration:
    """Load the model, measure the candidates; ``with_session(loaded, result)`` runs before the model
    is freed (``vllm-int4kv calibrate`` measures held-out perplexity there)."""
    token_ids = session.prompt_token_ids(model, prompts, settings.max_tokens, revision=revision,
                                         trust_remote_code=trust_remote_code, long_tokens=settings.long_tokens)
    progress.stage(f"loading {model} and its full-precision reference ({sum(len(t) for _, t in token_ids)} "
                   f"tokens of {len(token_ids)} prompts)")
    mixed = mixes_layer_types(model, revision, trust_remote_code)
    with session.Session.load(model, token_ids, revision=revision, dtype=dtype,
                              trust_remote_code=trust_remote_code, device=device) as loaded:
        result = calibration.calibrate(loaded, head_dim, settings, elem_bytes=elem_bytes,
                                       measure_all=measure_all, mixed_types=mixed, progress=progress)
        if with_session is not None:
            with_session(loaded, result)
        return result


def explicit(request: str) -> Decision:
    """A policy or map named outright: no model needed, nothing measured."""
    policy = parse_policy_map(request)
    return Decision(policy, f"int4kv policy {policy.name}: chosen explicitly (VLLM_INT4KV_POLICY={request})",
                    {"requested": request}, "explicit")


def decide(request: str, target: ModelTarget | None = None, *, settings: calibration.Settings | None = None,
           fresh: bool = False, store: bool = True, measure_all: bool = False, with_session=None,
           progress: Progress = SILENT) -> Decision:
    """The policy for ``target``: ``request`` itself unless it is ``auto`` (or empty); else the cached
    decision; else a fresh calibration, stored for next time (``store``).

    ``settings`` default to the environment's (what engine start-up uses); ``fresh`` measures even when
    a decision is cached, and ``measure_all`` every candidate (reports); ``with_session`` see
    ``run_calibration``; ``progress`` hears of every measurement.
    """
    request = (request or "auto").strip()
    if request.lower() != "auto":
        return explicit(request)
    if target is None:
        raise RuntimeError("VLLM_INT4KV_POLICY=auto needs the model's config, which is not available here; "
                           "set VLLM_INT4KV_POLICY to a fixed policy such as k4v4")
    settings = settings or settings_from_env()
    prompts = calibration.load_prompts(settings)
    head_dim, elem_bytes, dtype = model_facts(target.model, target.revision, target.dtype,
                                              target.trust_remote_code)
    key = calibration_key(target.model, settings, prompts, head_dim, elem_bytes, target.revision, dtype,
                          target.device)
    record = None if fresh else decision_cache.load(key)
    if record is not None:
        return decision_from_record(target.model, record, "cache")
    with decision_cache.locked(key):
        record = None if fresh else decision_cache.load(key)  # another process may have finished meanwhile
        if record is not None:
            return decision_from_record(target.model, record, "cache")
        result = run_calibration(target.model, settings, prompts, head_dim=head_dim, elem_bytes=elem_bytes,
                                 revision=target.revision, dtype=dtype,
                                 trust_remote_code=target.trust_remote_code, device=target.device,
                                 measure_all=measure_all, with_session=with_session, progress=progress)
        record, stored = record_of(target.model, result), None
        if store:
            try:
                stored = decision_cache.store(key, record)
            except OSError as err:
                logger.warning("could not cache the auto-policy decision (%s)", err)
    return decision_from_record(target.model, record, "calibration", stored)
