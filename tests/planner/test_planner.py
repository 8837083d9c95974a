"""Capacity planner arithmetic against hand-computed values, config parsing, and the ``plan`` CLI."""
import json
import os
import re

import pytest

from vllm_int4kv.planner import capacity as planner
from vllm_int4kv.cli import main
from vllm_int4kv.planner.capacity import (GIB, ModelKV, PlanInputs, UnsupportedModel, layer_windows,
                                 max_context, model_from_config, plan, positions_read, sequence_bytes,
                                 startup_summary)
from vllm_int4kv.policy import parse_policy

K4V4, BF16 = parse_policy("k4v4"), parse_policy("k16v16")

LLAMA3_8B = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336,
             "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
# Gemma-2-9B geometry: 42 layers alternating window-4096 (even) and global (odd), 8 KV heads of 256.
GEMMA2_9B = {"model_type": "gemma2", "num_hidden_layers": 42, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 256, "hidden_size": 3584, "sliding_window": 4096}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "num_attention_heads": 128,
               "num_key_value_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64}


def llama3_8b():
    return model_from_config(LLAMA3_8B, "llama3_8b")


# -- bytes per token: dense GQA, MQA, MHA ---------------------------------------------------------

def test_llama3_8b_bytes_per_token():
    model = llama3_8b()
    assert (model.num_kv_heads, model.head_dim) == (8, 128)  # head_dim from hidden / heads
    bf16, k4v4 = plan(model, ["k16v16", "k4v4"], PlanInputs())
    assert bf16.bytes_per_token == 128 * 1024 == 32 * 8 * 2 * 128 * 2
    assert k4v4.bytes_per_token == 34816 == 32 * 8 * 136
    assert k4v4.capacity_vs_bf16 == pytest.approx(512 / 136)


@pytest.mark.parametrize("kv_heads, expected", [(1, 32 * 1 * 136), (32, 32 * 32 * 136)],
                         ids=["mqa_1kv", "mha_32kv"])
def test_mqa_and_mha(kv_heads, expected):
    cfg = {**LLAMA3_8B, "num_key_value_heads": kv_heads}
    assert plan(model_from_config(cfg), ["k4v4"], PlanInputs())[0].bytes_per_token == expected


def test_missing_kv_heads_means_multi_head():
    cfg = {k: v for k, v in LLAMA3_8B.items() if k != "num_key_value_heads"}
    assert model_from_config(cfg).num_kv_heads == 32


def test_startup_summary_matches_planner():
    s = startup_summary(32, 8, 128, "k4v4")
    assert s["bytes_per_token_per_layer"] == 8 * 136
    assert s["bytes_per_token"] == 34816
    assert s["bf16_bytes_per_token"] == 131072
    assert s["capacity_gain_vs_bf16"] == pytest.approx(131072 / 34816)
    assert "34816 B/token" in s["text"] and "3.76x" in s["text"]
    assert startup_summary(32, 8, 128, BF16)["capacity_gain_vs_bf16"] == 1.0


# -- memory per sequence, block rounding, capacity -------------------------------------------------

def test_block_rounding():
    model = ModelKV(2, 1, 128)
    assert sequence_bytes(model, K4V4, 17, block_size=16) == 2 * 136 * 32
    assert sequence_bytes(model, K4V4, 16, block_size=16) == 2 * 136 * 16


def test_max_context_and_sequences_llama():
    model, budget = llama3_8b(), GIB
    assert max_context(model, BF16, budget) == 8192  # 1 GiB / 128 KiB
    assert max_context(model, K4V4, budget) == 30832  # floor(2**30 / 34816 / 16) * 16
    row = plan(model, [K4V4], PlanInputs(context=4096, kv_budget_bytes=budget))[0]
    assert row.seq_bytes == 4096 * 34816
    assert row.max_seqs == budget // (4096 * 34816) == 7


# -- sliding windows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("context, tokens_held",
                         [(8192, 21 * 8192 + 21 * 4096), (32768, 21 * 32768 + 21 * 4096)], ids=["8k", "32k"])
