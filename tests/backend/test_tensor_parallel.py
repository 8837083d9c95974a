"""Tensor and pipeline parallelism through vLLM's own engine (CPU build, 2 ranks, one core each).

The tiny model has 2 KV heads, so each TP rank holds 1: pages, start-up line and policy are per rank.
With PP each rank holds one of the 2 layers, with both KV heads.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("tp_engine.py")
pytestmark = [pytest.mark.slow, pytest.mark.engine]


def run_engine(model, tp, policy, tmp_path, extra_env=None, expect_ok=True, pp=1):
    env = dict(os.environ, VLLM_INT4KV_POLICY=policy, VLLM_INT4KV_IMPL="torch",
               VLLM_INT4KV_CACHE_DIR=str(tmp_path / "decisions"), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="0|1" if tp * pp == 2 else "0", HF_HUB_OFFLINE="1",
               VLLM_LOGGING_LEVEL="INFO", **(extra_env or {}))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # workers are real processes here
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model), str(tp), str(pp)], env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if not expect_ok:
        assert proc.returncode != 0, "start-up should have failed"
        return None, log
    assert proc.returncode == 0, log[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), log


def policy_lines(log):
    """{rank: policy} from each worker's start-up line."""
    found = re.findall(r"KV policy (\S+),.*\[rank (\d) of 2", log)
    return {int(rank): name for name, rank in found}


def _same_as(result, single):
    """Unquantized pages on several ranks against one: the same tokens, and logprobs within fp32 rounding
    (sharded matmuls sum in another order)."""
    for ours, ref in zip(result["outputs"], single["outputs"], strict=True):
        assert ours["tokens"] == ref["tokens"]
        assert max(abs(a - b) for a, b in zip(ours["logprobs"], ref["logprobs"])) < 1e-3


def _close_to(result, single):
    """Quantized pages on two ranks against one: the same first tokens, then logprobs within fp32
    rounding of the sharded projections (which can move a code across a rounding boundary)."""
    for ours, ref in zip(result["outputs"], single["outputs"], strict=True):
        assert len(ours["tokens"]) == 12 and ours["tokens"][:4] == ref["tokens"][:4]
        n = next((i for i, (a, b) in enumerate(zip(ours["tokens"], ref["tokens"])) if a != b), 12)
        assert max(abs(a - b) for a, b in zip(ours["logprobs"][:n], ref["logprobs"][:n])) < 0.05


@pytest.fixture(scope="module")
def single_rank_k16v16(tiny_model_dir, tmp_path_factory):
    result, _ = run_engine(tiny_model_dir, 1, "k16v16", tmp_path_factory.mktemp("tp1"))
    return result


def test_k16v16_on_two_ranks_equals_one_rank(tiny_model_dir, single_rank_k16v16, tmp_path):
    result, log = run_engine(tiny_model_dir, 2, "k16v16", tmp_path)
    assert policy_lines(log) == {0: "k16v16", 1: "k16v16"}
    assert "1 KV heads on this rank" in log
    _same_as(result, single_rank_k16v16)


def test_skipped_layers_on_two_ranks_equal_one_rank_k16v16(tiny_model_dir, single_rank_k16v16, tmp_path):
    """``--kv-cache-dtype-skip-layers`` naming both layers under k4v4: every rank's pages are K16V16."""
    skip_all = {"TP_ENGINE_KWARGS": json.dumps({"kv_cache_dtype": "int4_per_token_head",
                                                "kv_cache_dtype_skip_layers": ["0", "1"]})}
    result, log = run_engine(tiny_model_dir, 2, "k4v4", tmp_path, extra_env=skip_all)
    assert policy_lines(log) == {0: "k16v16", 1: "k16v16"}
    assert log.count("(from --kv-cache-dtype-skip-layers) [rank") == 2, log[-4000:]
    _same_as(result, single_rank_k16v16)


def test_one_skipped_layer_on_two_tensor_or_pipeline_ranks(tiny_model_dir, tmp_path):
    """Layer 0 kept unquantized beside k4v4 in layer 1: with TP both ranks hold both kinds of pages;
    with PP each stage holds one layer, and the start-up check of the skip list sees both stages."""
    skip0 = {"TP_ENGINE_KWARGS": json.dumps({"kv_cache_dtype": "int4_per_token_head",
                                             "kv_cache_dtype_skip_layers": ["0"]})}
    single, _ = run_engine(tiny_model_dir, 1, "k4v4", tmp_path / "one", extra_env=skip0)
    tp, tp_log = run_engine(tiny_model_dir, 2, "k4v4", tmp_path / "tp", extra_env=skip0)
    pp, pp_log = run_engine(tiny_model_dir, 1, "k4v4", tmp_path / "pp", extra_env=skip0, pp=2)
    for rank in (0, 1):
        assert re.search(rf"KV policy k16v16,.*\(from --kv-cache-dtype-skip-layers\) \[rank {rank} of 2", tp_log)
        assert re.search(rf"KV policy k4v4,.*\[rank {rank} of 2", tp_log)
    # stage 0 holds the kept layer, stage 1 the quantized one
    assert re.search(r"KV policy k16v16,.*\[rank 0 of 2", pp_log)
    assert re.search(r"KV policy k4v4,.*\[rank 1 of 2", pp_log)
    assert not re.search(r"KV policy k4v4,.*\[rank 0 of 2", pp_log), pp_log[-3000:]
    _close_to(tp, single)
    _close_to(pp, single)


