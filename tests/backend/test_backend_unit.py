"""The backend's pieces without an engine: plugin registration, backend selection, start-up checks,
page sizing, the policy hook, and the layer impl against dense attention over fake-quantized K/V."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest
import torch

from conftest import env_vars
from vllm_int4kv import attention as attention_ops
from vllm_int4kv.policy import current
from vllm_int4kv.kernels.reference import fake_quantize_kv
from vllm_int4kv.policy import KVPolicy, parse_policy
from vllm_int4kv.policy.layer_map import PolicyMap

vllm = pytest.importorskip("vllm")
from vllm.v1.attention.backend import AttentionType  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.selector import AttentionSelectorConfig  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode  # noqa: E402

from vllm_int4kv.backend import attention_backend as backend
from vllm_int4kv import plugin  # noqa: E402


@pytest.fixture
def policy_env():
    """Set VLLM_INT4KV_POLICY for one test; the process-wide resolved policy is reset around it."""
    def use(name: str | None):
        stack.enter_context(env_vars(VLLM_INT4KV_POLICY=name))
        current.reset_policy()

    import contextlib

    with contextlib.ExitStack() as stack:
        yield use
    current.reset_policy()


# -- plugin ---------------------------------------------------------------------------------------
def test_register_is_cheap_idempotent_and_logs_once():
    script = textwrap.dedent("""
        import logging, sys
        from vllm_int4kv import plugin
        lines = []
        class Grab(logging.Handler):
            def emit(self, record): lines.append(record.getMessage())
        logging.getLogger("vllm.int4kv").addHandler(Grab())
        logging.getLogger("vllm.int4kv").setLevel(logging.INFO)
        plugin.register(); plugin.register()
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        wrapper = type(current_platform).__dict__["get_attn_backend_cls"]
        assert not hasattr(wrapper._int4kv_original, "_int4kv_original"), "wrapped twice"
        assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_PATH
        assert "vllm_int4kv.backend.attention_backend" not in sys.modules, "register() imported the backend"
        assert sum("registered" in line for line in lines) == 1, lines
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _selector(**overrides) -> AttentionSelectorConfig:
    fields = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None)
    fields.update(overrides)
    return AttentionSelectorConfig(**fields)


def test_cpu_selection_changes_only_for_custom():
    from vllm.platforms import current_platform

    plugin.register()
    platform_cls = type(current_platform)
    wrapper = platform_cls.__dict__["get_attn_backend_cls"]
    original = wrapper._int4kv_original.__get__(None, platform_cls)
    for choice in (None, AttentionBackendEnum.CPU_ATTN, AttentionBackendEnum.FLASH_ATTN):
        assert current_platform.get_attn_backend_cls(choice, _selector()) == original(choice, _selector())
    assert current_platform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, _selector()) == plugin.BACKEND_PATH


