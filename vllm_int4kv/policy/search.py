"""A layout per layer: the cheapest map whose measured KL stays within the budget.

1. **Scan.** Each attention layer alone is stored at the rungs of a ladder of layouts, cheapest first
   (every other layer in full precision), and measured on the first ``scan_tokens`` of every calibration
   prompt, until its KL is a small part of its share of the budget (``SETTLED``): upgrades beyond that
   would buy almost nothing, so they are not measured, and are taken to gain nothing.
2. **Plan.** The layers' KLs are taken to add up. Every layer starts on the cheapest rung; then the
   upgrade with the largest KL drop per extra byte is taken, over and over, until the predicted KL is
   within the target (a fraction of the budget: layers' errors do not add exactly).
3. **Verify.** The whole model is measured with every layer as mapped, on the full calibration prompts.
   Only a verified map is ever chosen: over budget, the target shrinks by the ratio it was missed by and
   planning goes on, for at most ``max_checks`` measurements; if none passes, the uniform policy stays.

Bytes are counted as vLLM allocates them (``allocated_slot_bytes``): where the model mixes layer types,
vLLM pads every page to the largest (unless it divides it), and a map pays for that.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .layer_map import PolicyMap, allocated_sizes
from .layout import UNQUANTIZED, KVPolicy
from .progress import SILENT, Progress
from .session import Measurement, PerLayer, Session, spec_of, spec_of_map

TARGET = 0.9  # plan to this fraction of the budget before the first check
SETTLED = 0.1  # a layer whose KL is below this fraction of its share of the budget (budget / layers) is
# not measured on higher rungs: a scan of every rung of every layer would cost rungs x layers passes


def ladder(candidates: list[KVPolicy], head_dim: int, elem_bytes: int) -> list[KVPolicy]:
    """The rungs a layer may stand on, cheapest first: at each size the best-placed layout (rotated,
    where rotation is offered at that size: it never costs bytes), up to K16V16. 32-channel key groups are
    left out: a step of 4 bytes between two rungs 12 bytes apart, not worth a pass per layer."""
    by_size: dict[int, KVPolicy] = {}
    for policy in candidates:
        if policy.k_group is not None and policy.k_group > 16:
            continue
        size = policy.slot_bytes(head_dim, elem_bytes)
        if size not in by_size or (policy.rotate and not by_size[size].rotate):
            by_size[size] = policy
    rungs = [by_size[size] for size in sorted(by_size)]
    return rungs if UNQUANTIZED in rungs else rungs + [UNQUANTIZED]


def allocated_slot_bytes(policy_map: PolicyMap, layers: list[int], head_dim: int, elem_bytes: int,
                         mixed_types: bool = False) -> float:
    """Mean bytes per token per KV head over ``layers`` as vLLM allocates the map's pages.

    Layers of one type (all full attention) each get pages of their own size in one pool. A model that
    mixes types (sliding-window or state layers beside full attention) gets one page size: a page that
    does not divide the largest is padded to it (one that does gets proportionally more tokens)."""
    sizes = allocated_sizes([policy_map.slot_bytes(index, head_dim, elem_bytes) for index in layers], mixed_types)
    return sum(sizes) / len(sizes)


@dataclass
class Check:
    map: str
    bytes_per_token: float
    predicted_kl: float
    kl: float
    top1: float
    by_genre: dict[str, float]


@dataclass
class Search:
    """What the per-layer search measured and found (``chosen``: None when no map beat the uniform)."""

    budget: float
    rungs: list[str]
    single: dict[int, dict[str, float]]  # layer -> rung -> KL of that layer alone at that rung (scan)
    checks: list[Check] = field(default_factory=list)
    chosen: PolicyMap | None = None
    note: str = ""

    def evidence(self) -> dict:
        return {"budget": self.budget, "rungs": self.rungs,
                "single": {str(layer): kls for layer, kls in self.single.items()},
                "checks": [asdict(check) for check in self.checks],
                "chosen": None if self.chosen is None else self.chosen.name, "note": self.note}


def _scan(session: Session, rungs: list[KVPolicy], layers: list[int], budget: float, tokens: int,
          progress: Progress) -> dict[int, dict[str, float]]:
    settled = SETTLED * budget / len(layers)
    progress.stage("per-layer scan", len(layers) * (len(rungs) - 1))
    single: dict[int, dict[str, float]] = {}
    for index in layers:
        kls: dict[str, float] = {}
        for rung in rungs:
            if not rung.quantized:
                kls[rung.name] = 0.0
                continue
            below = next((kl for kl in kls.values() if kl <= settled), None)
            if below is not None:  # a cheaper rung already settles this layer: taken to gain nothing more
                kls[rung.name] = below
                progress.step(f"layer {index} {rung.name}: not measured, a cheaper rung settles it")
                continue
            alone = PerLayer(None, {index: spec_of(rung)})
            kls[rung.name] = session.measure(f"layer {index} {rung.name}", alone, tokens=tokens).kl
            progress.step(f"layer {index} {rung.name}: KL {kls[rung.name]:.2g}")
        single[index] = kls
    return single


def _plan(single: dict[int, dict[str, float]], rungs: list[KVPolicy], start: dict[int, int], target: float,
          sizes: list[int]) -> dict[int, int]:
    """Rung index per layer: from ``start``, the best KL drop per byte until the sum is within ``target``."""
    at = dict(start)

    def kl(index: int, rung: int) -> float:
        return single[index][rungs[rung].name]

    while sum(kl(i, r) for i, r in at.items()) > target:
        best, best_gain = None, 0.0
        for index, rung in at.items():
            for higher in range(rung + 1, len(rungs)):
                drop = kl(index, rung) - kl(index, higher)
                gain = drop / (sizes[higher] - sizes[rung])
                if drop > 0 and gain > best_gain:
                    best, best_gain = (index, higher), gain
        if best is None:  # nothing left to buy: every layer is as good as it gets
            break
        at[best[0]] = best[1]
    return at


def _as_map(at: dict[int, int], rungs: list[KVPolicy]) -> PolicyMap:
    """The most common rung as the default, the other layers listed."""
    counts: dict[int, int] = {}
    for rung in at.values():
        counts[rung] = counts.get(rung, 0) + 1
    default = max(counts, key=lambda rung: (counts[rung], -rung))
    return PolicyMap(rungs[default], tuple(sorted((i, rungs[r]) for i, r in at.items() if r != default)))


def search(session: Session, candidates: list[KVPolicy], uniform: Measurement, head_dim: int,
           elem_bytes: int, budget: float, *, scan_tokens: int, max_checks: int = 3,
           mixed_types: bool = False, progress: Progress = SILENT) -> Search:
    """The cheapest verified map under ``budget`` that costs fewer bytes than ``uniform`` (the best
    uniform policy's measurement), or a ``Search`` whose ``chosen`` is None."""
    layers = session.attention_layers
    rungs = ladder(candidates, head_dim, elem_bytes)
    sizes = [rung.slot_bytes(head_dim, elem_bytes) for rung in rungs]
    result = Search(budget, [rung.name for rung in rungs], {})
    if len(layers) < 2:
        result.note = "one attention layer: a map is a uniform policy"
        return result
    result.single = _scan(session, rungs, layers, budget, scan_tokens, progress)
    at, target = {index: 0 for index in layers}, TARGET * budget
    progress.stage("per-layer check", max_checks)
    for _ in range(max_checks):
        at = _plan(result.single, rungs, at, target, sizes)
        candidate = _as_map(at, rungs)
        cost = allocated_slot_bytes(candidate, layers, head_dim, elem_bytes, mixed_types)
        if cost >= uniform.bytes_per_token:
            result.note = (f"the cheapest map the scan predicts within budget ({candidate.name}, {cost:.1f} B) "
                           f"is no cheaper than the uniform policy ({uniform.name}, {uniform.bytes_per_token} B)")
            break
        predicted = sum(result.single[i][rungs[r].name] for i, r in at.items())
        m = session.measure(candidate.name, spec_of_map(candidate), cost)
        result.checks.append(Check(candidate.name, cost, predicted, m.kl, m.top1, m.by_genre))
        progress.step(f"{candidate.name}: {cost:.1f} B, KL {m.kl:.3g} (predicted {predicted:.3g})")
        if m.kl <= budget:
            result.chosen = candidate
            return result
        target *= budget / m.kl * TARGET  # missed by m.kl / budget: plan that much tighter
    if not result.note:
        result.note = f"no map passed its check in {len(result.checks)} tries"
    return result