def test_a_per_layer_map_on_two_tensor_or_pipeline_ranks(tiny_model_dir, tmp_path):
    """VLLM_INT4KV_POLICY="k16v16;1:k4v4": every rank serves the same map (compared at start-up); with TP
    both ranks hold both layouts, with PP stage 0 holds layer 0 at K16V16 and stage 1 layer 1 at K4V4;
    a rank asking for another map stops start-up."""
    policy = "k16v16;1:k4v4"
    single, _ = run_engine(tiny_model_dir, 1, policy, tmp_path / "one")
    tp, tp_log = run_engine(tiny_model_dir, 2, policy, tmp_path / "tp")
    pp, pp_log = run_engine(tiny_model_dir, 1, policy, tmp_path / "pp", pp=2)
    for rank in (0, 1):
        assert re.search(rf"KV policy k16v16,.*\[rank {rank} of 2", tp_log)
        assert re.search(rf"KV policy k4v4,.*\[rank {rank} of 2", tp_log)
    assert re.search(r"KV policy k16v16,.*\[rank 0 of 2", pp_log) and re.search(r"KV policy k4v4,.*\[rank 1 of 2", pp_log)
    assert not re.search(r"KV policy k4v4,.*\[rank 0 of 2", pp_log), pp_log[-3000:]
    assert "KV policy map k16v16;1:k4v4" in tp_log and "KV policy map k16v16;1:k4v4" in pp_log
    _close_to(tp, single)
    _close_to(pp, single)
    _, log = run_engine(tiny_model_dir, 2, policy, tmp_path / "bad",
                        extra_env={"VLLM_INT4KV_TEST_RANK_POLICY": "1:k16v16;1:k8v4"}, expect_ok=False)
    assert "ranks asked for different KV policies (rank 0: k16v16;1:k4v4, rank 1: k16v16;1:k8v4)" in log


def test_k4v4_on_two_ranks_matches_one_rank(tiny_model_dir, tmp_path):
    """Pages are quantized per (token, head), so splitting heads over ranks changes nothing but fp32
    rounding of the projections (which can move a code across a rounding boundary: loose bound)."""
    result, log = run_engine(tiny_model_dir, 2, "k4v4", tmp_path)
    single, _ = run_engine(tiny_model_dir, 1, "k4v4", tmp_path)
    assert policy_lines(log) == {0: "k4v4", 1: "k4v4"}
    _close_to(result, single)


def rank_layouts(log) -> dict[int, set[str]]:
    """{rank: the layouts its start-up lines announced} (a map announces one line per layout)."""
    found: dict[int, set[str]] = {}
    for name, rank in re.findall(r"KV policy (\S+),.*\[rank (\d) of 2", log):
        found.setdefault(int(rank), set()).add(name)
    return found


def decided_map(log):
    """What auto decided, as a map (one layout, or the map of its start-up line)."""
    from vllm_int4kv.policy.layer_map import parse_policy_map

    mapped = re.search(r"KV policy map (\S+):", log)
    return parse_policy_map(mapped.group(1) if mapped else rank_layouts(log)[0].pop())


def test_auto_is_decided_once_and_shared(tiny_model_dir, tmp_path):
    result, log = run_engine(tiny_model_dir, 2, "auto", tmp_path)
    layouts, decided = rank_layouts(log), decided_map(log)
    wanted = {decided.for_layer(index).name for index in (0, 1)}
    assert layouts == {0: wanted, 1: wanted}, log[-3000:]  # TP: every rank holds every layer
    assert "decided on rank 0" in log
    assert result["outputs"]


def test_mismatched_ranks_stop_start_up(tiny_model_dir, tmp_path):
    _, log = run_engine(tiny_model_dir, 2, "k4v4", tmp_path,
                        extra_env={"VLLM_INT4KV_TEST_RANK_POLICY": "1:k8v4"}, expect_ok=False)
    assert "ranks asked for different KV policies (rank 0: k4v4, rank 1: k8v4)" in log


def test_pipeline_parallel_auto_is_shared_and_matches_one_rank(tiny_model_dir, tmp_path):
    """PP=2: rank 0 decides `auto` once, both stages serve their layer with it, and the tokens are those
    of one rank serving the decided policy (the compiled PP engine only reorders fp32 rounding)."""
    result, log = run_engine(tiny_model_dir, 1, "auto", tmp_path, pp=2)
    decided = decided_map(log)
    assert rank_layouts(log) == {0: {decided.for_layer(0).name}, 1: {decided.for_layer(1).name}}, log[-3000:]
    assert "decided on rank 0" in log and "2 KV heads on this rank" in log
    single, _ = run_engine(tiny_model_dir, 1, decided.name, tmp_path)
    assert len(result["outputs"]) == len(single["outputs"]) == 3
    _close_to(result, single)


def test_alibi_slopes_split_over_two_ranks(tmp_path):
    """Bloom's ALiBi slopes are per query head: vLLM hands each TP rank the slopes of its own heads (2 of
    the tiny Bloom's 4), and two ranks serve what one does."""
    from vllm_int4kv.testing.tiny_model import build_tiny_bloom

    model = build_tiny_bloom(tmp_path / "tiny-bloom", seed=0)
    one, _ = run_engine(model, 1, "k16v16", tmp_path / "tp1")
    two, log = run_engine(model, 2, "k16v16", tmp_path / "tp2")
    assert policy_lines(log) == {0: "k16v16", 1: "k16v16"}
    _same_as(two, one)
