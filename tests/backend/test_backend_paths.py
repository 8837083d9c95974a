"""Engine-level checks of single properties: KV capacity at equal memory, a refused configuration, the
Triton kernels (interpreted on CPU) serving the same tokens as the torch implementation, and the model
families whose attention differs: sliding windows, a 96-channel head, gpt-oss's sinks, ALiBi (Bloom,
Falcon), Llama 4's chunked local attention, Gemma 2 and 3, Mamba and Gated DeltaNet hybrids, ngram
speculative decoding (multi-token verification steps), and a decoder run as an embedding model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import env_vars, error_chain, num_kv_blocks, vllm_engine

pytestmark = pytest.mark.engine  # starts vLLM engines: `pytest -m "not engine"` leaves it out


def test_k4v4_gives_3_76x_the_blocks_of_k16v16_in_bf16(tiny_model_d128_dir):
    # head_dim 128, bf16: K16V16 pages are 512 B per token and KV head, K4V4 pages 136 B
    blocks = {}
    for policy in ("k16v16", "k4v4"):
        with vllm_engine(tiny_model_d128_dir, policy=policy, dtype="bfloat16") as llm:
            blocks[policy] = num_kv_blocks(llm)
    with vllm_engine(tiny_model_d128_dir, backend=None, policy=None, dtype="bfloat16") as llm:
        blocks["cpu_attn"] = num_kv_blocks(llm)
    print(blocks)
    assert blocks["k16v16"] == blocks["cpu_attn"]
    assert blocks["k4v4"] / blocks["k16v16"] == pytest.approx(512 / 136, rel=1e-3)


def test_unsupported_kv_cache_dtype_stops_startup_with_a_clear_message(tiny_model_dir):
    with pytest.raises(Exception) as err:
        with vllm_engine(tiny_model_dir, policy="k4v4", kv_cache_dtype="fp8"):
            pass
    chain = error_chain(err.value)
    assert any("--kv-cache-dtype fp8 is not supported by vllm-int4kv" in m for m in chain), chain


def _serve(model, prompts, runs, prompt_logprobs=True, max_tokens=4, **engine):
    """For each run ``(name, backend, policy, impl)``: per prompt, the greedy tokens and their logprobs
    (then the prompt's, with ``prompt_logprobs``). Also each run's block size."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True,
                            prompt_logprobs=1 if prompt_logprobs else None)
    results, block_sizes = {}, {}
    for name, backend, policy, impl in runs:
        with vllm_engine(model, backend=backend, policy=policy, impl=impl, **engine) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            block_sizes[name] = llm.llm_engine.vllm_config.cache_config.block_size
        results[name] = []
        for o in outs:
            logprobs = [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
            if prompt_logprobs:
                logprobs += [lp[t].logprob for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
            results[name].append((list(o.outputs[0].token_ids), logprobs))
    return results, block_sizes


def _assert_same(results, ours: str, theirs: str, tolerance: float = 1e-4):
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results[ours], results[theirs], strict=True):
        assert tokens == ref_tokens, (ours, theirs)
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) < tolerance, (ours, theirs)


def _prompts(*lengths):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[10 + i % 900 for i in range(n)]) for n in lengths]


VLLM_CPU_ATTN = ("cpu_attn", None, None, None)


def _serve_four_ways(model, policy: str = "k4v4", lengths=(70, 20), **engine):
    """The four runs of a model-family test and their two comparisons: K16V16 pages (torch path) give
    vLLM's own CPU attention's tokens and logprobs, and ``policy`` over the Triton kernels (interpreted)
    gives the torch path's. Returns ``_serve``'s results and block sizes."""
    results, block_sizes = _serve(model, _prompts(*lengths), [
        VLLM_CPU_ATTN, ("k16v16", "CUSTOM", "k16v16", "torch"),
        ("torch", "CUSTOM", policy, "torch"), ("triton", "CUSTOM", policy, "triton")],
        **dict(dict(block_size=32, max_num_batched_tokens=64), **engine))
    _assert_same(results, "k16v16", "cpu_attn")
    _assert_same(results, "triton", "torch")
    return results, block_sizes
