"""The one decision: explicit policy → cached decision → calibration, and the decision cache."""
import json
import threading
import time

import pytest
import torch
from test_calibration import tiny_model

from vllm_int4kv.policy import calibration, decision_cache
from vllm_int4kv.policy import decide as auto
from vllm_int4kv.policy.decide import Decision, ModelTarget, decide
from vllm_int4kv.policy.calibration import Calibration, Settings
from vllm_int4kv.policy.session import Measurement
from vllm_int4kv.policy import KVPolicy
from vllm_int4kv.policy.layer_map import PolicyMap

FAST = Settings(n_prompts=1, max_tokens=128, long_tokens=256, per_layer=False)  # quick, the default budget


def resolve_auto(model: str, **target) -> Decision:
    return decide("auto", ModelTarget(model, **target))


def resolve_policy(request: str, model: str) -> Decision:
    return decide(request, ModelTarget(model))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder with a tokenizer (from tiny_model.py) and the ordinary test weights."""
    build_tiny_llama = pytest.importorskip("vllm_int4kv.testing.tiny_model").build_tiny_llama
    path = build_tiny_llama(tmp_path_factory.mktemp("auto") / "tiny", seed=0)
    tiny_model().save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_INT4KV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VLLM_INT4KV_KL_BUDGET", raising=False)
    monkeypatch.setattr(auto, "settings_from_env", lambda: FAST)
    return tmp_path / "cache"


def cache_files(directory):
    return sorted(directory.glob("decision-*.json")) if directory.exists() else []


class CountingCalibration:
    """Stands in for a real calibration: returns a fixed policy and counts the runs."""

    def __init__(self, policy=KVPolicy(8, 4), delay=0.0):
        self.policy, self.delay, self.calls = policy, delay, 0

    def __call__(self, model, settings, prompts, *, head_dim, elem_bytes, **kw):
        self.calls += 1
        time.sleep(self.delay)
        ms = [Measurement("k8v4", 104, 0.001, 0.99, 0.001), Measurement("k6v4", None, 0.002, 0.98, 0.002),
              Measurement("k4v4", 72, 0.05, 0.9, 0.05)]
        info = {"head_dim": head_dim, "elem_bytes": elem_bytes, "n_prompts": 2, "n_tokens": 256,
                "device": "cpu", "dtype": "float32"}
        return Calibration(PolicyMap.uniform(self.policy), self.policy, ms, 2.0, settings, 0.1, None, info)


# -- real calibration end to end ----------------------------------------------------------------------
def test_calibrates_once_then_reads_the_cache(folder, isolated, monkeypatch):
    first = resolve_auto(folder)
    print("\n" + first.summary)
    assert isinstance(first, Decision) and first.source == "calibration"
    assert first.policy.single == KVPolicy(4, 4)  # the ordinary test model fits the budget at K4V4
    assert "k4v4" in first.summary and "budget" in first.summary
    json.dumps(first.evidence)
    for field in ("err_int8", "err_int6", "ratio", "err_k4v4", "seconds"):
        assert first.evidence[field] is not None
    [path] = cache_files(isolated)
    assert json.loads(path.read_text())["decision"]["policy"] == "k4v4"

    def no_calibration(*a, **k):
        raise AssertionError("a cached decision must not recalibrate")

    monkeypatch.setattr(auto, "run_calibration", no_calibration)
    second = resolve_auto(folder)
    assert second.source == "cache" and second.policy == first.policy
    assert second.evidence == first.evidence
    assert "cached decision" in second.summary


def test_changed_weights_are_a_new_model(folder, isolated, tmp_path):
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    before = resolve_auto(str(changed))
    tiny_model(outlier_scale=10.0).save_pretrained(changed)  # same config, key outlier channels
    after = resolve_auto(str(changed))
    print(f"\nbefore {before.policy} ({before.source}); after {after.policy} ({after.source})")
    assert after.source == "calibration"  # a miss: the key saw the new weights
    assert before.policy.single == KVPolicy(4, 4) and after.policy.single != KVPolicy(4, 4)
    assert after.evidence["err_k4v4"] > after.evidence["budget"]
    assert len(cache_files(isolated)) == 2


# -- the cache ------------------------------------------------------------------------------------------
def test_cache_miss_then_hit(folder, isolated, monkeypatch):
    fake = CountingCalibration()
    monkeypatch.setattr(auto, "run_calibration", fake)
    assert resolve_auto(folder).source == "calibration"
    assert resolve_auto(folder).source == "cache"
    assert fake.calls == 1


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema": 1}', "",
                                     '{"schema": 1, "key": "someone else", "decision": {"policy": "k4v4", '
                                     '"evidence": {}}}'])
def test_corrupt_or_foreign_file_is_ignored_and_rewritten(folder, isolated, monkeypatch, content):
    fake = CountingCalibration()
    monkeypatch.setattr(auto, "run_calibration", fake)
    resolve_auto(folder)
    [path] = cache_files(isolated)
    path.write_text(content)
    again = resolve_auto(folder)
    assert again.source == "calibration" and fake.calls == 2
    assert json.loads(path.read_text())["decision"]["policy"] == "k8v4"  # healed


def test_unknown_policy_in_cache_is_ignored(folder, isolated, monkeypatch):
    fake = CountingCalibration()
    monkeypatch.setattr(auto, "run_calibration", fake)
    resolve_auto(folder)
    [path] = cache_files(isolated)
    record = json.loads(path.read_text())
    record["decision"]["policy"] = "k3v3"
    path.write_text(json.dumps(record))
    assert resolve_auto(folder).source == "calibration" and fake.calls == 2


def test_key_covers_config_weights_settings_and_prompts(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    prompts = ["a b c", "d e f"]
    base = auto.calibration_key(str(copy), FAST, prompts, 64, 2)
    assert base == auto.calibration_key(str(copy), FAST, prompts, 64, 2)
    assert base != auto.calibration_key(str(copy), Settings(budget=0.02, n_prompts=2, max_tokens=128),
                                        prompts, 64, 2)
    assert base != auto.calibration_key(str(copy), FAST, prompts[:1], 64, 2)
    assert base != auto.calibration_key(str(copy), FAST, prompts, 64, 4)  # candidate sizes changed
    assert base != auto.calibration_key(str(copy), FAST, prompts, 64, 2, revision="v2")
    assert base != auto.calibration_key(str(copy), FAST, prompts, 64, 2, dtype=torch.bfloat16, device="cuda")
    config = json.loads((copy / "config.json").read_text())
    config["rope_theta"] = 5e5
    (copy / "config.json").write_text(json.dumps(config))
    assert base != (changed := auto.calibration_key(str(copy), FAST, prompts, 64, 2))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert changed != auto.calibration_key(str(copy), FAST, prompts, 64, 2)


def test_store_is_atomic_json(tmp_path):
    record = {"decision": {"policy": "k8v4", "evidence": {"x": 1}}}
    path = decision_cache.store("ab" * 32, record, tmp_path)
    assert decision_cache.load("ab" * 32, tmp_path)["decision"] == record["decision"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert decision_cache.load("cd" * 32, tmp_path) is None


def test_concurrent_processes_wait_for_one_calibration(folder, isolated, monkeypatch):
    """Threads take the same flock as separate processes would (one open file description each)."""
    fake = CountingCalibration(delay=0.5)
    monkeypatch.setattr(auto, "run_calibration", fake)
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_auto(folder))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.calls == 1
    assert sorted(r.source for r in results) == ["cache", "cache", "calibration"]
    assert len({r.policy for r in results}) == 1


# -- resolution order -----------------------------------------------------------------------------------
def test_explicit_beats_cache_and_calibration(folder, monkeypatch):
    fake = CountingCalibration()
    monkeypatch.setattr(auto, "run_calibration", fake)
    resolve_auto(folder)  # a cached k8v4 exists now
    decision = resolve_policy("k4v4-g16-rot", folder)
    assert decision.source == "explicit" and decision.policy.single == KVPolicy(4, 4, 16, True)
    assert fake.calls == 1
    # explicit needs no model at all
    assert resolve_policy("K16V16", "/does/not/exist").policy.single == KVPolicy(16, 16)


def test_cache_beats_calibration_and_auto_calibrates_when_empty(folder, monkeypatch):
    fake = CountingCalibration()
    monkeypatch.setattr(auto, "run_calibration", fake)
    assert resolve_policy("auto", folder).source == "calibration"
    assert resolve_policy("auto", folder).source == "cache"
    assert resolve_policy("", folder).source == "cache"  # empty means auto
    assert fake.calls == 1


def test_no_silent_default(folder, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(auto, "run_calibration", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        resolve_policy("auto", folder)
    with pytest.raises(ValueError):
        resolve_policy("k5v4", folder)


def test_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setenv("VLLM_INT4KV_KL_BUDGET", "0.03")
    assert auto.settings_from_env().budget == 0.03
    monkeypatch.delenv("VLLM_INT4KV_KL_BUDGET")
    assert auto.settings_from_env().budget == calibration.DEFAULT_KL_BUDGET


def test_margin_comes_from_the_environment(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setenv("VLLM_INT4KV_KL_MARGIN", "0.8")
    assert auto.settings_from_env().margin == 0.8 and auto.settings_from_env().target == pytest.approx(0.008)
    for bad in ("0", "1.5", "half", "nan"):
        monkeypatch.setenv("VLLM_INT4KV_KL_MARGIN", bad)
        with pytest.raises(ValueError, match="VLLM_INT4KV_KL_MARGIN.*0 < margin <= 1"):
            auto.settings_from_env()
    monkeypatch.delenv("VLLM_INT4KV_KL_MARGIN")
    assert auto.settings_from_env().margin == calibration.DEFAULT_MARGIN


def test_calibrate_command_measures_held_out_perplexity(folder, tmp_path, capsys):
    from vllm_int4kv.cli import main

    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(f"Sentence {i} of a held-out text about the weather." for i in range(300)))
    out = tmp_path / "evidence.json"
    assert main(["calibrate", folder, "--prompts", "2", "--max-tokens", "96", "--eval-text", str(text),
                 "--eval-chunks", "1", "--json", str(out), "--no-cache"]) == 0
    evidence = json.loads(out.read_text())
    ppl = evidence["eval"]["perplexity"]
    assert ppl["k16v16"] == ppl["fp"] and ppl["k4v4"] != ppl["fp"]
    assert {c["name"] for c in evidence["candidates"]} <= set(ppl)
    assert "eval ppl" in capsys.readouterr().out
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(SystemExit, match="fewer than 512 tokens"):
        main(["calibrate", folder, "--prompts", "1", "--max-tokens", "32", "--eval-text", str(short),
              "--no-cache"])
    with pytest.raises(SystemExit, match="--eval-text: .*No such file"):
        main(["calibrate", folder, "--eval-text", str(tmp_path / "missing.txt"), "--no-cache"])
