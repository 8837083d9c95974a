"""Which layers carry a layout's error: each layer measured alone at its layout, then the whole model with
the worst layers kept unquantized, one more at a time (``vllm-int4kv layers`` prints it)."""
from __future__ import annotations

from dataclasses import dataclass

from .layer_map import PolicyMap
from .layout import UNQUANTIZED
from .session import PerLayer, Session, spec_of, spec_of_map


@dataclass
class Step:
    """The whole model at the map except the ``kept`` layers (unquantized)."""

    kept: list[int]
    policy: str  # the map that serves it
    bytes_per_token: float  # per KV head, averaged over the layers
    kl: float
    top1: float


@dataclass
class Sweep:
    policy: str
    budget: float
    num_layers: int  # attention layers (a hybrid model's state layers hold no KV cache)
    single: dict[int, float]  # layer -> KL with only that layer at its layout
    steps: list[Step]

    @property
    def within_budget(self) -> Step | None:
        return next((s for s in self.steps if s.kl <= self.budget), None)


def sweep(session: Session, policy_map: PolicyMap, head_dim: int, elem_bytes: int, budget: float,
          max_skip: int) -> Sweep:
    """Over the session's attention layers (the indices of a map and of --kv-cache-dtype-skip-layers)."""
    if not session.attention_layers:
        raise NotImplementedError(f"{type(session.model).__name__}'s attention modules have no layer_idx, so "
                                  "its layers cannot be measured one by one")
    layers = session.attention_layers
    single = {i: session.measure(f"layer {i}", PerLayer(None, {i: spec_of(policy_map.for_layer(i))})).kl
              for i in layers}
    order = sorted(single, key=single.get, reverse=True)
    steps = []
    for n in range(min(max_skip, len(layers) - 1) + 1):  # every layer kept would just be k16v16
        kept = sorted(order[:n])
        served = policy_map.with_layers(kept, UNQUANTIZED)
        m = session.measure(f"keep {kept}", spec_of_map(served))
        steps.append(Step(kept, served.name, served.mean_slot_bytes(layers, head_dim, elem_bytes), m.kl, m.top1))
        if m.kl <= budget:
            break
    return Sweep(policy_map.name, budget, len(layers), single, steps)