@pytest.mark.parametrize("overrides, message", [
    (dict(head_size=72), "supports head sizes that are a multiple of 16 from 32 to 256; this model has 72"),
    (dict(kv_cache_dtype="fp8"), "--kv-cache-dtype fp8 is not supported by vllm-int4kv"),
    (dict(use_mla=True), "does not support MLA"),
    (dict(attn_type=AttentionType.ENCODER_ONLY), "decoder self-attention only"),
    (dict(block_size=24), "needs a multiple of 16"),
], ids=["head72", "fp8_cache", "mla", "encoder", "block24"])
def test_unsupported_configurations_stop_with_a_clear_message(overrides, message):
    plugin.register()
    with pytest.raises(ValueError, match="--attention-backend CUSTOM cannot run this model") as err:
        plugin._select_custom(_selector(**overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("quantization_config, scheme", [
    ({"quant_method": "compressed-tensors", "kv_cache_scheme": {"num_bits": 8, "type": "float"}},
     "kv_cache_scheme {'num_bits': 8, 'type': 'float'}"),
    ({"quant_method": "modelopt", "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}},
     "kv_cache_quant_algo FP8"),
], ids=["compressed_tensors", "modelopt"])
def test_a_checkpoint_that_asks_for_an_fp8_cache_is_told_what_to_pass(monkeypatch, quantization_config, scheme):
    """vLLM turns --kv-cache-dtype auto into fp8 for these checkpoints: the user typed no fp8, so the
    message names the checkpoint's setting and the flag that keeps our pages."""
    plugin.register()
    monkeypatch.setattr(backend.engine, "_vllm_config", types.SimpleNamespace(model_config=types.SimpleNamespace(
        hf_config=types.SimpleNamespace(quantization_config=quantization_config))))
    for raise_it in (lambda: plugin._select_custom(_selector(kv_cache_dtype="fp8")),
                     lambda: backend.Int4KVImpl(4, 64, 0.125, 2, kv_cache_dtype="fp8")):
        with pytest.raises(ValueError) as err:
            raise_it()
        assert (f"this checkpoint's quantization config asks for a fp8 KV cache ({scheme})" in str(err.value)
                and "pass --kv-cache-dtype int4_per_token_head" in str(err.value)), str(err.value)


@pytest.mark.parametrize("overrides", [dict(head_size=96), dict(head_size=80), dict(has_sink=True),
                                       dict(block_size=192)],
                         ids=["phi3_head96", "phi2_head80", "gpt_oss_sinks", "hybrid_block192"])
def test_supported_configurations_select_the_backend(overrides):
    plugin.register()
    assert plugin._select_custom(_selector(**overrides)) == plugin.BACKEND_PATH
    assert backend.Int4KVBackend.supports_sink() and backend.Int4KVBackend.supports_head_size(96)


def test_sinks_need_one_logit_per_query_head():
    with pytest.raises(ValueError, match=r"one logit per query head \(4\), got \(2,\)"):
        backend.Int4KVImpl(4, 64, 0.125, 2, sinks=torch.zeros(2))


def test_alibi_slopes_become_one_fp32_slope_per_query_head():
    impl = backend.Int4KVImpl(4, 64, 0.125, 2, alibi_slopes=[0.5, 0.25, 0.125, 0.0625])
    assert impl.alibi_slopes.dtype == torch.float32 and impl.alibi_slopes.tolist() == [0.5, 0.25, 0.125, 0.0625]
    with pytest.raises(ValueError, match=r"one slope per query head \(4\), got 2"):
        backend.Int4KVImpl(4, 64, 0.125, 2, alibi_slopes=[0.5] * 2)


# -- page sizing and the policy -------------------------------------------------------------------
def _spec(dtype=torch.bfloat16, head_size=128, mode=KVQuantMode.NONE):
    return FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=head_size, dtype=dtype, kv_quant_mode=mode)


@pytest.mark.parametrize("policy, slot", [("k4v4", 136), ("k8v4", 200), ("k16v16", 512), ("k4v4-g32-rot", 148)])
def test_customize_spec_allocates_policy_sized_pages(policy_env, policy, slot):
    policy_env(policy)
    spec = backend.Int4KVBackend.customize_spec(_spec())
    assert spec.state_content_bytes == slot
    assert spec.page_size_bytes == 2 * 128 * slot
    assert _spec().page_size_bytes / spec.page_size_bytes == pytest.approx(512 / slot)
    assert backend.Int4KVBackend.customize_spec(spec) is spec  # applied once


def test_int4_cache_dtype_needs_a_quantized_policy(policy_env, monkeypatch):
    monkeypatch.setattr(backend.engine, "_vllm_config", types.SimpleNamespace(
        model_config=types.SimpleNamespace(dtype=torch.float16)))
    policy_env("k4v4")
    spec = backend.Int4KVBackend.customize_spec(_spec(torch.uint8, mode=KVQuantMode.INT4_PER_TOKEN_HEAD))
    assert spec.state_content_bytes == 136
    policy_env("k16v16")
    with pytest.raises(ValueError, match="int4_per_token_head asks for a quantized cache"):
        backend.Int4KVBackend.customize_spec(_spec(torch.uint8, mode=KVQuantMode.INT4_PER_TOKEN_HEAD))


def test_auto_policy_is_resolved_once_with_the_model_config(policy_env, monkeypatch):
    calls = []

    from vllm_int4kv.policy import decide

    def fake_decide(request, target, **progress):
        calls.append((request, target))
        return types.SimpleNamespace(policy=PolicyMap.uniform(KVPolicy(8, 4)), summary="auto: k8v4 within budget",
                                     source="calibration")

    monkeypatch.setattr(decide, "decide", fake_decide)
    policy_env("auto")
    monkeypatch.setattr(backend.engine, "_vllm_config", types.SimpleNamespace(model_config=types.SimpleNamespace(
        model="/models/x", revision=None, dtype=torch.bfloat16, trust_remote_code=False)))
    assert backend.engine.engine_policy().single == KVPolicy(8, 4)
    assert backend.engine.engine_policy().single == KVPolicy(8, 4)
    assert calls == [("auto", decide.ModelTarget("/models/x", None, torch.bfloat16, False))]
    assert "auto: k8v4 within budget" in current.policy_source()


# -- the layer impl against dense attention ---------------------------------------------------------
def _dense(query, keys, values, q_lens, scale, window, softcap):
    """Causal attention per sequence from the full K/V ``[L, Hkv, D]`` of each sequence (fp64)."""
    outs = []
    start = 0
    for k, v, q_len in zip(keys, values, q_lens):
        q = query[start: start + q_len].double()
        start += q_len
        group = q.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(group, 1)
        v = v.double().repeat_interleave(group, 1)
        s = torch.einsum("thd,shd->hts", q, k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        q_pos = torch.arange(len(k) - q_len, len(k))[:, None]
        k_pos = torch.arange(len(k))[None, :]
        visible = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
        outs.append(torch.einsum("hts,shd->thd", s.masked_fill(~visible, -torch.inf).softmax(-1), v))
    return torch.cat(outs)


def _paged_case(layout_slot_bytes, block_size=16, num_blocks=40, seq_lens=(37, 5, 64), q_lens=(37, 1, 9)):
    """vLLM-shaped inputs: a poisoned fp32 cache view, a shuffled block table, slots of every token."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.full((num_blocks, 2, block_size, layout_slot_bytes), 0xFF, dtype=torch.uint8)
    kv_cache = raw.view(torch.float32)  # what a layer gets for an fp32 model: [B, H, N, C / 4]
    perm = torch.randperm(num_blocks, generator=gen)
    blocks_per_seq = -(-max(seq_lens) // block_size)
    block_table = perm[: len(seq_lens) * blocks_per_seq].view(len(seq_lens), blocks_per_seq).int()
    keys = [torch.randn(n, 2, 64, generator=gen) for n in seq_lens]
    values = [torch.randn(n, 2, 64, generator=gen) for n in seq_lens]
    slots = [block_table[s, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
             for s, n in enumerate(seq_lens)]
    query = torch.randn(sum(q_lens), 4, 64, generator=gen)
    meta = attention_ops.Int4KVMetadata(
        num_actual_tokens=sum(q_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=block_table,
        slot_mapping=torch.cat(slots))
    return kv_cache, keys, values, query, meta, q_lens


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("policy", ["k16v16", "k8v4", "k4v4-rot"])
@pytest.mark.parametrize("window, softcap", [(None, None), (20, 5.0)], ids=["plain", "window_softcap"])
def test_impl_matches_dense_attention_over_what_the_cache_stores(policy_env, policy, impl, window, softcap):
    if impl == "triton" and (policy, window) not in (("k4v4-rot", None), ("k8v4", 20)):
        pytest.skip("the interpreted Triton path is slow: two quantized cases cover it")
    policy_env(policy)
    p = parse_policy(policy)
    layout = p.layout(64, 16, elem_bytes=4)
    kv_cache, keys, values, query, meta, q_lens = _paged_case(layout.slot_bytes)
    with env_vars(VLLM_INT4KV_IMPL=impl):
        layer = backend.Int4KVImpl(4, 64, 0.125, 2, None, window, "auto", softcap)
    assert layer.impl == impl
    layer.do_kv_cache_update(None, torch.cat(keys), torch.cat(values), kv_cache, meta.slot_mapping)
    out = torch.full_like(query, float("nan"))
    layer.forward(None, query, None, None, kv_cache, meta, out)
    stored = [fake_quantize_kv(k, v, p.k_bits, p.v_bits, layout.k_group, layout.v_group, rotated=p.rotate)
              for k, v in zip(keys, values)]
    expected = _dense(query, [k for k, _ in stored], [v for _, v in stored], q_lens, 0.125, window, softcap)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    if p.quantized:  # and the quantized pages really differ from full precision
        full = _dense(query, keys, values, q_lens, 0.125, window, softcap)
        assert (out.double() - full).abs().max() > 1e-3


def test_profiling_run_without_metadata_returns_zeros(policy_env):
    policy_env("k4v4")
    layer = backend.Int4KVImpl(4, 64, 0.125, 2)
    out = torch.full((3, 4, 64), float("nan"))
    assert layer.forward(None, torch.randn(3, 4, 64), None, None, torch.empty(0), None, out) is out
    assert out.eq(0).all()