def test_gemma2_sliding_memory(context, tokens_held):
    model = model_from_config(GEMMA2_9B)
    assert model.windows[:3] == (4096, None, 4096) and model.num_sliding == 21
    bf16, k4v4 = plan(model, [BF16, K4V4], PlanInputs(context=context))
    assert bf16.seq_bytes == 8 * 1024 * tokens_held
    assert k4v4.seq_bytes == 8 * 264 * tokens_held
    assert k4v4.step_read_bytes == k4v4.seq_bytes  # block-aligned, so reads equal holdings
    assert bf16.bytes_per_token == 42 * 8 * 1024  # every layer stores each token in its window


def test_gemma2_max_context():
    model = model_from_config(GEMMA2_9B)
    budget = 8 * 1024 * (21 * 8192 + 21 * 4096)  # exactly an 8k sequence in BF16
    assert max_context(model, BF16, budget) == 8192
    assert max_context(model, BF16, budget - 1) == 8192 - 16


def test_window_rounds_to_blocks_and_caps_reads():
    model = ModelKV(1, 1, 128, (50,))
    assert sequence_bytes(model, K4V4, 100) == 136 * 64
    row = plan(model, [K4V4], PlanInputs(context=100, gen_tokens=4))[0]
    assert row.step_read_bytes == 136 * 50
    assert row.gen_read_bytes == 136 * 4 * 50


