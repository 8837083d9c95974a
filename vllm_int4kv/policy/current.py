"""The policy of this process: decided once, the first time vLLM asks for a page size, then read by every
layer.

With several ranks (tensor and pipeline parallel) rank 0 decides for the whole engine and the others adopt
its decision (``consensus``); a calibration runs once, not once per rank.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .. import envs
from .consensus import AllGather, agree_on_policy
from .decide import ModelTarget
from .layer_map import PolicyMap
from .progress import Progress

_policy: PolicyMap | None = None
_source = ""
_lock = threading.Lock()


TargetOf = Callable[[], "ModelTarget | None"]  # asked only for auto: explicit policies need no model


def _decide(request: str, target_of: TargetOf) -> tuple[PolicyMap, str]:
    from .decide import decide  # a calibration imports transformers: only when auto is asked for

    auto = request.lower() == "auto"
    progress = Progress(logging.getLogger("vllm.int4kv").info, "vllm-int4kv auto", every=30.0)
    decision = decide(request, target_of() if auto else None, progress=progress)
    reason = decision.summary if decision.source != "explicit" else f"VLLM_INT4KV_POLICY={request}"
    return decision.policy, reason


def resolve_policy(target_of: TargetOf = lambda: None, *, all_gather: AllGather | None = None,
                   rank: int = 0) -> PolicyMap:
    """The process's policy for ``VLLM_INT4KV_POLICY`` (a policy, or ``auto`` for the model ``target_of()``
    returns), decided once.

    ``all_gather`` (over every rank) makes rank 0 decide for all; differing requests or layouts stop
    start-up (see ``consensus``).
    """
    global _policy, _source
    with _lock:
        if _policy is None:
            request = envs.policy_name(rank)
            if all_gather is None:
                _policy, _source = _decide(request, target_of)
            else:
                _policy, _source = agree_on_policy(request, rank, all_gather,
                                                   lambda name: _decide(name, target_of))
        return _policy


def policy_source() -> str:
    """Where the process's policy came from (the env variable, or the auto decision's summary)."""
    return _source


def current_policy() -> PolicyMap | None:
    return _policy


def reset_policy() -> None:
    """Forget the resolved policy (tests that switch ``VLLM_INT4KV_POLICY`` in one process)."""
    global _policy, _source
    with _lock:
        _policy, _source = None, ""
