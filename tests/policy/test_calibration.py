"""Calibration: the ratio classifier and the quality budget decide from measurements, not names.

The test models are tiny random Llamas (head_dim 64) shaped so their numbers resemble a trained model's:

* ``lm_head`` x8: random weights give near-uniform next-token distributions (entropy ~ ln V), where
  any KL is tiny; x8 brings the mean entropy to ~1 nat, a peaked distribution like a trained LM's.
* ``o_proj`` x0.007: in a random 2-layer model the attention output reaches the logits almost
  unattenuated, so 4-bit *values* alone cost ~0.02 nats, twenty times the budget; scaled down, the
  value floor is ~0.0015 nats (K8V4), as in trained models, leaving room under the budget for keys.
* ``q_proj`` x4: random attention is nearly uniform and then key errors cannot matter; sharper
  attention makes the keys count.

Key fragility is then built in deliberately, two ways:

* outlier channels: key channel ``c`` (both halves of its RoPE pair) times ``s`` and the matching query
  channels divided by ``s``. ``q.k`` is unchanged, so full precision computes the same function, but
  one channel now sets every token's min/max range and the other channels get coarse steps.
* a large constant key bias on channels spread over every 16-channel group (the Qwen2 mechanism): an
  offset that rotation cannot remove and channel groups cannot isolate.
"""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_int4kv.policy import calibration
from vllm_int4kv.policy.calibration import Settings, calibrate
from vllm_int4kv.policy.session import Session
from vllm_int4kv.policy import KVPolicy

VOCAB = 1024
HEAD_DIM = 64
BIAS_CHANNELS = (3, 7, 11, 19, 23, 27)  # RoPE pairs (c, c + 32) land in all four 16-channel groups


def scale_key_channels(model, channels, factor, bias=None):
    """Keys of ``channels`` x ``factor`` (optionally plus a constant ``bias``), queries / ``factor``."""
    head_dim = model.config.head_dim
    for layer in model.model.layers:
        attn = layer.self_attn
        kv_heads = model.config.num_key_value_heads
        group = model.config.num_attention_heads // kv_heads
        for head in range(kv_heads):
            for channel in channels:
                for c in (channel, channel + head_dim // 2):  # both halves of a RoPE pair
                    attn.k_proj.weight.data[head * head_dim + c] *= factor
                    if bias is not None:
                        attn.k_proj.bias.data[head * head_dim + c] = bias
                    for q_head in range(head * group, (head + 1) * group):
                        attn.q_proj.weight.data[q_head * head_dim + c] /= factor


def tiny_model(outlier_scale=1.0, outlier_channels=(3,), key_bias=None, seed=0, head_dim=HEAD_DIM):
    """An fp32 tiny Llama shaped as the module docstring explains."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         initializer_range=0.08, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         attention_bias=key_bias is not None)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    torch.random.set_rng_state(state)
    with torch.no_grad():
        model.lm_head.weight *= 8.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight *= 0.007
            layer.self_attn.q_proj.weight *= 4.0
            if key_bias is not None:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.zero_()
    if key_bias is not None:
        scale_key_channels(model, BIAS_CHANNELS, 1.0, bias=key_bias)
    elif outlier_scale != 1.0:
        scale_key_channels(model, outlier_channels, outlier_scale)
    return model


def token_ids(n=2, length=128, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (length,), generator=gen).tolist() for _ in range(n)]


def run(model, budget=calibration.DEFAULT_KL_BUDGET, margin=1.0, **kw):
    """The uniform stage alone (the per-layer search has tests of its own: test_search.py). Margin 1: the
    tiny models below are shaped around a target of 0.01 nats."""
    with Session(model, token_ids()) as session:
        return calibrate(session, model.config.head_dim,
                         Settings(budget=budget, margin=margin, per_layer=False, **kw),
                         measure_all=True)


def show(label, result):
    kls = ", ".join(f"{m.name} {m.kl:.4f}" for m in result.measurements)
    print(f"\n{label}: ratio {result.ratio:.2f} -> {result.uniform.name}; {kls}")


@pytest.fixture(scope="module")
def results():
    """Every model measured once (all candidates) and shared by the tests below."""
    return {
        "ordinary": run(tiny_model()),
        "offset": run(tiny_model(key_bias=20.0)),
        "outlier10": run(tiny_model(outlier_scale=10.0)),
        "outlier14": run(tiny_model(outlier_scale=14.0)),
    }


# -- the measurement itself --------------------------------------------------------------------------
def test_reference_matches_plain_sdpa_and_unquantized_is_exact():
    model = tiny_model()
    ids = token_ids(n=1, length=64)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        plain = model(torch.tensor(ids)).logits[0].log_softmax(-1)
    with Session(model, ids) as session:
        torch.testing.assert_close(session.reference[0], plain, rtol=0, atol=1e-5)
        exact = session.measure("k16v16", (16, 16, None, False))
        assert exact.kl == 0.0 and exact.top1 == 1.0 and exact.dnll == 0.0


def test_attention_sinks_are_calibrated_with_them(tmp_path):
    """gpt-oss passes its sinks as ``s_aux``, which SDPA would drop silently: the calibration pass must
    equal the model's own eager attention (sinks, sliding windows) and still quantize the cache."""
    from transformers import GptOssForCausalLM

    from vllm_int4kv.testing.tiny_model import build_tiny_gpt_oss

    path = build_tiny_gpt_oss(tmp_path / "tiny-gpt-oss")
    model = GptOssForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    ids = token_ids(n=1, length=80)  # past the 32-token window of the sliding layer
    with torch.no_grad():
        eager = model(torch.tensor(ids)).logits[0].log_softmax(-1)
        model.model.layers[0].self_attn.sinks.zero_()  # (a model without its sinks, for contrast)
        without = model(torch.tensor(ids)).logits[0].log_softmax(-1)
        model.model.layers[0].self_attn.sinks.copy_(
            GptOssForCausalLM.from_pretrained(path, dtype=torch.float32).model.layers[0].self_attn.sinks)
    assert (eager - without).abs().max() > 1e-3
    with Session(model, ids) as session:
        torch.testing.assert_close(session.reference[0], eager, rtol=0, atol=1e-5)
        assert session.measure("k16v16", (16, 16, None, False)).kl == 0.0
        assert session.measure("k4v4", (4, 4, None, False)).kl > 0.0


def test_soft_capped_attention_is_calibrated_with_its_cap(tmp_path):
    """Gemma 2 passes its attention soft-cap as ``softcap``, which SDPA would drop silently (it did: the
    calibration measured another model, ~0.4 nats off in log-probability here): the calibration pass must
    equal the model's own eager attention."""
    from transformers import Gemma2ForCausalLM

    from vllm_int4kv.testing.tiny_model import build_tiny_gemma

    path = build_tiny_gemma(tmp_path / "tiny-gemma2", 2)
    ids = token_ids(n=1, length=80)
    # the same weights without the cap (newer transformers refuse SDPA for Gemma 2 rather than drop it)
    eager, uncapped = (Gemma2ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                         **cap).eval()
                       for cap in ({}, {"attn_logit_softcapping": None}))
    with torch.no_grad():
        expected = eager(torch.tensor(ids)).logits[0].log_softmax(-1)
        assert (expected - uncapped(torch.tensor(ids)).logits[0].log_softmax(-1)).abs().max() > 0.05
    with Session(eager, ids) as session:
        torch.testing.assert_close(session.reference[0], expected, rtol=0, atol=1e-5)
        assert session.measure("k4v4", (4, 4, None, False)).kl > 0.0