def test_all_sliding_model_is_unbounded_when_the_window_fits():
    model = ModelKV(32, 8, 128, (4096,) * 32)  # Mistral-7B-v0.1
    assert max_context(model, BF16, GIB) is None
    assert max_context(model, BF16, GIB // 4) == 2048


@pytest.mark.parametrize("cfg, expected", [
    ({"sliding_window": 4096}, (4096,) * 6),  # Mistral: every layer
    ({"sliding_window": None}, (None,) * 6),
    ({"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 2}, (None,) * 6),
    ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 4},
     (None,) * 4 + (4096,) * 2),  # Qwen2: layers from max_window_layers on
    ({"model_type": "gemma3_text", "sliding_window": 1024}, (1024,) * 5 + (None,)),
    ({"model_type": "llama", "sliding_window": 512, "sliding_window_pattern": 3},
     (512, 512, None, 512, 512, None)),
    ({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"] * 3}, (None, 8) * 3),
], ids=["mistral", "no_window", "qwen2_off", "qwen2_on", "gemma3", "pattern", "layer_types"])
def test_layer_windows(cfg, expected):
    assert layer_windows({"num_hidden_layers": 6, **cfg}) == expected


def test_unknown_layer_type_refused():
    with pytest.raises(UnsupportedModel, match="linear_attention"):
        layer_windows({"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]})


# -- traffic over generation ---------------------------------------------------------------------------

@pytest.mark.parametrize("c0, gen, window", [(8192, 1024, None), (0, 7, None), (100, 50, 120),
                                             (100, 50, 80), (10, 5, 1000)])
def test_positions_read_formula(c0, gen, window):
    brute = sum(min(c0 + t, window or c0 + t) for t in range(gen))
    assert positions_read(c0, gen, window) == brute
    if window is None:
        assert positions_read(c0, gen) == gen * c0 + gen * (gen - 1) // 2


def test_generation_bytes_and_time():
    row = plan(llama3_8b(), [K4V4], PlanInputs(context=8192, batch=4, gen_tokens=1024,
                                               bandwidth_gbs=1000.0))[0]
    positions = 1024 * 8192 + 1024 * 1023 // 2
    assert row.gen_positions == positions
    assert row.gen_read_bytes == 4 * 34816 * positions
    assert row.step_read_bytes == 4 * 34816 * 8192
    assert row.step_time_s == pytest.approx(4 * 34816 * 8192 / 1e12)


# -- tensor parallel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tp, heads_per_rank", [(1, 8), (2, 4), (8, 1), (16, 1)])
def test_tensor_parallel_split(tp, heads_per_rank):
    row = plan(llama3_8b(), [K4V4], PlanInputs(tp=tp))[0]
    assert row.bytes_per_token == 32 * heads_per_rank * 136


def test_tensor_parallel_must_divide():
    with pytest.raises(ValueError, match="tensor parallel"):
        plan(llama3_8b(), [K4V4], PlanInputs(tp=3))


# -- refusals and config loading ----------------------------------------------------------------------

def test_mla_refused():
    with pytest.raises(UnsupportedModel, match="MLA"):
        model_from_config(DEEPSEEK_V3, "deepseek-v3")


def test_unsupported_head_dim_refused():
    with pytest.raises(UnsupportedModel, match="head_dim 72 .* multiple of 16 from 32 to 256"):
        plan(ModelKV(32, 32, 72), [K4V4], PlanInputs())
    phi3_mini = plan(ModelKV(32, 32, 96), [K4V4], PlanInputs())[0]  # 96 is a multiple of 16: served
    assert phi3_mini.bytes_per_token_per_layer == 32 * (48 + 48 + 8)
    assert phi3_mini.capacity_vs_bf16 == pytest.approx(384 / 104)


def test_multimodal_text_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": LLAMA3_8B}))
    model = model_from_config(planner.load_config(tmp_path))
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (32, 8, 128)
    assert model.weights_bytes == 2 * 8_030_261_248  # Llama-3-8B's parameter count


def test_measured_bandwidth_is_read_defensively(tmp_path):
    assert planner.measured_bandwidth([tmp_path])[0] == planner.DATASHEET_GBS
    for i, text in enumerate(["not json", "[1, 2]", '{"copy_bandwidth_gbs": true}',
                              '{"copy_bandwidth_gbs": "fast"}', '{"copy_bandwidth_gbs": 2900.5}']):
        (tmp_path / f"r{i}.json").write_text(text)
        os.utime(tmp_path / f"r{i}.json", (1000 + i, 1000 + i))
    os.utime(tmp_path / "r1.json", (5000, 5000))  # newest, but unusable
    gbs, label = planner.measured_bandwidth([tmp_path])
    assert gbs == 2900.5 and "measured" in label


# -- command line --------------------------------------------------------------------------------------

LLAMA_ARGS = ["plan", "--num-layers", "32", "--num-kv-heads", "8", "--head-dim", "128",
              "--kv-budget-gib", "1", "--context", "4096", "--bandwidth-gbs", "1000"]


def _table(text):
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if re.search(r"\S\s{2,}\S", line)]
    header = next(r for r in rows if r[0] == "metric")
    return {r[0]: dict(zip(header[1:], r[1:])) for r in rows if r is not header}


def test_cli_table(capsys):
    assert main(LLAMA_ARGS) == 0
    out = capsys.readouterr().out
    table = _table(out)
    assert list(table["bytes/token, all layers"]) == ["k16v16", "k8v4", "k4v4"]
    assert table["bytes/token, all layers"] == {"k16v16": "131072", "k8v4": "51200", "k4v4": "34816"}
    assert table["max tokens (1 sequence)"]["k4v4"] == "30832"
    assert table["max sequences @ 4096"] == {"k16v16": "2", "k8v4": "5", "k4v4": "7"}
    assert table["capacity vs BF16"]["k4v4"] == "3.76x"
    assert "1000 GB/s (given)" in out


def test_cli_json_sliding_tp_and_extra_policy(capsys):
    args = ["plan", "--num-layers", "42", "--num-kv-heads", "8", "--head-dim", "256",
            "--sliding-window", "4096", "--sliding-layers", "even", "--context", "32768",
            "--kv-budget-gib", "20", "-tp", "2", "--policies", "k16v16,k4v4-g32-rot", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    k16, k4 = result["policies"]
    assert k4["policy"] == "k4v4-g32-rot"
    assert k16["seq_bytes"] == 4 * 1024 * (21 * 32768 + 21 * 4096)  # 4 KV heads per rank


def test_cli_refuses_mla_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    assert main(["plan", "--model", str(tmp_path), "--kv-budget-gib", "10"]) == 2
    assert "not supported by the int4kv backend" in capsys.readouterr().out


def test_cli_budget_from_gpu_memory_and_plot(tmp_path, capsys):
    path = tmp_path / "plan.png"
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    args = ["plan", "--model", str(tmp_path), "--gpu-memory-gib", "80", "--plot", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "80 GiB x 0.9 - weights/rank 14.96 GiB" in out
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_kept_layers_cost_k16v16_bytes():
    """Llama-3-8B shape (32 layers, 8 KV heads, D 128, bf16) with layers 0 and 31 kept unquantized."""
    model = ModelKV(32, 8, 128, kept=(31, 0))
    k4v4 = planner.plan(model, ["k4v4"], PlanInputs(context=4096, kv_budget_bytes=10 * GIB))[0]
    assert model.kept == (0, 31)
    assert k4v4.bytes_per_token == 30 * 8 * 136 + 2 * 8 * 512
    assert k4v4.bytes_per_token_per_layer == 8 * (30 * 136 + 2 * 512) / 32  # the mean: 1276
    assert k4v4.capacity_vs_bf16 == pytest.approx(32 * 512 / (30 * 136 + 2 * 512))
    assert k4v4.seq_bytes == k4v4.bytes_per_token * 4096
    assert k4v4.step_read_bytes == k4v4.bytes_per_token * 4096
    # every layer kept: the k16v16 plan, whatever the policy
    all_kept = planner.plan(ModelKV(32, 8, 128, kept=tuple(range(32))), ["k4v4"], PlanInputs())[0]
    assert all_kept.bytes_per_token == planner.plan(ModelKV(32, 8, 128), ["k16v16"], PlanInputs())[0].bytes_per_token
    with pytest.raises(ValueError, match="kept layers"):
        ModelKV(32, 8, 128, kept=(32,))


def test_kept_sliding_layers_hold_only_their_window():
    model = ModelKV(4, 2, 64, windows=(512, None, 512, None), kept=(0, 2))  # the sliding layers kept
    seq = planner.sequence_bytes(model, parse_policy("k4v4"), 4096)
    assert seq == 2 * 2 * 256 * 512 + 2 * 2 * 72 * 4096


def test_cli_skip_layers(capsys):
    args = ["plan", "--num-layers", "4", "--num-kv-heads", "2", "--head-dim", "64", "--sliding-window", "512",
            "--sliding-layers", "even", "--kv-budget-gib", "1", "--policies", "k4v4", "--json"]
    assert main([*args, "--skip-layers", "sliding_window"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"]["kept"] == [0, 2] and result["policies"][0]["bytes_per_token"] == 2 * 2 * (256 + 72)
    assert main([*args, "--skip-layers", "1-2"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["kept"] == [1, 2]
    for bad, message in (("4", "names layers outside 0..3"), ("first", "give layer indices")):
        assert main([*args, "--skip-layers", bad]) == 2
        assert message in capsys.readouterr().out
    no_window = ["plan", "--num-layers", "4", "--num-kv-heads", "2", "--head-dim", "64", "--kv-budget-gib", "1"]
    assert main([*no_window, "--skip-layers", "sliding_window"]) == 2
    assert "no sliding-window layer" in capsys.readouterr().out


def test_cli_skip_sliding_window_leaves_chunked_layers_quantized(tmp_path, capsys):
    """Llama 4: vLLM gives its chunked local layers no sliding window, so ``sliding_window`` keeps none
    of them; the plan must not count them as kept (it did: their chunk is a window to the plan)."""
    config = {"model_type": "llama4_text", "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64, "attention_chunk_size": 32,
              "layer_types": ["chunked_attention"] * 3 + ["full_attention"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = ["plan", "--model", str(tmp_path), "--kv-budget-gib", "1", "--policies", "k4v4", "--json"]
    assert main([*args, "--skip-layers", "sliding_window"]) == 2
    assert "no sliding-window layer" in capsys.readouterr().out
    config["layer_types"][0] = "sliding_attention"
    config["sliding_window"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main([*args, "--skip-layers", "sliding_window"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["kept"] == [0]
