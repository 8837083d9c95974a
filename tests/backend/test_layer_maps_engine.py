"""Per-layer maps through vLLM's engine (CPU build): each layer's pages at its own layout in one block
pool, the Triton kernels (interpreted) serving the torch path's tokens, bad maps stopping start-up, and
what vLLM's two block layouts make of per-layer page sizes.

vLLM puts attention layers of one type (all full attention) whose pages differ in size into one KV-cache
group with a page of each size (``UniformTypeKVCacheSpecs``): no padding, one block size. On a model that
mixes layer types it pads every page that does not divide the largest. The GPU platforms raise the block
size only for --kv-cache-dtype-skip-layers (``Platform._align_heterogeneous_kv_block_size``), which a map
replaces, so a map keeps the block size; the test runs that GPU step on CPU to show it.
"""
from __future__ import annotations

import logging

import pytest

from test_skip_layers import _logprob_gap, _run, _start_up_error, _Warnings

pytestmark = pytest.mark.engine  # starts vLLM engines: `pytest -m "not engine"` leaves it out

MAP = "k4v4;1:k8v4-rot"  # layer 0 at K4V4 (72 B per token and KV head), layer 1 rotated K8V4 (104 B)


def test_a_map_is_served_with_each_layer_at_its_layout(tiny_model_dir):
    mapped = _run(tiny_model_dir, [], policy=MAP, kv_cache_dtype="int4_per_token_head")
    triton = _run(tiny_model_dir, [], policy=MAP, kv_cache_dtype="auto", impl="triton")
    k4v4 = _run(tiny_model_dir, [], policy="k4v4")
    k8v4 = _run(tiny_model_dir, [], policy="k8v4-rot", kv_cache_dtype="auto")

    assert {i: layer[:2] for i, layer in mapped["layers"].items()} == {0: ("k4v4", 72), 1: ("k8v4-rot", 104)}
    assert all(page == block * 2 * row for _, row, block, page in mapped["layers"].values())  # unpadded
    tokens = {name: run["blocks"] * run["layers"][1][2] for name, run in
              (("map", mapped), ("k4v4", k4v4), ("k8v4", k8v4))}
    assert tokens["map"] / tokens["k4v4"] == pytest.approx((72 + 72) / (72 + 104), rel=1e-3), tokens
    assert tokens["map"] / tokens["k8v4"] == pytest.approx((104 + 104) / (72 + 104), rel=1e-3), tokens
    # the Triton kernels serve the torch path's tokens; layer by layer, neither uniform policy's output
    assert triton["tokens"] == mapped["tokens"] and _logprob_gap(triton, mapped) < 1e-3
    assert _logprob_gap(mapped, k4v4) > 1e-3 and _logprob_gap(mapped, k8v4) > 1e-3


@pytest.mark.parametrize("policy, message", [
    ("k4v4;0:k8v4;0-1:k16v4", "layer 0 is named twice (0:k8v4 and 0-1:k16v4)"),
    ("0:k8v4", "no layout for layer 1: name every attention layer"),
    ("k4v4;5:k8v4", "layer 5 holds no attention KV cache in this model (its attention layers: 0-1)"),
    ("k4v4;1:k4v4-g64", "key groups of 64 channels need a head_dim above 64"),
])
def test_a_bad_map_stops_start_up_with_the_reason(tiny_model_dir, policy, message):
    chain = _start_up_error(tiny_model_dir, [], policy=policy, kv_cache_dtype="auto")
    assert any(message in m for m in chain), chain


def test_a_map_beside_the_skip_layer_flag_is_refused(tiny_model_dir):
    chain = _start_up_error(tiny_model_dir, ["0"], policy=MAP)
    assert any("drop --kv-cache-dtype-skip-layers and write the layers to keep into the map instead "
               f"({MAP};0:k16v16" in m for m in chain), chain


def test_the_gpu_block_size_step_keeps_blocks_for_a_map(tiny_model_dir, tmp_path, monkeypatch):
    """vLLM's GPU platforms raise the block size for --kv-cache-dtype-skip-layers only: with a map the
    pages of one model type keep the default block size (16 tokens there) and their own sizes. On a model that
    mixes types (tiny Gemma 2: a sliding-window layer, then a full one) vLLM pads the smaller page on both
    layouts; start-up says so, and ``auto``'s search counts those bytes (``search.allocated_slot_bytes``)."""
    from vllm.platforms import current_platform
    from vllm.platforms.interface import Platform

    from vllm_int4kv.backend import attention_backend as backend
    from vllm_int4kv.testing.tiny_model import build_tiny_gemma

    monkeypatch.setattr(type(current_platform), "update_block_size_for_backend",
                        classmethod(Platform.update_block_size_for_backend.__func__))
    llama = _run(tiny_model_dir, [], policy="k4v4;1:k16v16", kv_cache_dtype="auto")
    # the GPU platforms' default block (16 tokens; --kv-cache-dtype-skip-layers 1 would raise it to 128 so
    # that a K4V4 page covers a K16V16 one), each layer's page its own size
    assert llama["layers"] == {0: ("k4v4", 72, 16, 16 * 2 * 72), 1: ("k16v16", 512, 16, 16 * 2 * 512)}

    gemma = build_tiny_gemma(tmp_path / "gemma2", version=2, seed=0)
    warnings = _Warnings()
    test_logger = logging.getLogger("int4kv-layer-map-test")
    test_logger.addHandler(warnings)
    monkeypatch.setattr(backend, "logger", test_logger)
    backend._announced.clear()
    mixed = _run(gemma, [], policy="k4v4;1:k16v16", kv_cache_dtype="auto", lengths=(70, 20))
    assert mixed["layers"][0][:2] == ("k4v4", 72) and mixed["layers"][1][:2] == ("k16v16", 512)
    assert mixed["layers"][0][3] == mixed["layers"][1][3]  # the K4V4 page padded to the K16V16 one
    assert any("pads each k4v4 page" in m for m in warnings.messages), warnings.messages

