"""``auto``: the cheapest K/V layout whose measured KL stays within the quality budget.

Two stages over one loaded model (``session``: how a layout is measured):

1. **Uniform.** Candidate policies, cheapest first in bytes per token, each measured with every layer at
   that policy; the first within the budget is the best uniform policy (K16V16 stores K/V unchanged, so
   there is always one). The INT6/INT8 ratio classifier is measured on the way and reported:
   ``err(K6V4) / err(K8V4)`` runs from ~1 (value noise dominates: keys tolerant) to ~16 (key noise
   dominates: the INT6 step is 4x the INT8 step); KL is quadratic in a small logit error.
2. **Per layer** (``search``), when something cheaper than the best uniform policy failed: a layout per
   layer, verified end to end; chosen only if it costs fewer bytes than the uniform policy.

The calibration prompts cover several genres (``corpus``): speeches, fiction, encyclopedic and technical
prose, source code, chat dialogue, and one long document, so the budget is kept on more than one kind of
text and at more than 512 tokens of context.

The budget is what text unlike the prompts may pay, so a layout passes only when its KL on the prompts
stays within ``budget x margin`` (the *target*). Why a margin: measured through vLLM's engine on held-out
text of eight genres, the worst genre's perplexity rose up to ~1.8x what the calibration KL predicts
(``exp(KL) - 1``), on both real models (docs/policy.md); half the budget keeps that under the budget.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

from .corpus import calibration_set
from .layer_map import PolicyMap
from .layout import KVPolicy
from .progress import SILENT, Progress
from .search import Search, search
from .session import Measurement, Session, spec_of

DEFAULT_KL_BUDGET = 0.01  # nats; exp(0.01) - 1 = 1.0 % perplexity if the text follows the model
DEFAULT_MARGIN = 0.5  # the calibration prompts are held to this fraction of the budget (see above)
DEFAULT_TAU = 3.0  # published threshold of the INT6/INT8 ratio classifier
DEFAULT_PROMPTS = 1  # per genre
DEFAULT_MAX_TOKENS = 512
DEFAULT_LONG_TOKENS = 2048
DEFAULT_SCAN_TOKENS = 128
K4_GROUPS = (32, 16)  # key channel groups tried at 4 bits (each adds 4 B per group per token and head)


def candidate_policies(head_dim: int, elem_bytes: int = 2) -> list[KVPolicy]:
    """Every layout auto may choose, cheapest first in bytes per token for this head dim.

    Equal sizes keep the listed order: plain before rotated (rotation costs a little compute).
    """
    k4 = [KVPolicy(4, 4), KVPolicy(4, 4, rotate=True)]
    for group in K4_GROUPS:
        if group < head_dim and head_dim % group == 0:
            k4 += [KVPolicy(4, 4, group), KVPolicy(4, 4, group, rotate=True)]
    wider = [KVPolicy(8, 4), KVPolicy(8, 4, rotate=True), KVPolicy(16, 4), KVPolicy(8, 8), KVPolicy(16, 16)]
    return sorted(k4 + wider, key=lambda p: p.slot_bytes(head_dim, elem_bytes))


@dataclass(frozen=True)
class Settings:
    """Everything that changes a decision besides the model; all of it goes into the cache key."""

    budget: float = DEFAULT_KL_BUDGET
    margin: float = DEFAULT_MARGIN  # of the budget, for text unlike the calibration prompts
    tau: float = DEFAULT_TAU
    n_prompts: int = DEFAULT_PROMPTS  # per genre
    max_tokens: int = DEFAULT_MAX_TOKENS  # per prompt
    long_tokens: int = DEFAULT_LONG_TOKENS  # of the long document (0: none)
    per_layer: bool = True  # search a layout per layer when a cheaper uniform one fails
    scan_tokens: int = DEFAULT_SCAN_TOKENS  # per prompt, when each layer is measured alone
    # ratio > tau skips the K4 candidates. Off: it is not shown safe (rotation and channel groups can
    # rescue keys the plain INT6/INT8 ratio calls fragile), and the K4 passes are cheap.
    ratio_early_exit: bool = False

    def __post_init__(self):
        if not self.budget > 0:
            raise ValueError(f"the KL budget must be > 0 nats, got {self.budget}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"the margin is a fraction of the budget, 0 < margin <= 1, got {self.margin}")
        if self.n_prompts < 1 or self.max_tokens < 2 or self.scan_tokens < 2:
            raise ValueError("need at least one prompt per genre of at least two tokens")
        if self.long_tokens < 0:
            raise ValueError(f"long_tokens must be >= 0, got {self.long_tokens}")

    @property
    def target(self) -> float:
        """The KL a layout may cost on the calibration prompts."""
        return self.budget * self.margin


@dataclass
class Calibration:
    """The outcome: the chosen layout (a map; uniform unless the per-layer stage found a cheaper one), the
    best uniform policy, every measurement taken and the classifier evidence."""

    policy: PolicyMap
    uniform: KVPolicy
    measurements: list[Measurement]
    ratio: float
    settings: Settings
    seconds: float  # model load + reference pass + every measurement
    search: Search | None = None
    info: dict = field(default_factory=dict)

    def measured(self, name: str) -> Measurement | None:
        return next((m for m in self.measurements if m.name == name), None)

    @property
    def fragile(self) -> bool:
        return self.ratio > self.settings.tau

    @property
    def chosen(self) -> tuple[float, float]:
        """(bytes per token per KV head as allocated, KL) of the decision."""
        if self.search is not None and self.search.chosen is not None:
            # (not the last check: a cheaper try after a pass may have missed)
            check = next(c for c in self.search.checks if c.map == self.search.chosen.name)
            return check.bytes_per_token, check.kl
        m = self.measured(self.uniform.name)
        return m.bytes_per_token, m.kl

    def evidence(self) -> dict:
        err = {n: self.measured(n).kl for n in ("k8v4", "k6v4", "k4v4") if self.measured(n)}
        size, kl = self.chosen
        return {
            "metric": "mean next-token KL(p_fp || p_quant), nats, over all positions of the prompts",
            "decision": self.policy.name,
            "uniform": self.uniform.name,
            "bytes_per_token": size,
            "kl": kl,
            "budget": self.settings.budget,
            "margin": self.settings.margin,
            "target": self.settings.target,
            "tau": self.settings.tau,
            "err_int8": err.get("k8v4"), "err_int6": err.get("k6v4"), "err_k4v4": err.get("k4v4"),
            "ratio": self.ratio,
            "keys": "fragile" if self.fragile else "tolerant",
            "candidates": [asdict(m) for m in self.measurements],
            "per_layer": None if self.search is None else self.search.evidence(),
            "seconds": round(self.seconds, 2),
            "settings": asdict(self.settings),
            **self.info,
        }


# -- prompts -----------------------------------------------------------------------------------------
def load_prompts(settings: Settings = Settings()) -> list[tuple[str, object]]:
    """``(genre, prompt)`` pairs of the shipped calibration text (``corpus``)."""
    return calibration_set(settings.n_prompts, long=settings.long_tokens > 0)


def prompts_digest(prompts: list) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()


# -- the two stages ------------------------------------------------------------------------------------
def _uniform(session: Session, candidates: list[KVPolicy], head_dim: int, elem_bytes: int, settings: Settings,
             measure_all: bool, progress: Progress) -> tuple[KVPolicy, list[Measurement], float]:
    """The cheapest candidate within the target (stops there unless ``measure_all``), every measurement, and
    the INT6/INT8 ratio (its K8V4 pass doubles as that candidate)."""
    progress.stage("uniform policies", len(candidates) + 1 if measure_all else None)
    k8 = session.measure("k8v4", (8, 4, None, False), KVPolicy(8, 4).slot_bytes(head_dim, elem_bytes))
    progress.step(f"k8v4: KL {k8.kl:.3g}")
    k6 = session.measure("k6v4", (6, 4, None, False))  # a measurement, not a storage format
    progress.step(f"k6v4 (ratio classifier): KL {k6.kl:.3g}")
    ratio = k6.kl / max(k8.kl, 1e-12)
    measurements, chosen = [k8, k6], None
    for policy in candidates:  # k4v4 first: its error is always reported
        size = policy.slot_bytes(head_dim, elem_bytes)
        if policy.k_bits == 4 and settings.ratio_early_exit and ratio > settings.tau and policy.name != "k4v4":
            continue
        if policy.name == "k8v4":
            result = k8
        elif not policy.quantized:
            result = Measurement(policy.name, size, 0.0, 1.0, 0.0, exact=True)
            measurements.append(result)
        else:
            result = session.measure(policy.name, spec_of(policy), size)
            measurements.append(result)
            progress.step(f"{policy.name}: KL {result.kl:.3g}")
        if chosen is None and result.kl <= settings.target:
            chosen = policy
            if not measure_all:
                break
    return chosen, measurements, ratio


def calibrate(session: Session, head_dim: int, settings: Settings = Settings(), *, elem_bytes: int = 2,
              measure_all: bool = False, mixed_types: bool = False, progress: Progress = SILENT) -> Calibration:
    """The decision for the model in ``session``: the best uniform policy, then (``settings.per_layer``)
    a cheaper verified map if the search finds one. ``mixed_types``: the model mixes layer types, so
    vLLM pads pages of different sizes (``search.allocated_slot_bytes``)."""
    start = time.perf_counter()
    candidates = candidate_policies(head_dim, elem_bytes)
    uniform, measurements, ratio = _uniform(session, candidates, head_dim, elem_bytes, settings, measure_all,
                                            progress)
    decision, found = PolicyMap.uniform(uniform), None
    cheapest = candidates[0].slot_bytes(head_dim, elem_bytes)
    if settings.per_layer and uniform.slot_bytes(head_dim, elem_bytes) > cheapest:
        best = next(m for m in measurements if m.name == uniform.name)
        found = search(session, candidates, best, head_dim, elem_bytes, settings.target,
                       scan_tokens=min(settings.scan_tokens, settings.max_tokens), mixed_types=mixed_types,
                       measured=measurements, progress=progress)
        if found.chosen is not None:
            decision = found.chosen
    seconds = time.perf_counter() - start
    info = {"head_dim": head_dim, "elem_bytes": elem_bytes, "n_prompts": len(session.inputs),
            "n_tokens": session.n_tokens, "genres": sorted(set(session.genres)), "device": str(session.device),
            "dtype": str(next(session.model.parameters()).dtype).removeprefix("torch."),
            "attention_layers": len(session.attention_layers), "mixed_layer_types": mixed_types,
            "seconds_load": round(session.load_seconds, 2),
            "seconds_reference": round(session.reference_seconds, 2),
            "seconds_measurements": round(seconds, 2)}
    total = session.load_seconds + session.reference_seconds + seconds
    return Calibration(decision, uniform, measurements, ratio, settings, total, found, info)
