"""Policy agreement across ranks, with ranks simulated as threads sharing a barrier-based all_gather."""
import threading

import pytest

from vllm_int4kv.policy.consensus import PolicyMismatchError, agree_on_policy
from vllm_int4kv.policy import parse_policy


def run_ranks(requests, resolve):
    """Run agree_on_policy on len(requests) threads; returns each rank's result or exception."""
    world = len(requests)
    slots, barrier = [None] * world, threading.Barrier(world)

    def make_gather(rank):
        def all_gather(obj):
            barrier.wait()
            slots[rank] = obj
            barrier.wait()
            values = list(slots)
            barrier.wait()
            return values
        return all_gather

    results = [None] * world

    def work(rank):
        try:
            results[rank] = agree_on_policy(requests[rank], rank, make_gather(rank), resolve)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            results[rank] = err

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return results


def test_auto_is_resolved_once_on_rank_zero_and_shared():
    calls = []

    def resolve(request):
        calls.append(request)
        return parse_policy("k8v4"), "keys fragile"

    results = run_ranks(["auto"] * 4, resolve)
    assert calls == ["auto"]
    assert {r[0].name for r in results} == {"k8v4"}
    assert "decided on rank 0" in results[3][1]


def test_different_requests_fail_every_rank_with_the_fix():
    results = run_ranks(["k4v4", "k8v4"], lambda r: (parse_policy(r), "explicit"))
    for result in results:
        assert isinstance(result, PolicyMismatchError)
        assert "rank 0: k4v4, rank 1: k8v4" in str(result) and "VLLM_INT4KV_POLICY" in str(result)


def test_a_failure_on_rank_zero_reaches_every_rank():
    def resolve(request):
        raise ValueError("calibration ran out of memory")

    results = run_ranks(["auto", "auto"], resolve)
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)


def test_single_rank_is_trivial():
    (result,) = run_ranks(["k4v4-rot"], lambda r: (parse_policy(r), "explicit"))
    assert result[0].single == parse_policy("k4v4-rot")


@pytest.mark.parametrize("text", ["k4v4", "k8v4", "k16v4", "k8v8", "k16v16", "k4v4-g16-rot", "k8v4-rot"])
def test_policy_names_round_trip(text):
    assert parse_policy(text).name == text
