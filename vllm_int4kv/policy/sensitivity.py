"""Which layers carry a policy's error: each layer measured alone at a policy, then the whole model with
the worst layers kept unquantized, one more at a time (``vllm-int4kv layers`` prints it)."""
from __future__ import annotations

from dataclasses import dataclass

from . import calibration
from .layout import KVPolicy, mean_slot_bytes


@dataclass
class Step:
    """The whole model at the policy except the ``kept`` layers (unquantized)."""

    kept: list[int]
    bytes_per_token: float  # per KV head, averaged over the layers
    kl: float
    top1: float


@dataclass
class Sweep:
    policy: str
    budget: float
    num_layers: int  # attention layers (a hybrid model's state layers hold no KV cache)
    single: dict[int, float]  # layer -> KL with only that layer at the policy
    steps: list[Step]

    @property
    def within_budget(self) -> Step | None:
        return next((s for s in self.steps if s.kl <= self.budget), None)


def sweep(session: calibration.Session, policy: KVPolicy, head_dim: int, elem_bytes: int,
          budget: float, max_skip: int) -> Sweep:
    """Over the session's attention layers (the indices vLLM's --kv-cache-dtype-skip-layers takes)."""
    spec = calibration.spec_of(policy)
    if not session.attention_layers:
        raise NotImplementedError(f"{type(session.model).__name__}'s attention modules have no layer_idx, so "
                                  "its layers cannot be measured one by one")
    num_layers = len(session.attention_layers)
    single = {i: session.measure(f"layer {i}", calibration.PerLayer(None, {i: spec})).kl
              for i in session.attention_layers}
    order = sorted(single, key=single.get, reverse=True)
    steps = []
    for n in range(min(max_skip, num_layers - 1) + 1):  # every layer kept would just be k16v16
        kept = order[:n]
        m = session.measure(f"keep {kept}", calibration.PerLayer(spec, dict.fromkeys(kept)))
        mean_bytes = mean_slot_bytes(policy, head_dim, elem_bytes, num_layers, n)
        steps.append(Step(sorted(kept), mean_bytes, m.kl, m.top1))
        if m.kl <= budget:
            break
    return Sweep(policy.name, budget, num_layers, single, steps)