@pytest.mark.parametrize("family", ["llama", "llama_d96", "gemma3", "hybrid", "qwen3_next"])
def test_other_families_calibrate_like_their_eager_attention(tmp_path, family):
    """Llama (with a 96-channel head too), Gemma 3 (q/k norms, local and global RoPE, a sliding window), a
    Granite-4-style Mamba hybrid and Qwen3-Next (Gated DeltaNet): the calibration pass equals the model's
    own eager attention (its attention layers route through AttentionInterface) and quantizes K/V."""
    from transformers import AutoModelForCausalLM

    from vllm_int4kv.testing import tiny_model

    build = {"llama": tiny_model.build_tiny_llama,
             "llama_d96": lambda path: tiny_model.build_tiny_llama(path, head_dim=96),
             "gemma3": lambda path: tiny_model.build_tiny_gemma(path, 3),
             "hybrid": tiny_model.build_tiny_hybrid, "qwen3_next": tiny_model.build_tiny_qwen3_next}[family]
    model = AutoModelForCausalLM.from_pretrained(build(tmp_path / family), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    ids = token_ids(n=1, length=80)
    with torch.no_grad():
        eager = model(torch.tensor(ids)).logits[0].log_softmax(-1)
    with Session(model, ids) as session:
        torch.testing.assert_close(session.reference[0], eager, rtol=0, atol=1e-4)
        assert session.measure("k4v4", (4, 4, None, False)).kl > 0.0


def test_chunked_local_attention_is_calibrated_with_its_chunks(tmp_path):
    """Llama 4's chunked layers take their mask from transformers' mask interface, where the calibration
    registers SDPA's: its full-precision pass must equal eager attention over 32-token chunks."""
    from transformers import Llama4ForCausalLM

    from vllm_int4kv.testing.tiny_model import build_tiny_llama4

    ids = token_ids(n=1, length=100)
    logprobs = {}
    for chunk in (32, 4096):
        path = build_tiny_llama4(tmp_path / f"chunk{chunk}", seed=0, attention_chunk_size=chunk)
        eager = Llama4ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
        with torch.no_grad():
            logprobs[chunk] = eager.eval()(torch.tensor(ids)).logits[0].log_softmax(-1)
    assert (logprobs[32] - logprobs[4096]).abs().max() > 0.1  # the chunks matter at 100 tokens
    model = Llama4ForCausalLM.from_pretrained(tmp_path / "chunk32", dtype=torch.float32).eval()
    with Session(model, ids) as session:
        torch.testing.assert_close(session.reference[0], logprobs[32], rtol=0, atol=1e-4)
        assert session.measure("k4v4", (4, 4, None, False)).kl > 0.0


def test_fake_quant_is_applied_and_kl_grows_as_bits_shrink():
    with Session(tiny_model(), token_ids(n=1)) as session:
        kls = [session.measure(f"k{b}v8", (b, 8, None, False)).kl for b in (8, 6, 4)]
        v4 = session.measure("k16v4", (16, 4, None, False)).kl
    assert 0 < kls[0] < kls[1] < kls[2]
    assert v4 > kls[0]


def test_session_leaves_nothing_behind():
    session = Session(tiny_model(), token_ids(n=1, length=16))
    with session:
        pass
    assert session.model is None and session.reference is None


# -- (1) the ratio classifier -----------------------------------------------------------------------
def test_ratio_flags_offset_keys_and_they_get_more_key_bits(results):
    ordinary, offset = results["ordinary"], results["offset"]
    show("ordinary", ordinary)
    show("key offset (Qwen2-like)", offset)
    assert ordinary.ratio < ordinary.settings.tau and not ordinary.fragile
    assert offset.ratio > offset.settings.tau and offset.fragile
    assert ordinary.uniform.k_bits == 4
    assert offset.uniform.k_bits >= 8
    ev = offset.evidence()
    assert ev["keys"] == "fragile" and ev["err_int6"] / ev["err_int8"] == pytest.approx(ev["ratio"])
    assert ev["err_k4v4"] > ev["budget"]


# -- (2) the budget catches what the ratio misses -------------------------------------------------
def test_ratio_below_tau_but_k4v4_over_budget_picks_a_costlier_layout(results):
    r = results["outlier10"]
    show("outlier x10", r)
    k4 = r.measured("k4v4")
    assert r.ratio < r.settings.tau  # the classifier alone would say "tolerant"
    assert k4.kl > r.settings.target
    assert r.uniform != KVPolicy(4, 4)
    assert r.uniform.slot_bytes(HEAD_DIM) > k4.bytes_per_token
    assert r.measured(r.uniform.name).kl <= r.settings.target


def test_k4v4_within_budget_is_chosen(results):
    r = results["ordinary"]
    assert r.measured("k4v4").kl <= r.settings.target
    assert r.uniform == KVPolicy(4, 4) and r.policy.single == r.uniform


def test_cheapest_within_budget_and_stops_at_first(results):
    for r in results.values():
        size = r.uniform.slot_bytes(HEAD_DIM)
        for m in r.measurements:
            if m.bytes_per_token is not None and m.bytes_per_token < size:
                assert m.kl > r.settings.target, (m.name, r.uniform.name)
    # without measure_all the search stops at the decision (plus the two ratio passes)
    with Session(tiny_model(), token_ids()) as session:
        quick = calibrate(session, HEAD_DIM, Settings())
    assert quick.uniform == KVPolicy(4, 4) and quick.search is None  # nothing is cheaper
    assert [m.name for m in quick.measurements] == ["k8v4", "k6v4", "k4v4"]


def test_the_calibration_prompts_are_held_to_the_budget_times_the_margin(results):
    """A layout whose KL on the prompts lies between budget x margin and the budget is not chosen: the budget
    is for text unlike the prompts, which pays more (docs/policy.md); margin 1 takes it."""
    k4 = results["ordinary"].measured("k4v4")
    budget = k4.kl / 0.75  # k4v4 at 0.75 x budget
    lenient = run(tiny_model(), budget=budget, margin=1.0)
    default = run(tiny_model(), budget=budget, margin=calibration.DEFAULT_MARGIN)
    assert default.settings.margin == calibration.DEFAULT_MARGIN == 0.5
    assert lenient.uniform == KVPolicy(4, 4) and lenient.measured("k4v4").kl == pytest.approx(k4.kl)
    assert default.uniform != KVPolicy(4, 4) and default.measured(default.uniform.name).kl <= budget / 2
    evidence = default.evidence()
    assert (evidence["budget"], evidence["margin"], evidence["target"]) == (budget, 0.5, budget / 2)
    with pytest.raises(ValueError, match="0 < margin <= 1"):
        Settings(margin=1.5)
    with pytest.raises(ValueError, match="0 < margin <= 1"):
        Settings(margin=0.0)


def test_k16v16_always_fits(results):
    r = run(tiny_model(key_bias=20.0), budget=1e-9)
    assert r.uniform == KVPolicy(16, 16)
    assert r.measured("k16v16").exact and r.measured("k16v16").kl == 0.0


def test_ratio_early_exit_is_not_safe(results):
    """A model the ratio calls fragile whose keys still fit at 4 bits with groups + rotation: skipping
    K4 candidates on the ratio alone would spend bytes for nothing, so the early exit stays off."""
    r = results["outlier14"]
    show("outlier x14", r)
    assert r.fragile and r.uniform.k_bits == 4
    with Session(tiny_model(outlier_scale=14.0), token_ids()) as session:
        skipped = calibrate(session, HEAD_DIM, Settings(ratio_early_exit=True, per_layer=False))
    assert skipped.uniform.k_bits > 4
    assert skipped.uniform.slot_bytes(HEAD_DIM) > r.uniform.slot_bytes(HEAD_DIM)


# -- (5) rotation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [10.0, 14.0])
def test_rotation_reduces_k4_error_with_outlier_channels(results, scale):
    r = results[f"outlier{scale:g}"]
    plain, rot = r.measured("k4v4"), r.measured("k4v4-rot")
    g16, g16_rot = r.measured("k4v4-g16"), r.measured("k4v4-g16-rot")
    print(f"\noutlier x{scale:g}: K4V4 KL {plain.kl:.4f} -> rotated {rot.kl:.4f} "
          f"({plain.kl / rot.kl:.1f}x less); g16 {g16.kl:.4f} -> g16-rot {g16_rot.kl:.4f}")
    assert rot.kl < plain.kl / 3
    assert g16_rot.kl < g16.kl


def test_a_96_channel_head_gets_its_own_candidates_and_rotation_still_pays():
    """Phi-3's head size: key groups that divide 96 (32, 16) and the block-diagonal rotation (three
    blocks of 32) are measured; an outlier channel spreads over its block, which still pays."""
    r = run(tiny_model(outlier_scale=10.0, head_dim=96))
    names = [m.name for m in r.measurements]
    assert {"k4v4-rot", "k4v4-g32", "k4v4-g32-rot", "k4v4-g16-rot"} <= set(names)
    plain, rot = r.measured("k4v4"), r.measured("k4v4-rot")
    print(f"\nhead 96, outlier x10: K4V4 KL {plain.kl:.4f} -> rotated {rot.kl:.4f}; decision {r.uniform.name}")
    assert rot.kl < plain.kl / 2
    assert r.measured(r.uniform.name).kl <= r.settings.target


def test_rotation_is_no_free_lunch_without_outliers(results):
    """Without outliers, rotating V as well gives nothing: auto measures instead of assuming."""
    r = results["ordinary"]
    assert r.measured("k4v4-rot").kl > 0.8 * r.measured("k4v4").kl


# -- evidence and prompts ---------------------------------------------------------------------------
def test_evidence_is_json_and_complete(results):
    import json

    ev = json.loads(json.dumps(results["outlier10"].evidence()))
    for field in ("err_int8", "err_int6", "ratio", "err_k4v4", "decision", "seconds", "budget", "tau",
                  "candidates", "bytes_per_token", "kl", "uniform", "n_tokens"):
        assert ev[field] is not None, field
    assert math.isclose(ev["ratio"], ev["err_int6"] / ev["err_int8"])


def test_prompts_cover_the_genres_and_one_long_document():
    prompts = calibration.load_prompts(Settings())
    genres = [genre for genre, _ in prompts]
    assert genres == ["speeches", "fiction", "encyclopedic", "technical", "code", "dialogue", "long"]
    texts = [p for _, p in prompts if isinstance(p, str)]
    assert all(len(p) > 2000 for p in texts) and len(dict(prompts)["long"]) > 30000
    assert isinstance(dict(prompts)["dialogue"], list)  # chat messages, for the model's chat template
    assert len(calibration.load_prompts(Settings(n_prompts=2, long_tokens=0))) == 12


def test_a_model_whose_attention_ignores_the_interface_is_refused_not_measured_as_lossless():
    """transformers' Bloom computes attention itself (ALiBi, baddbmm), never through AttentionInterface:
    every candidate would measure KL 0 and K4V4 would win unmeasured. The session refuses instead."""
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=1, n_head=2)).eval()
    with pytest.raises(NotImplementedError, match="cannot calibrate BloomForCausalLM.*fixed policy"):
        Session(model, token_ids(n=1, length=16))
