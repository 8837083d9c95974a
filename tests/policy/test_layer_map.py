"""Policy maps: the text form and JSON files, their names, and the checks against a model."""
import json
import re

import pytest

from vllm_int4kv.policy import KVPolicy, parse_policy
from vllm_int4kv.policy.layer_map import PolicyMap, format_layers, parse_layers, parse_policy_map

K4, K8, K16V4, FULL = parse_policy("k4v4-rot"), parse_policy("k8v4"), parse_policy("k16v4"), parse_policy("k16v16")


def test_a_policy_name_is_a_uniform_map():
    m = parse_policy_map("K4V4-ROT")
    assert m == PolicyMap.uniform(K4) and m.single == K4 and m.name == "k4v4-rot" and m.for_layer(99) == K4


def test_the_text_form_round_trips_and_names_layers_compactly():
    m = parse_policy_map("k4v4-rot; 8:k8v4 ;0-2:k8v4;23:k16v16")
    assert m.default == K4 and m.single is None
    assert [m.for_layer(i) for i in (0, 1, 2, 3, 8, 22, 23)] == [K8, K8, K8, K4, K8, K4, FULL]
    assert m.name == "k4v4-rot;0-2,8:k8v4;23:k16v16"
    assert parse_policy_map(m.name) == m
    assert m.policies == [K4, K8, FULL] and m.quantized and m.rotates


def test_a_layer_given_the_default_says_nothing_more():
    assert parse_policy_map("k8v4;0-3:k8v4") == PolicyMap.uniform(K8)


def test_without_a_default_every_layer_must_be_named():
    m = parse_policy_map("0-1:k8v4;2-3:k4v4-rot")
    assert m.default is None and m.name == "0-1:k8v4;2-3:k4v4-rot"
    m.check_layers(range(4))
    with pytest.raises(ValueError, match="no layout for layers 4-5: name every attention layer"):
        m.check_layers(range(6))
    with pytest.raises(ValueError, match="names no layout for layer 7"):
        m.for_layer(7)


@pytest.mark.parametrize("text, message", [
    ("k4v4;0-2:k8v4;2:k16v4", "layer 2 is named twice (0-2:k8v4 and 2:k16v4)"),
    ("k4v4;;1:k8v4", "an empty entry"),
    ("k4v4;1:k8v4;k16v4", "only the first entry may be a default policy"),
    ("k4v4;01:k8v4", "no leading zeros"),
    ("k4v4;3-1:k8v4", "the range 3-1 runs backwards"),
    ("k4v4;a:k8v4", "give indices and ranges"),
    ("k4v4;1:k5v4", "unknown KV policy 'k5v4'"),
    ("auto;1:k8v4", "auto chooses every layer's layout itself"),
])
def test_bad_maps_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_policy_map(text)


def test_checks_against_a_model():
    m = parse_policy_map("k4v4;0,30:k8v4")
    with pytest.raises(ValueError, match=r"layer 30 holds no attention KV cache in this model \(its attention "
                                         r"layers: 0-29\)"):
        m.check_layers(range(30))
    m.check_layers(range(31))
    with pytest.raises(ValueError, match="key groups of 32 channels need a head_dim above 32"):
        parse_policy_map("k4v4;1:k4v4-g32").check_head_dim(32)
    parse_policy_map("k4v4;1:k4v4-g32").check_head_dim(64)


def test_sizes_per_layer_and_on_average():
    m = parse_policy_map("k4v4;1:k16v16")
    assert m.slot_bytes(0, 64) == 72 and m.slot_bytes(1, 64) == 256 and m.slot_bytes(1, 64, 4) == 512
    assert m.mean_slot_bytes([0, 1], 64) == (72 + 256) / 2
    both = m.with_layers([0], FULL)
    assert both.for_layer(0) == both.for_layer(1) == FULL and both.name == "k4v4;0-1:k16v16"


def test_json_files(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"default": "k4v4-rot", "layers": {"0-2,8": "k8v4", "23": "k16v16"}}))
    assert parse_policy_map(str(path)).name == "k4v4-rot;0-2,8:k8v4;23:k16v16"
    path.write_text(json.dumps({"layers": {"0-1": "k8v4"}}))
    assert parse_policy_map(str(path)).default is None
    for content, message in (("{not json", "is not JSON"), ('{"default": "k4v4", "extra": 1}', "expected"),
                             ('{"layers": {"0": "k8v4", "0-1": "k4v4"}}', "layer 0 is named twice")):
        path.write_text(content)
        with pytest.raises(ValueError, match=message):
            parse_policy_map(str(path))
    with pytest.raises(ValueError, match="missing.json: No such file"):
        parse_policy_map(str(tmp_path / "missing.json"))


def test_layer_lists():
    assert parse_layers("0-2,8") == [0, 1, 2, 8] and format_layers([8, 2, 0, 1]) == "0-2,8"
    assert format_layers([3]) == "3" and format_layers([1, 3, 4]) == "1,3-4"


def test_every_policy_is_still_a_policy():
    assert KVPolicy(4, 4).name == "k4v4"  # the one-layer layout keeps its own type and names
