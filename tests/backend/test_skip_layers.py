"""``--kv-cache-dtype-skip-layers`` beside ``--kv-cache-dtype int4_per_token_head``: the layers it names
(indices, or ``sliding_window``) keep K16V16 pages in the same block pool as the policy's pages.

vLLM lays such a pool out two ways. Its CPU platform keeps one block size and pads pages whose sizes do
not divide each other; its GPU platforms first raise the block size until a quantized page covers a
skipped page (``Platform._align_heterogeneous_kv_block_size``) and pad only the skipped sliding-window
pages. The second is run here on CPU by giving the engine the GPU platforms' block-size step."""
from __future__ import annotations

import logging

import pytest

from conftest import error_chain, num_kv_blocks, vllm_engine

pytestmark = pytest.mark.engine  # starts vLLM engines: `pytest -m "not engine"` leaves it out


def _layers(llm) -> dict[int, tuple[str, int, int, int]]:
    """Per layer index: its pages' policy, bytes per (token, KV head), tokens per block and bytes per
    block (the worker's view: the engine's copy of the cache config keeps the block size it began with)."""
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    layers = {}
    for name, layer in runner.compilation_config.static_forward_context.items():
        kv = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
        index = int(name.split("layers.")[1].split(".")[0])
        layers[index] = (layer.impl._policy.name, kv.shape[3] * kv.element_size(), kv.shape[2],
                         kv.stride(0) * kv.element_size())
    return layers


def _run(model, skip, policy="k4v4", kv_cache_dtype="int4_per_token_head", lengths=(40, 20), **engine):
    """Greedy tokens and logprobs (generated, then prompt) per prompt, and the engine's cache facts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=[10 + i % 900 for i in range(n)]) for n in lengths]
    with vllm_engine(model, policy=policy, kv_cache_dtype=kv_cache_dtype, kv_cache_dtype_skip_layers=skip,
                     **engine) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        facts = dict(blocks=num_kv_blocks(llm), layers=_layers(llm))
    facts["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    facts["logprobs"] = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                         + [lp[t].logprob for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
                         for o in outs]
    return facts


def _start_up_error(model, skip, **run) -> list[str]:
    """The messages of the exception chain an engine start-up with ``skip`` raises."""
    with pytest.raises(Exception) as err:
        _run(model, skip, **run)
    return error_chain(err.value)


def _logprob_gap(a: dict, b: dict) -> float:
    return max(abs(x - y) for la, lb in zip(a["logprobs"], b["logprobs"], strict=True)
               for x, y in zip(la, lb, strict=True))


def test_named_layers_keep_unquantized_pages(tiny_model_dir):
    """Tiny Llama (2 layers, 2 KV heads, head_dim 64, fp32): skipping layer 0 gives it K16V16 pages
    (512 B per token and head) beside layer 1's K4V4 (72 B), and the pool's capacity follows; skipping
    both gives the K16V16 engine's output exactly, and skipping one gives neither engine's."""
    skip0 = _run(tiny_model_dir, ["0"])
    skip_all = _run(tiny_model_dir, ["0", "1"])
    k4v4 = _run(tiny_model_dir, [])
    k16v16 = _run(tiny_model_dir, [], policy="k16v16", kv_cache_dtype="auto")

    assert {i: layer[:2] for i, layer in skip0["layers"].items()} == {0: ("k16v16", 512), 1: ("k4v4", 72)}
    assert all(page == block * 2 * row for _, row, block, page in skip0["layers"].values())  # unpadded
    tokens = {name: run["blocks"] * run["layers"][1][2] for name, run in
              (("skip0", skip0), ("k4v4", k4v4), ("k16v16", k16v16))}
    assert tokens["skip0"] / tokens["k4v4"] == pytest.approx((72 + 72) / (512 + 72), rel=1e-3), tokens
    assert tokens["skip0"] / tokens["k16v16"] == pytest.approx((512 + 512) / (512 + 72), rel=1e-3), tokens

    assert skip_all["tokens"] == k16v16["tokens"] and _logprob_gap(skip_all, k16v16) < 1e-5
    assert skip_all["blocks"] == k16v16["blocks"]
    # layer 0 is not quantized (else k4v4's output) and layer 1 is (else k16v16's)
    assert _logprob_gap(skip0, k4v4) > 1e-3 and _logprob_gap(skip0, k16v16) > 1e-3


@pytest.mark.parametrize("skip, kv_cache_dtype, message", [
    (["0"], "auto", "use it with --kv-cache-dtype int4_per_token_head"),  # auto: every layer follows the policy
    (["2"], "int4_per_token_head", "--kv-cache-dtype-skip-layers 2: no such layer; give layer indices 0 to 1"),
    (["00", "first"], "int4_per_token_head", "--kv-cache-dtype-skip-layers 00 first: no such layer"),
])
def test_skip_lists_vllm_would_ignore_stop_start_up(tiny_model_dir, skip, kv_cache_dtype, message):
    """vLLM compares each entry with str(layer index): these would keep nothing unquantized, silently."""
    chain = _start_up_error(tiny_model_dir, skip, kv_cache_dtype=kv_cache_dtype)
    assert any(message in m for m in chain), chain


def test_entries_that_keep_no_layer_of_the_built_model_stop_start_up(tiny_model_dir, tmp_path):
    """Judged on the layers vLLM built: ``sliding_window`` on a model without one, and the index of a
    hybrid model's Mamba layer (in range, so the config alone cannot tell), would keep nothing."""
    from vllm_int4kv.testing.tiny_model import build_tiny_hybrid

    chain = _start_up_error(tiny_model_dir, ["sliding_window"])
    assert any("sliding_window: this model has no sliding-window attention layer" in m for m in chain), chain
    hybrid = build_tiny_hybrid(tmp_path / "hybrid")  # layer 0 Mamba-2, layer 1 attention
    chain = _start_up_error(hybrid, ["0"])
    assert any("0: layer 0 holds no attention KV cache in this model (its attention layers: 1)" in m
               for m in chain), chain


