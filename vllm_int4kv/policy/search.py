"""A layout per layer: the cheapest map whose measured KL stays within the budget.

1. **Scan.** Each attention layer alone is stored at the cheapest rung of a ladder of layouts (every other
   layer in full precision) and its KL measured on the first ``scan_tokens`` of every calibration prompt:
   one pass per layer, which says how far that layer's error carries to the output. One more pass
   measures, for every layer and rung, the error of the layer's attention output (``ErrorProbe``); a
   rung's KL for a layer is predicted as the measured KL scaled by the ratio of those errors. (Measuring
   every rung of every layer end to end would cost rungs times more passes.)
2. **Plan.** The layers' KLs are taken to add up. Every layer starts on the cheapest rung; then the
   upgrade with the largest KL drop per extra byte is taken, over and over, until the predicted KL is
   within the target (a fraction of the budget: layers' errors do not add exactly).
3. **Verify.** The whole model is measured with every layer as mapped, on the full calibration prompts.
   Only a verified map is ever chosen. The next try rescales the target by what the measurement says of the
   prediction: tighter after a miss, looser (a cheaper map) after a pass with room to spare; at most
   ``max_checks`` measurements, and the cheapest map that passed is the decision. If none passes, the
   uniform policy stays.

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
LOOSEN_BELOW = 0.75  # a map that passes below this fraction of the budget is followed by a cheaper try


def ladder(candidates: list[KVPolicy], head_dim: int, elem_bytes: int,
           measured_kl: dict[str, float] | None = None) -> list[KVPolicy]:
    """The rungs a layer may stand on, cheapest first, up to K16V16: at each size one layout. Where the
    uniform stage measured two layouts of a size, the one with the lower KL (rotation usually wins, but not
    always: on Qwen2's key outliers plain K4V4 beat rotated K4V4); otherwise the rotated one, where
    rotation is offered at that size (it never costs bytes). 32-channel key groups are left out: a
    step of 4 bytes between two rungs 12 bytes apart, not worth a pass per layer."""
    measured_kl = measured_kl or {}

    def better(policy: KVPolicy, than: KVPolicy) -> bool:
        if policy.name in measured_kl and than.name in measured_kl:
            return measured_kl[policy.name] < measured_kl[than.name]
        return policy.rotate and not than.rotate

    by_size: dict[int, KVPolicy] = {}
    for policy in candidates:
        if policy.k_group is not None and policy.k_group > 16:
            continue
        size = policy.slot_bytes(head_dim, elem_bytes)
        if size not in by_size or better(policy, by_size[size]):
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
    single: dict[int, dict[str, float]]  # layer -> rung -> KL of that layer alone at that rung (predicted)
    basis: dict = field(default_factory=dict)  # layer -> the measured KL and output errors behind ``single``
    checks: list[Check] = field(default_factory=list)
    chosen: PolicyMap | None = None
    note: str = ""

    def evidence(self) -> dict:
        return {"budget": self.budget, "rungs": self.rungs,
                "single": {str(layer): kls for layer, kls in self.single.items()},
                "basis": {str(layer): b for layer, b in self.basis.items()},
                "checks": [asdict(check) for check in self.checks],
                "chosen": None if self.chosen is None else self.chosen.name, "note": self.note}


def _scan(session: Session, rungs: list[KVPolicy], layers: list[int], tokens: int,
          progress: Progress) -> tuple[dict[int, dict[str, float]], dict]:
    """Predicted KL per layer and rung, and what it was predicted from (per layer: the measured KL at the
    cheapest rung, and the attention-output error of every rung)."""
    quantized = [rung for rung in rungs if rung.quantized]
    progress.stage("per-layer scan", len(layers) + 1)
    errors = session.attention_errors({rung.name: spec_of(rung) for rung in quantized}, tokens)
    progress.step(f"attention-output error of {len(quantized)} layouts in every layer")
    single, basis = {}, {}
    for index in layers:
        alone = PerLayer(None, {index: spec_of(rungs[0])})
        kl = session.measure(f"layer {index} {rungs[0].name}", alone, tokens=tokens).kl
        progress.step(f"layer {index} {rungs[0].name}: KL {kl:.2g}")
        base = errors.mean(index, rungs[0].name)
        single[index] = {rung.name: (kl * errors.mean(index, rung.name) / base if base > 0 else 0.0)
                         if rung.quantized else 0.0 for rung in rungs}
        single[index][rungs[0].name] = kl
        basis[index] = {"kl": kl, "output_mse": {rung.name: errors.mean(index, rung.name) for rung in quantized}}
    return single, basis


def _greedy_path(single: dict[int, dict[str, float]], rungs: list[KVPolicy],
                 sizes: list[int]) -> list[tuple[dict[int, int], float]]:
    """Every layer on the cheapest rung, then upgrade after upgrade, each the largest predicted KL drop
    per extra byte: ``[(rung index per layer, predicted KL), ...]`` from cheapest to nothing left to buy.
    Planning to a KL target is a prefix of this path, so a looser target always gives a cheaper map."""
    at = {index: 0 for index in single}

    def kl(index: int, rung: int) -> float:
        return single[index][rungs[rung].name]

    path = [(dict(at), sum(kl(i, r) for i, r in at.items()))]
    while True:
        best, best_gain = None, 0.0
        for index, rung in at.items():
            for higher in range(rung + 1, len(rungs)):
                drop = kl(index, rung) - kl(index, higher)
                gain = drop / (sizes[higher] - sizes[rung])
                if drop > 0 and gain > best_gain:
                    best, best_gain = (index, higher), gain
        if best is None:
            return path
        at[best[0]] = best[1]
        path.append((dict(at), sum(kl(i, r) for i, r in at.items())))


def _as_map(at: dict[int, int], rungs: list[KVPolicy]) -> PolicyMap:
    """The most common rung as the default, the other layers listed."""
    counts: dict[int, int] = {}
    for rung in at.values():
        counts[rung] = counts.get(rung, 0) + 1
    default = max(counts, key=lambda rung: (counts[rung], -rung))
    return PolicyMap(rungs[default], tuple(sorted((i, rungs[r]) for i, r in at.items() if r != default)))


def search(session: Session, candidates: list[KVPolicy], uniform: Measurement, head_dim: int,
           elem_bytes: int, budget: float, *, scan_tokens: int, max_checks: int = 3,
           mixed_types: bool = False, measured: list[Measurement] = (), progress: Progress = SILENT) -> Search:
    """The cheapest verified map under ``budget`` that costs fewer bytes than ``uniform`` (the best
    uniform policy's measurement), or a ``Search`` whose ``chosen`` is None. ``measured``: the uniform
    stage's measurements, which pick the layout at each size of the ladder."""
    layers = session.attention_layers
    rungs = ladder(candidates, head_dim, elem_bytes, {m.name: m.kl for m in measured})
    sizes = [rung.slot_bytes(head_dim, elem_bytes) for rung in rungs]
    result = Search(budget, [rung.name for rung in rungs], {})
    if len(layers) < 2:
        result.note = "one attention layer: a map is a uniform policy"
        return result
    result.single, result.basis = _scan(session, rungs, layers, scan_tokens, progress)
    path = _greedy_path(result.single, rungs, sizes)
    best_cost, target, measured = uniform.bytes_per_token, TARGET * budget, set()
    progress.stage("per-layer check", max_checks)
    for _ in range(max_checks):
        at, predicted = next((state for state in path if state[1] <= target), path[-1])
        candidate = _as_map(at, rungs)
        cost = allocated_slot_bytes(candidate, layers, head_dim, elem_bytes, mixed_types)
        if cost >= best_cost or candidate.name in measured:
            if result.chosen is None:
                result.note = (f"the cheapest map the scan predicts within budget ({candidate.name}, {cost:.1f} B) "
                               f"is no cheaper than the uniform policy ({uniform.name}, {uniform.bytes_per_token} B)")
            break
        measured.add(candidate.name)
        m = session.measure(candidate.name, spec_of_map(candidate), cost)
        result.checks.append(Check(candidate.name, cost, predicted, m.kl, m.top1, m.by_genre))
        progress.step(f"{candidate.name}: {cost:.1f} B, KL {m.kl:.3g} (predicted {predicted:.3g})")
        if m.kl <= budget:
            result.chosen, best_cost = candidate, cost
            if m.kl >= LOOSEN_BELOW * budget:
                break
        # the next map aims at TARGET x budget on the measured scale: looser when this one passed with room
        # to spare, tighter when it missed
        target = predicted * TARGET * budget / max(m.kl, 1e-12)
    if result.chosen is None and not result.note:
        result.note = f"no map passed its check in {len(result.checks)} tries"
    return result
