"""One KV policy for the whole engine, however many ranks (tensor and pipeline parallel) it has.

Every rank must write and read the same page layout. vLLM only compares page *sizes* across workers, and
two policies can share a size (``k4v4`` and ``k4v4-rot``), so we agree explicitly:

1. every rank's request (``VLLM_INT4KV_POLICY``) is gathered; different requests stop start-up;
2. rank 0 alone resolves it (an ``auto`` calibration runs once, not once per rank) and every rank adopts
   rank 0's decision;
3. each rank's final layout is gathered and compared, so nothing can serve with mismatched pages.

The collective is passed in (``all_gather(obj) -> list`` over all ranks) so this module stays vLLM-free.
"""
from __future__ import annotations

from typing import Callable

from .layer_map import PolicyMap, parse_policy_map

AllGather = Callable[[object], list]


class PolicyMismatchError(RuntimeError):
    """Ranks of one engine would use different KV page layouts."""


def _by_rank(values: list) -> str:
    return ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))


def agree_on_policy(request: str, rank: int, all_gather: AllGather,
                    resolve: Callable[[str], tuple[PolicyMap, str]]) -> tuple[PolicyMap, str]:
    """The engine-wide (policy, reason). ``resolve(request)`` runs on rank 0 only."""
    requests = all_gather(request)
    if len(set(requests)) > 1:
        raise PolicyMismatchError(
            f"vllm-int4kv: ranks asked for different KV policies ({_by_rank(requests)}). Set "
            "VLLM_INT4KV_POLICY to the same value on every node, or unset it everywhere (auto).")
    decision = None
    error = None
    if rank == 0:
        try:
            policy, reason = resolve(request)
            decision = (policy.name, reason)
        except Exception as err:  # every rank must leave the collective, so share the failure
            error = f"{type(err).__name__}: {err}"
    decisions = all_gather(error or decision)
    if isinstance(decisions[0], str):
        raise RuntimeError(f"vllm-int4kv: rank 0 could not resolve the KV policy: {decisions[0]}")
    name, reason = decisions[0]
    policy = parse_policy_map(name)
    check_same_layout(policy, all_gather)
    return policy, reason if rank == 0 else f"{reason} (decided on rank 0)"


def check_same_layout(policy: PolicyMap, all_gather: AllGather) -> None:
    names = all_gather(policy.name)
    if len(set(names)) > 1:
        raise PolicyMismatchError(
            f"vllm-int4kv: ranks would serve different KV page layouts ({_by_rank(names)}); refusing to "
            "start. Use one VLLM_INT4KV_POLICY (and one plugin version) on every rank.")