def _attention(name: str, kept: bool, sliding_window=None, shares=None):
    """A stand-in for one of vLLM's built Attention layers: only what the skip check reads."""
    from vllm.model_executor.layers.attention import Attention

    layer = object.__new__(Attention)  # no nn.Module set-up: plain attributes
    object.__setattr__(layer, "__dict__", {"kv_cache_dtype": "auto" if kept else "int4_per_token_head",
                                           "sliding_window": sliding_window,
                                           "kv_sharing_target_layer_name": shares})
    return name, layer


def _config(skip, *layers):
    import types

    return types.SimpleNamespace(
        cache_config=types.SimpleNamespace(cache_dtype="int4_per_token_head", kv_cache_dtype_skip_layers=skip),
        compilation_config=types.SimpleNamespace(static_forward_context=dict(layers)))


def test_a_layer_kept_unlike_the_layer_whose_cache_it_reads_stops_start_up():
    """KV sharing (a layer that reads an earlier layer's pages): naming only one of the two would read
    quantized pages as unquantized ones, or the reverse."""
    from vllm_int4kv.backend import layers

    def check(config, *stages):
        layers.check_kept_layers(config, [layers.layer_facts(c) for c in (config, *stages)])

    target = "model.layers.0.self_attn.attn"
    reader = "model.layers.1.self_attn.attn"
    check(_config(["0", "1"], _attention(target, True), _attention(reader, True, shares=target)))
    only_reader = _config(["1"], _attention(target, False), _attention(reader, True, shares=target))
    with pytest.raises(ValueError, match="layers.1.self_attn.attn reads the KV cache of model.layers.0"):
        check(only_reader)
    # pipeline stages: each sees its own layers, the check their union
    stage0 = _config(["1"], _attention(target, False))
    check(stage0, _config(["1"], _attention(reader, True)))
    with pytest.raises(ValueError, match="layer 1 holds no attention KV cache"):
        check(stage0)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_skipped_sliding_window_layers_on_both_block_layouts(tmp_path, monkeypatch):
    """Tiny Gemma 2 (a 32-token sliding-window layer, then a full one; fp32, head_dim 64, 2 KV heads)
    with ``sliding_window`` skipped, so layer 0 keeps K16V16 pages (1024 B per token) beside K4V4 (144 B).

    CPU layout: one block size (128), the K4V4 page padded to the K16V16 one, which start-up says (so it
    is when the full-attention layer is the one kept, on both layouts: vLLM pads the K4V4 sliding-window
    pages to the K16V16 full-attention ones). GPU
    layout: blocks of 128 tokens for K4V4, the sliding-window layer at 16 tokens padded to that page, no
    K4V4 padding and several times the capacity. Both give the same output; so do the Triton kernels
    (interpreted) over the GPU layout, whose sliding-window pages are strided by the padded page."""
    from vllm.platforms import current_platform
    from vllm.platforms.interface import Platform

    from vllm_int4kv.backend import attention_backend as backend
    from vllm_int4kv.testing.tiny_model import build_tiny_gemma

    model = build_tiny_gemma(tmp_path / "gemma2", version=2, seed=0)
    # vLLM's logging set-up clears the handlers of loggers under "vllm" when an engine starts
    warnings = _Warnings()
    test_logger = logging.getLogger("int4kv-skip-layers-test")
    test_logger.addHandler(warnings)
    monkeypatch.setattr(backend, "logger", test_logger)
    backend._announced.clear()
    cpu = _run(model, ["sliding_window"], lengths=(70, 20))
    cpu_warnings, warnings.messages = warnings.messages, []
    # the full-attention layer kept instead: a K16V16 full layer beside a K4V4 sliding one pads too
    backend._announced.clear()  # each warning is said once per process
    full_kept = _run(model, ["1"], lengths=(70, 20))
    full_kept_warnings, warnings.messages = warnings.messages, []
    monkeypatch.setattr(type(current_platform), "update_block_size_for_backend",
                        classmethod(Platform.update_block_size_for_backend.__func__))
    backend._announced.clear()  # else a padding warning said by the CPU runs would not be said again
    gpu = _run(model, ["sliding_window"], lengths=(70, 20))
    gpu_triton = _run(model, ["sliding_window"], lengths=(70, 20), impl="triton")
    gpu_warnings, warnings.messages = warnings.messages, []
    backend._announced.clear()
    gpu_full_kept = _run(model, ["1"], lengths=(70, 20))

    assert cpu["layers"] == {0: ("k16v16", 512, 128, 128 * 2 * 512),
                             1: ("k4v4", 72, 128, 128 * 2 * 512)}  # K4V4 padded to the K16V16 page
    assert any("pads each k4v4 page of 18432 bytes to 131072" in m for m in cpu_warnings), cpu_warnings
    assert full_kept["layers"] == {0: ("k4v4", 72, 128, 128 * 2 * 512), 1: ("k16v16", 512, 128, 128 * 2 * 512)}
    assert any("pads each k4v4 page of 18432 bytes to 131072" in m for m in full_kept_warnings)
    assert gpu["layers"] == {0: ("k16v16", 512, 16, 128 * 2 * 72),  # 16384 B padded to the K4V4 page
                             1: ("k4v4", 72, 128, 128 * 2 * 72)}
    assert not gpu_warnings, gpu_warnings
    # the GPU layout cannot line these up either: the same padded pages, the same warning
    assert gpu_full_kept["layers"] == full_kept["layers"]
    assert any("pads each k4v4 page of 18432 bytes to 131072" in m for m in warnings.messages)
    assert gpu["blocks"] > 7 * cpu["blocks"]  # 131072 / 18432 = 7.1 times the blocks, of as many tokens
    assert gpu["tokens"] == cpu["tokens"] and _logprob_gap(gpu, cpu) < 1e-5
    # (fp32 rounding of the two implementations' scales moves a logprob by ~1.5e-4 here; wrong strides
    # on the padded pages would read another block's tokens)
    assert gpu_triton["tokens"] == gpu["tokens"] and _logprob_gap(gpu_triton, gpu) < 1e-3