SPEC_ENGINE = Path(__file__).with_name("spec_engine.py")


@pytest.mark.slow
def test_triton_kernels_serve_the_same_tokens_as_torch(tiny_model_dir):
    """The whole engine on the Triton write and attention kernels (interpreted here) vs torch."""
    results, _ = _serve(tiny_model_dir, _prompts(37, 20), [("torch", "CUSTOM", "k4v4", "torch"),
                                                          ("triton", "CUSTOM", "k4v4", "triton")],
                        prompt_logprobs=False, block_size=16, max_num_batched_tokens=64)
    _assert_same(results, "triton", "torch")


def test_sliding_window_model_matches_vllm_cpu_attention(tmp_path):
    """Llama with a 48-token sliding window on layer 0 (vLLM's hybrid KV manager) and q/k/v biases."""
    import torch
    from vllm.inputs import TokensPrompt

    from vllm_int4kv.testing.tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "sw-llama", seed=0, attention_bias=True, sliding_window=48,
                             layer_types=["sliding_attention", "full_attention"])
    gen = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(6, 1024, (n,), generator=gen).tolist())
               for n in (150, 70, 33)]
    results, _ = _serve(model, prompts, [VLLM_CPU_ATTN, ("k16v16", "CUSTOM", "k16v16", "torch")],
                        max_tokens=12, block_size=32, max_num_batched_tokens=64)
    _assert_same(results, "k16v16", "cpu_attn")


