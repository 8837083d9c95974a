"""The policy value: names, validation, sizes, and the order auto tries candidates in."""
import pytest

from vllm_int4kv.policy.calibration import candidate_policies
from vllm_int4kv.policy import PRESETS, KVPolicy, parse_policy

# bytes per token per KV head from the page-format table (bf16/fp16 model)
TABLE = {  # name: (D=64, D=128, D=256)
    "k4v4": (72, 136, 264), "k8v4": (104, 200, 392), "k16v4": (164, 324, 644),
    "k8v8": (136, 264, 520), "k16v16": (256, 512, 1024),
}


@pytest.mark.parametrize("name", ["k4v4", "k8v4", "k16v4", "k8v8", "k16v16", "k4v4-rot", "k4v4-g16",
                                  "k4v4-g32-rot", "k8v4-rot", "k16v8"])
def test_name_round_trip(name):
    assert parse_policy(name).name == name
    assert parse_policy(f"  {name.upper()} ") == parse_policy(name)


@pytest.mark.parametrize("bad", ["auto", "k2v4", "k4v2", "k4v16", "k16v16-rot", "k16v4-g16", "k4v4-g4",
                                 "k4v4-g24", "int4", ""])
def test_rejects(bad):
    with pytest.raises(ValueError):
        parse_policy(bad)


@pytest.mark.parametrize("name", list(TABLE))
def test_slot_bytes_match_format_table(name):
    for head_dim, expected in zip((64, 128, 256), TABLE[name]):
        assert PRESETS[name].slot_bytes(head_dim) == expected


def test_groups_add_four_bytes_per_extra_group():
    assert KVPolicy(4, 4, 32).slot_bytes(64) == 72 + 4
    assert KVPolicy(4, 4, 16).slot_bytes(128) == 136 + 7 * 4
    assert KVPolicy(4, 4, rotate=True).slot_bytes(128) == 136  # rotation is free in bytes


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_candidates_cheapest_first_and_end_unquantized(head_dim, elem_bytes):
    cands = candidate_policies(head_dim, elem_bytes)
    sizes = [p.slot_bytes(head_dim, elem_bytes) for p in cands]
    assert sizes == sorted(sizes)
    assert cands[0] == KVPolicy(4, 4) and cands[-1] == KVPolicy(16, 16)
    names = [p.name for p in cands]
    assert len(set(names)) == len(names)
    for name in names:  # every candidate is a layout the format can store
        assert parse_policy(name).layout(head_dim, 16, elem_bytes).slot_bytes > 0
    assert names.index("k4v4") < names.index("k4v4-rot")  # same bytes: plain first
    assert {"k4v4-g32-rot", "k4v4-g16-rot", "k8v4", "k8v4-rot", "k16v4", "k8v8"} <= set(names)


@pytest.mark.parametrize("head_dim,groups", [(96, {32, 16}), (80, {16}), (48, {16})])
def test_candidates_for_heads_that_are_not_a_power_of_two(head_dim, groups):
    """Only key groups that divide the head are candidates; rotation (block-diagonal) always is."""
    names = [p.name for p in candidate_policies(head_dim)]
    assert {p.k_group for p in candidate_policies(head_dim)} - {None} == groups
    assert "k4v4-rot" in names and names[0] == "k4v4" and names[-1] == "k16v16"


def test_key_groups_that_do_not_divide_the_head_are_refused_clearly():
    with pytest.raises(ValueError, match="key groups of 32 channels must divide head_dim 80; use -g16"):
        parse_policy("k4v4-g32").layout(80, 16)


def test_candidate_order_for_head_dim_64():
    names = [p.name for p in candidate_policies(64)]
    assert names == ["k4v4", "k4v4-rot", "k4v4-g32", "k4v4-g32-rot", "k4v4-g16", "k4v4-g16-rot",
                     "k8v4", "k8v4-rot", "k8v8", "k16v4", "k16v16"]
