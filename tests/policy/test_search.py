"""The per-layer search of ``auto``: one fragile layer makes a map cheaper than the best uniform policy
within the budget, only a verified map is chosen, and bytes are counted as vLLM allocates them."""
from __future__ import annotations

import json
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_calibration import VOCAB, token_ids
from vllm_int4kv.policy import parse_policy
from vllm_int4kv.policy.calibration import Settings, calibrate, candidate_policies
from vllm_int4kv.policy.layer_map import parse_policy_map
from vllm_int4kv.policy.search import allocated_slot_bytes, ladder, search
from vllm_int4kv.policy.session import Measurement, Session


def one_fragile_layer(fragile=1, layers=4, scale=14.0, out=10.0, seed=0):
    """A tiny fp32 Llama (head_dim 64) shaped like test_calibration's, where only layer ``fragile`` has an
    outlier key channel (x``scale``, queries divided back: the same function in full precision) and an
    output ``out`` times larger, so that its keys, and only its keys, break at 4 bits."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, initializer_range=0.08,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight *= 8.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight *= 0.007
            layer.self_attn.q_proj.weight *= 4.0
        attn = model.model.layers[fragile].self_attn
        attn.o_proj.weight *= out
        for head in range(2):
            for channel in (3, 3 + 32):  # both halves of a RoPE pair
                attn.k_proj.weight[head * 64 + channel] *= scale
                for q_head in (2 * head, 2 * head + 1):
                    attn.q_proj.weight[q_head * 64 + channel] /= scale
    return model


@pytest.fixture(scope="module")
def fragile_result():
    with Session(one_fragile_layer(), token_ids(n=2)) as session:
        return calibrate(session, 64, Settings())


def test_one_fragile_layer_makes_a_map_cheaper_than_the_best_uniform_policy(fragile_result):
    r = fragile_result
    uniform = r.measured(r.uniform.name)
    size, kl = r.chosen
    print(f"\nuniform {r.uniform.name} {uniform.bytes_per_token} B KL {uniform.kl:.4f}; "
          f"map {r.policy.name} {size} B KL {kl:.4f}")
    assert uniform.bytes_per_token > 72  # K4 everywhere is over budget
    assert r.policy.single is None and size < uniform.bytes_per_token  # a map, and it pays
    verified = next(check for check in r.search.checks if check.map == r.policy.name)  # verified as chosen
    assert kl == verified.kl <= r.settings.target
    cheapest = parse_policy("k4v4-rot")
    assert r.policy.for_layer(1) != cheapest  # the fragile layer was upgraded
    assert r.search.single[1]["k4v4-rot"] > max(r.search.single[i]["k4v4-rot"] for i in (2, 3))
    evidence = json.loads(json.dumps(r.evidence()))
    assert evidence["decision"] == r.policy.name and evidence["uniform"] == r.uniform.name
    assert evidence["kl"] == kl and evidence["bytes_per_token"] == size == verified.bytes_per_token


def test_a_model_without_fragile_layers_keeps_one_policy():
    with Session(one_fragile_layer(scale=1.0, out=1.0), token_ids(n=2)) as session:
        r = calibrate(session, 64, Settings(margin=1.0))  # (K4 fits this tiny model at a target of 0.01)
    assert r.uniform.k_bits == 4 and r.policy.single == r.uniform and r.search is None


def test_attention_errors_rank_layouts_and_leave_the_model_alone():
    """The scan's probe: per layer, the attention output's error grows as bits shrink, and the model goes
    on with the full-precision output (the probe pass gives the reference's log-probabilities)."""
    with Session(one_fragile_layer(), token_ids(n=1, length=64)) as session:
        specs = {"k4v4": (4, 4, None, False), "k8v4": (8, 4, None, False), "k8v8": (8, 8, None, False)}
        errors = session.attention_errors(specs)
        for layer in session.attention_layers:
            assert errors.mean(layer, "k4v4") > errors.mean(layer, "k8v4") > errors.mean(layer, "k8v8") > 0
        assert errors.mean(1, "k4v4") > max(errors.mean(i, "k4v4") for i in (2, 3))  # the fragile one
        again = session.measure("probe off", None)
        assert again.kl == 0.0


def test_the_ladder_takes_the_rotated_layout_at_each_size():
    names = [p.name for p in ladder(candidate_policies(64), 64, 2)]
    assert names == ["k4v4-rot", "k4v4-g16-rot", "k8v4-rot", "k8v8", "k16v4", "k16v16"]


def test_the_ladder_takes_the_measured_better_layout_at_each_size():
    """Rotation is not always better (Qwen2.5-Coder-0.5B: k4v4 KL 0.75, k4v4-rot 1.79): where the uniform
    stage measured both layouts of a size, the lower KL takes the rung; otherwise the rotated one does."""
    kl = {"k4v4": 0.746, "k4v4-rot": 1.79, "k4v4-g16": 0.2, "k4v4-g16-rot": 0.1, "k8v4": 0.03}
    names = [p.name for p in ladder(candidate_policies(64), 64, 2, kl)]
    assert names == ["k4v4", "k4v4-g16-rot", "k8v4-rot", "k8v8", "k16v4", "k16v16"]


def test_bytes_as_vllm_allocates_them():
    m = parse_policy_map("k4v4;1:k16v16")  # 72 and 256 B per token and KV head at head_dim 64
    assert allocated_slot_bytes(m, [0, 1], 64, 2) == (72 + 256) / 2
    # a model that mixes layer types: vLLM pads the 72 B pages to 256 B (72 does not divide 256)
    assert allocated_slot_bytes(m, [0, 1], 64, 2, mixed_types=True) == 256
    halves = parse_policy_map("k8v8;1:k16v16")  # 136 B: does not divide 256 either
    assert allocated_slot_bytes(halves, [0, 1], 64, 2, mixed_types=True) == 256
    assert allocated_slot_bytes(parse_policy_map("k16v16"), [0, 1], 64, 2, mixed_types=True) == 256


class ScriptedSession:
    """Measures nothing: single-layer KLs from a table (through the scan's prediction: the output errors
    are the KLs themselves), whole maps at a fixed KL or at the next KL of a list (the checks)."""

    def __init__(self, single, map_kl):
        self.attention_layers, self.single, self.map_kl, self.maps = sorted(single), single, map_kl, []

    def attention_errors(self, specs, tokens=None):
        return types.SimpleNamespace(mean=lambda layer, name: self.single[layer].get(name, 1e-9))

    def measure(self, name, spec, bytes_per_token=None, tokens=None):
        if name.startswith("layer "):
            _, index, rung = name.split()
            kl = self.single[int(index)].get(rung, 0.0)
        else:
            self.maps.append(name)
            kl = self.map_kl if isinstance(self.map_kl, float) else self.map_kl[len(self.maps) - 1]
        return Measurement(name, bytes_per_token, kl, 1.0, 0.0)


def _scripted(map_kl):
    layer = {"k4v4-rot": 0.004, "k4v4-g16-rot": 0.002, "k8v4-rot": 0.0001}
    fragile = {"k4v4-rot": 0.05, "k4v4-g16-rot": 0.03, "k8v4-rot": 0.001}
    return ScriptedSession({0: layer, 1: fragile, 2: layer, 3: layer}, map_kl)


def test_only_a_verified_map_is_chosen():
    uniform = Measurement("k8v4", 104, 0.003, 1.0, 0.0)
    session = _scripted(map_kl=0.5)  # every check fails: the uniform policy stays
    found = search(session, candidate_policies(64), uniform, 64, 2, 0.01, scan_tokens=16, max_checks=3)
    assert found.chosen is None and len(found.checks) == len(session.maps) >= 1
    assert "no map passed its check" in found.note or "no cheaper" in found.note
    passing = _scripted(map_kl=0.009)
    found = search(passing, candidate_policies(64), uniform, 64, 2, 0.01, scan_tokens=16)
    assert found.chosen is not None and found.chosen.for_layer(1) == parse_policy("k8v4-rot")
    others = {found.chosen.for_layer(i).k_bits for i in (0, 2, 3)}
    assert others == {4} and found.checks[0].bytes_per_token < 104 and len(passing.maps) == 1
    # predicted: the scan's KLs of the chosen rungs, added up, within the first target (0.9 x budget)
    assert found.checks[0].predicted_kl <= 0.009 + 1e-12


def test_a_map_that_passes_with_room_to_spare_is_followed_by_a_cheaper_one():
    """The scan's additive prediction can overestimate (layers' errors partly cancel): each pass far under
    the budget rescales the target, and the cheapest map that passed is the decision."""
    uniform = Measurement("k8v4", 104, 0.003, 1.0, 0.0)
    session = _scripted(map_kl=0.002)
    found = search(session, candidate_policies(64), uniform, 64, 2, 0.01, scan_tokens=16, max_checks=3)
    costs = [check.bytes_per_token for check in found.checks]
    assert len(costs) >= 2 and costs == sorted(costs, reverse=True) and costs[-1] < costs[0]
    assert found.chosen.name == found.checks[-1].map


def test_the_decision_is_the_map_that_passed_not_the_last_one_tried():
    """Qwen2.5-Coder-0.5B: a map passed with room to spare (KL 0.00745 at 107.8 B), the cheaper try after
    it missed (0.0105 at 105.2 B); the decision and the bytes and KL reported for it are the first's."""
    from vllm_int4kv.policy.calibration import Calibration

    uniform = Measurement("k8v4", 104, 0.003, 1.0, 0.0)
    session = _scripted(map_kl=[0.002, 0.5, 0.5])
    found = search(session, candidate_policies(64), uniform, 64, 2, 0.01, scan_tokens=16, max_checks=3)
    assert found.checks[0].kl == 0.002 and found.checks[-1].kl == 0.5
    assert found.chosen.name == found.checks[0].map
    result = Calibration(found.chosen, parse_policy("k8v4"), [uniform], 1.0, Settings(), 0.0, found)
    assert result.chosen == (found.checks[0].bytes_per_token, 0.002)


def test_a_map_no_cheaper_than_the_uniform_policy_is_not_measured():
    uniform = Measurement("k4v4-g16", 84, 0.004, 1.0, 0.0)
    session = _scripted(map_kl=0.001)
    found = search(session, candidate_policies(64), uniform, 64, 2, 0.01, scan_tokens=16)
    assert found.chosen is None and session.maps == [] and "no cheaper" in found.note


def test_padding_makes_a_map_lose(monkeypatch):
    """On a model that mixes layer types every page pays for the largest one: the map costs more."""
    uniform = Measurement("k8v4", 104, 0.003, 1.0, 0.0)
    session = _scripted(map_kl=0.009)
    found = search(session, candidate_policies(64), uniform, 64, 2, 0.01, scan_tokens=16, mixed_types=True)
    assert found.chosen is None and "no cheaper" in found.note


def test_progress_is_reported_on_stderr_and_json_stays_clean(tmp_path, capsys):
    from vllm_int4kv.policy.progress import Progress, to_stderr

    lines = []
    progress = Progress(lines.append, "calibrate", every=0.0)
    progress.stage("per-layer scan", 3)
    for i in range(3):
        progress.step(f"layer {i}")
    assert lines[0] == "[calibrate] per-layer scan: 3 measurements, started"
    assert lines[1].startswith("[calibrate] per-layer scan: 1/3 (layer 0), 0 s elapsed, about ")
    assert lines[-1].startswith("[calibrate] per-layer scan: 3/3 (layer 2)") and "left" not in lines[-1]
    Progress(to_stderr, "x").stage("s")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "[x] s: started\n"