def test_int4_per_token_head_cache_dtype_selects_the_same_pages(tiny_model_dir):
    """``--kv-cache-dtype int4_per_token_head`` (uint8 spec) and ``auto`` give the same K4V4 pages."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, ignore_eos=True)
    seen = {}
    for kv_cache_dtype in ("auto", "int4_per_token_head"):
        with vllm_engine(tiny_model_dir, policy="k4v4", kv_cache_dtype=kv_cache_dtype) as llm:
            out = llm.generate(["The licensee may copy"], params, use_tqdm=False)[0].outputs[0]
            seen[kv_cache_dtype] = (num_kv_blocks(llm), list(out.token_ids),
                                    [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)])
    assert seen["auto"] == seen["int4_per_token_head"]


@pytest.mark.slow
def test_head_size_96_is_served(tmp_path):
    """Phi-3's head size, 96 (not a power of two: the kernels span 128 channels and mask the rest).

    K16V16 gives vLLM's own CPU attention's tokens; the Triton kernels (interpreted) serve the torch
    path's tokens with 32-channel key groups and the block-diagonal rotation (three 32-channel blocks).
    """
    from vllm_int4kv.testing.tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "d96-llama", seed=0, head_dim=96)
    _serve_four_ways(model, "k4v4-g32-rot", (37, 20), prompt_logprobs=False)


@pytest.mark.slow
def test_gpt_oss_attention_sinks_are_served(tmp_path):
    """gpt-oss: a sink logit per query head, 32-token sliding windows on every other layer, experts.

    K16V16 gives vLLM's own CPU attention's tokens and logprobs, prompts included (its CPU kernel
    applies the sinks natively); the Triton kernels (interpreted) serve the torch path's over K4V4 pages.
    """
    from vllm_int4kv.testing.tiny_model import build_tiny_gpt_oss

    _serve_four_ways(build_tiny_gpt_oss(tmp_path / "tiny-gpt-oss", seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bloom", "falcon"])
def test_alibi_models_are_served(tmp_path, family):
    """ALiBi position biases instead of RoPE: Bloom (slopes 1/4 to 1/256, 4 KV heads) and Falcon's ALiBi
    variant (one KV head, slopes scaled by 1/sqrt(head_dim)).

    K16V16 gives vLLM's own CPU attention's tokens and logprobs, prompts included (without the biases,
    Bloom's differ by ~0.8); the Triton kernels (interpreted) serve the torch path's over K4V4 pages.
    transformers' code for both bypasses AttentionInterface, so ``auto`` stops start-up with a message.
    """
    from vllm_int4kv.testing import tiny_model

    model = getattr(tiny_model, f"build_tiny_{family}")(tmp_path / family, seed=0)
    _serve_four_ways(model)
    with pytest.raises(Exception) as err:
        with env_vars(VLLM_INT4KV_CACHE_DIR=str(tmp_path / "decisions")), vllm_engine(model, policy="auto"):
            pass
    chain = error_chain(err.value)
    assert any("cannot calibrate" in m and "fixed policy" in m for m in chain), chain


@pytest.mark.slow
def test_llama4_chunked_local_attention_is_served(tmp_path):
    """Llama 4: chunked local attention (32-token chunks: vLLM cuts each sequence into virtual sequences,
    one per chunk, before our metadata builder sees them), a NoPE layer, experts.

    K16V16 gives vLLM's own CPU attention's tokens and logprobs (the 70-token prompt spans three chunks;
    with 4096-token chunks its tokens differ); the Triton kernels (interpreted) serve the torch path's.
    """
    from vllm_int4kv.testing.tiny_model import build_tiny_llama4

    results, _ = _serve_four_ways(build_tiny_llama4(tmp_path / "tiny-llama4", seed=0))
    unchunked = build_tiny_llama4(tmp_path / "unchunked", seed=0, attention_chunk_size=4096)
    plain, _ = _serve(unchunked, _prompts(70), [VLLM_CPU_ATTN], block_size=32, max_num_batched_tokens=64)
    assert plain["cpu_attn"][0][0] != results["cpu_attn"][0][0]  # the chunks did change the long prompt


@pytest.mark.slow
@pytest.mark.parametrize("version", [2, 3])
def test_gemma_is_served(tmp_path, version):
    """Gemma 2 (attention logits soft-capped at 5) and Gemma 3 (q/k norms, local and global RoPE), each
    with a 32-token sliding-window layer then a full one: K16V16 gives vLLM's own CPU attention's tokens
    and logprobs, prompts included; the Triton kernels (interpreted) serve the torch path's over K4V4."""
    from vllm_int4kv.testing.tiny_model import build_tiny_gemma

    _serve_four_ways(build_tiny_gemma(tmp_path / f"gemma{version}", version, seed=0))


@pytest.mark.slow
def test_hybrid_mamba_model_is_served(tmp_path):
    """A Granite-4-style hybrid: vLLM sizes attention blocks so one covers a Mamba-2 state page, which
    need not be a power of two (K8V4 pages here: 192 tokens per block). K16V16 gives vLLM's own CPU
    attention's tokens and logprobs; the Triton kernels (interpreted) serve the torch path's over K8V4."""
    from vllm_int4kv.testing.tiny_model import build_tiny_hybrid

    _, block_sizes = _serve_four_ways(build_tiny_hybrid(tmp_path / "tiny-hybrid", seed=0), "k8v4", (250, 20))
    assert block_sizes["torch"] == block_sizes["triton"] == 192, block_sizes  # not a power of two


@pytest.mark.slow
def test_gated_deltanet_hybrid_is_served(tmp_path):
    """A tiny Qwen3-Next (Gated DeltaNet beside attention), bf16 as vLLM's CPU kernel for it requires:
    blocks of 544 tokens even over K16V16 pages (vLLM refused those for our backend while it took powers
    of two only). K16V16 gives vLLM's CPU attention's tokens and logprobs; K8V4 serves with its own block
    size and the same first token. (The Triton path is not run: the interpreter gets bf16 wrong.)

    The logprob tolerance is bf16's: vLLM's CPU attention rounds in bf16 in an order that depends on the
    machine. Against our fp32 arithmetic it differed by < 1e-3 on AMD EPYC VMs and by up to 0.016 (median
    0.003) on an Intel Xeon with AMX; K8V4 pages move the same logprobs by 0.1-0.2, which 0.03 still sees."""
    from vllm_int4kv.testing.tiny_model import build_tiny_qwen3_next

    model = build_tiny_qwen3_next(tmp_path / "tiny-qwen3-next", seed=0)
    results, block_sizes = _serve(model, _prompts(70, 20), [
        VLLM_CPU_ATTN, ("k16v16", "CUSTOM", "k16v16", "torch"), ("k8v4", "CUSTOM", "k8v4", "torch")],
        block_size=32, max_num_batched_tokens=64, dtype="bfloat16")
    assert block_sizes["k16v16"] % 16 == 0 and block_sizes["k16v16"] & (block_sizes["k16v16"] - 1), block_sizes
    _assert_same(results, "k16v16", "cpu_attn", tolerance=0.03)
    assert [tokens[0] for tokens, _ in results["k8v4"]] == [tokens[0] for tokens, _ in results["k16v16"]]
    with pytest.raises(AssertionError):  # the tolerance can tell a quantized cache from vLLM's
        _assert_same(results, "k8v4", "cpu_attn", tolerance=0.03)


def _spec_engine(model, backend, policy, impl, speculate: bool) -> dict:
    """One engine of ``spec_engine.py`` in a fresh process (its docstring says why)."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    for name, value in (("VLLM_INT4KV_POLICY", policy), ("VLLM_INT4KV_IMPL", impl)):
        if value:
            env[name] = value
    proc = subprocess.run([sys.executable, str(SPEC_ENGINE), str(model),
                           backend or "none", "1" if speculate else "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_ngram_speculative_decoding(tiny_model_dir):
    """Speculative decoding (ngram): verification steps attend with 1 + 3 query tokens per sequence.

    With speculation, K16V16 gives vLLM's own CPU attention's tokens and logprobs, and the Triton kernels
    over K4V4 pages give the torch path's. Without speculation the tokens are the same (greedy); the
    logprobs only close: a verification step projects 4 tokens at once, which moves K/V by fp32 rounding,
    and now and then a 4-bit code across a rounding boundary. Drafts were accepted, so multi-token
    verification steps ran.
    """
    runs = {"cpu_attn": (None, None, None, True), "k16v16": ("CUSTOM", "k16v16", "torch", True),
            "plain": ("CUSTOM", "k4v4", "torch", False), "torch": ("CUSTOM", "k4v4", "torch", True),
            "triton": ("CUSTOM", "k4v4", "triton", True)}
    done = {name: _spec_engine(tiny_model_dir, *run) for name, run in runs.items()}
    assert all(done[name]["accepted"] > 0 for name in ("cpu_attn", "k16v16", "torch", "triton")), done
    results = {name: [(o["tokens"], o["logprobs"]) for o in r["outputs"]] for name, r in done.items()}
    _assert_same(results, "k16v16", "cpu_attn")
    # (the two sum in a different order, tiles with an online softmax against whole rows: ~1e-4 on this
    # tiny model's logprobs, through its layers)
    _assert_same(results, "triton", "torch", tolerance=3e-4)
    _assert_same(results, "triton", "plain", tolerance=1e-3)


def test_decoder_embedding_model_is_served(tiny_model_dir):
    """``runner="pooling"`` on a decoder (as Qwen3-Embedding runs): the prompt is prefilled through our
    cache and pooled. K16V16 gives vLLM's own CPU attention's embeddings; K4V4 prefill reads its
    quantized pages, so its embeddings move a little (cosine 0.98 or more on this tiny model)."""
    import torch

    prompts = ["The licensee may copy the software", "hello world " * 40]
    embeddings = {}
    for name, backend, policy in (("cpu_attn", None, None), ("k16v16", "CUSTOM", "k16v16"),
                                  ("k4v4", "CUSTOM", "k4v4")):
        with vllm_engine(tiny_model_dir, backend=backend, policy=policy, runner="pooling") as llm:
            embeddings[name] = torch.stack([torch.tensor(o.outputs.embedding)
                                            for o in llm.embed(prompts, use_tqdm=False)])
    assert (embeddings["k16v16"] - embeddings["cpu_attn"]).abs().max() < 1e-5
    cosine = torch.nn.functional.cosine_similarity(embeddings["k4v4"], embeddings["cpu_attn"], dim=-1)
    assert (embeddings["k4v4"] - embeddings["cpu_attn"]).abs().max() > 1e-3 and cosine.min() > 0.98, cosine
