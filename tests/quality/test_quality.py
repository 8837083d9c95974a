"""The quality checks: metric arithmetic against full-distribution references, and the ``quality``
command end to end on the tiny local model through vLLM with our backend (k16v16 vs itself, k4v4)."""
import time
import glob
import json
import math

import numpy as np
import pytest

from vllm_int4kv.quality import metrics as qm

# -- metrics ----------------------------------------------------------------------------------------


def _topk_from_logits(logits: np.ndarray, k: int, target: np.ndarray) -> qm.TopK:
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    n = len(logits)
    return qm.TopK(target=logp[np.arange(n), target].astype(np.float32), ids=order,
                   logprobs=np.take_along_axis(logp, order, axis=1).astype(np.float32),
                   position=np.arange(n, dtype=np.int32), sequence=np.zeros(n, dtype=np.int32))


def _full_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    la = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
    lb = b - np.log(np.exp(b).sum(axis=1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(axis=1)


def test_bucket_kl_is_zero_for_identical_runs_and_bounds_the_full_kl():
    rng = np.random.default_rng(0)
    ref_logits = rng.normal(0, 3, (64, 500))
    run_logits = ref_logits + rng.normal(0, 0.3, ref_logits.shape)
    target = rng.integers(0, 500, 64)
    ref, run = _topk_from_logits(ref_logits, 40, target), _topk_from_logits(run_logits, 40, target)
    same, missing = qm.bucket_kl(ref, ref, 20)
    assert missing == 0 and np.abs(same).max() < 1e-6
    kl, missing = qm.bucket_kl(ref, run, 20)
    full = _full_kl(ref_logits, run_logits)
    assert missing == 0  # small perturbations keep the reference's top-20 inside the run's top-40
    assert (kl <= full + 1e-5).all()  # data-processing inequality: a partition loses divergence
    assert kl.mean() > 0.3 * full.mean()  # ... but on peaked rows the top-20 + tail keeps most of it


def test_bucket_kl_bounds_tokens_missing_from_the_run():
    ref = qm.TopK(target=np.zeros(1, np.float32), ids=np.array([[5, 6]]),
                  logprobs=np.log(np.array([[0.6, 0.3]], np.float32)),
                  position=np.zeros(1, np.int32), sequence=np.zeros(1, np.int32))
    run = qm.TopK(target=np.zeros(1, np.float32), ids=np.array([[5, 7]]),
                  logprobs=np.log(np.array([[0.5, 0.4]], np.float32)),
                  position=np.zeros(1, np.int32), sequence=np.zeros(1, np.int32))
    kl, missing = qm.bucket_kl(ref, run, 2)
    # token 6 is missing from the run: q = min(0.4, 1 - 0.9) = 0.1; tail: p 0.1, q 1 - 0.6 = 0.4
    expected = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.1) + 0.1 * math.log(0.1 / 0.4)
    assert missing == 1 and kl[0] == pytest.approx(expected, rel=1e-5)


def test_generation_and_choice_agreement():
    stats = qm.generation_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
    assert stats["token_match_rate"] == pytest.approx(5 / 6)
    assert stats["identical"] == 1 and stats["mean_prefix_fraction"] == pytest.approx((0.5 + 1) / 2)
    assert qm.choice_agreement({0: 1, 1: 2, 2: 0}, {0: 1, 1: 0, 2: 0}) == pytest.approx(2 / 3)
    assert qm.perplexity(np.log(np.full(10, 0.25))) == pytest.approx(4.0)



def test_per_chunk_likelihoods_give_a_genre_change_its_standard_error():
    target = np.log(np.array([0.5, 0.5, 0.25, 0.25, 0.2, 0.2]))
    sequence = np.array([0, 0, 1, 1, 2, 2])
    assert qm.chunk_nll(target, sequence) == pytest.approx([math.log(2), math.log(4), math.log(5)])
    ref = [2.0, 3.0, 4.0, 5.0]
    assert qm.change_standard_error(ref, ref) == 0.0  # the reference against itself
    shifted = [r + 0.01 for r in ref]  # the same change on every chunk: no spread
    assert qm.change_standard_error(ref, shifted) == pytest.approx(0.0, abs=1e-12)
    noisy = [2.0, 3.02, 4.0, 5.02]  # differences 0, 0.02, 0, 0.02
    d = np.array([0.0, 0.02, 0.0, 0.02])
    assert qm.change_standard_error(ref, noisy) == pytest.approx(math.exp(0.01) * d.std(ddof=1) / 2)
    assert qm.change_standard_error([2.0], [2.1]) is None  # one chunk: no spread to measure


def test_the_genre_table_shows_standard_errors_where_measured():
    from vllm_int4kv.quality.report import genre_table

    report = {"reference": "k16v16", "settings": {"genres": {"code": 4, "fiction": 4}}, "policies": {
        "k16v16": {"ok": True, "genre_ppl_change": {"code": 0.0, "fiction": 0.0},
                   "genre_ppl_change_se": {"code": 0.0, "fiction": 0.0},
                   "genre_perplexity": {"code": 6.0, "fiction": 90.0}},
        "k4v4": {"ok": True, "genre_ppl_change": {"code": 0.004, "fiction": 0.0123},
                 "genre_ppl_change_se": {"code": 0.001, "fiction": 0.0031}},
        "old": {"ok": True, "genre_ppl_change": {"code": 0.02, "fiction": 0.01}}}}  # before chunk data
    table = genre_table(report)
    assert "| k4v4 | +0.40 % ± 0.10 | +1.23 % ± 0.31 | +1.23 % ± 0.31 |" in table
    assert "| old | +2.00 % | +1.00 % | +2.00 % |" in table
    assert "| k16v16 | +0.00 % | +0.00 % | +0.00 % |" in table and "± : standard error" in table


# -- the command, end to end ------------------------------------------------------------------------

TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _write_inputs(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"prompt": f"Question {i}: which word comes next in the license?",
             "choices": ["GNU", "free", "software", "public"], "gold": i % 4} for i in range(6)]
    (tasks / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tasks / "tiny_mc.jsonl"))
    texts = [open(name, errors="replace").read() for name in sorted(glob.glob("/usr/share/common-licenses/*"))]
    text = "\n".join(texts) or " ".join(f"clause {i} of the license says {i * 7}" for i in range(6000))
    (tmp_path / "corpus.txt").write_text(text)
    return tasks, tmp_path / "corpus.txt"


@pytest.mark.engine
def test_quality_command_end_to_end(tmp_path):
    from vllm_int4kv.cli import main
    from vllm_int4kv.quality.runner import vllm_baseline_problem
    from vllm_int4kv.testing.tiny_model import build_tiny_llama

    # vLLM's fp8 cache runs on CPUs with AVX-512 or AMX only; elsewhere the rest is checked without it
    # (test_a_baseline_this_cpu_cannot_run_is_refused_up_front checks what quality says there).
    fp8 = vllm_baseline_problem("fp8", 64, "float32") is None
    policies = ["k16v16", "k4v4", "k4v4@skip=0"] + (["vllm:fp8"] if fp8 else [])
    model = build_tiny_llama(tmp_path / "tiny")
    tasks, corpus = _write_inputs(tmp_path)
    out = tmp_path / "report"
    genres = tmp_path / "genres"  # held-out text in the calibration files' format
    genres.mkdir()
    for genre, text in (("licenses", corpus.read_text()[:20000]), ("numbers", " ".join(map(str, range(4000))))):
        (genres / f"{genre}.txt").write_text(f"# held out\n\n=== {genre} ===\n\n{text}\n")
    code = main(["quality", str(model), "--policies", ",".join(policies), "--tasks", "tiny_mc",
                 "--include-path", str(tasks), "--corpus", str(corpus), "--ppl-chunks", "2",
                 "--chunk-tokens", "128", "--long-prompts", "1", "--long-tokens", "600",
                 "--gen-lengths", "16,300", "--gen-tokens", "8", "--passkey-lengths", "300,700,9000",
                 "--genres", str(genres), "--genre-chunks", "2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["policies"]) == policies
    assert {"cpu", "torch", "vllm", "lm_eval", "vllm_int4kv", "date"} <= report["machine"].keys()
    assert report["settings"]["ppl_tokens"] == 2 * 128  # BOS prepended: every chunk token scored
    for name, entry in report["policies"].items():
        assert entry["ok"] and entry["resolved"]["name"] == name
        assert math.isfinite(entry["perplexity"]) and entry["perplexity"] > 1
        assert 0 <= entry["lm_eval"]["tiny_mc"]["acc,none"] <= 1
        assert [b["positions"] for b in entry["vs_reference"]["by_position"]] == [[1, 128], [129, 512],
                                                                                 [513, 600]]

    ref = report["policies"]["k16v16"]  # the reference against a fresh engine of itself: exact
    assert ref["vs_reference"]["top1_agreement"] == 1.0 and ref["vs_reference"]["mean_kl"] == 0.0
    assert ref["vs_reference"]["ppl_ratio"] == 1.0
    assert ref["generation"]["token_match_rate"] == 1.0 and ref["choice_agreement"]["tiny_mc"] == 1.0

    k4v4 = report["policies"]["k4v4"]
    assert k4v4["bytes_per_token"] == 72 and ref["bytes_per_token"] == 256  # head_dim 64
    # held-out genres: each scored, the reference against itself exactly
    assert report["settings"]["genres"] == {"licenses": 2, "numbers": 2}
    assert ref["genre_ppl_change"] == {"licenses": 0.0, "numbers": 0.0}
    assert set(k4v4["genre_ppl_change"]) == {"licenses", "numbers"} and k4v4["genre_ppl_change"]["licenses"] != 0
    assert ref["genre_ppl_change_se"] == {"licenses": 0.0, "numbers": 0.0}  # 2 chunks each, paired
    assert all(se is not None and se >= 0 for se in k4v4["genre_ppl_change_se"].values())
    # pass-key retrieval: 2 lengths x 3 depths (9000 tokens is past the tiny model's context)
    assert report["settings"]["passkey_lengths"] == [300, 700] and report["settings"]["passkey_skipped"] == [9000]
    assert len(ref["passkey"]["hits"]) == 6 and 0 <= k4v4["passkey"]["accuracy"] <= 1
    assert 0 < k4v4["vs_reference"]["mean_kl"] < 5 and 0 <= k4v4["vs_reference"]["top1_agreement"] < 1

    # layer 0 kept unquantized (it carries most of K4V4's error on this model), layer 1 at k4v4
    skip0 = report["policies"]["k4v4@skip=0"]
    assert skip0["resolved"]["layer_layouts"] == {"0": "k16v16", "1": "k4v4"}
    assert skip0["bytes_per_token"] == (256 + 72) / 2
    assert 0 < skip0["vs_reference"]["mean_kl"] < k4v4["vs_reference"]["mean_kl"]

    if fp8:  # vLLM's own CPU attention over its fp8 cache, for comparison
        fp8_run = report["policies"]["vllm:fp8"]
        assert fp8_run["resolved"]["source"].startswith("vLLM's own") and fp8_run["bytes_per_token"] == 128
        assert 0 < fp8_run["vs_reference"]["mean_kl"] < k4v4["vs_reference"]["mean_kl"]

    md = (out / "report.md").read_text()
    assert "| k16v16 | k16v16 | 256 |" in md and "16-bit basis" in md and "| k4v4 | k4v4 | 72 |" in md
    assert "## What the numbers mean" in md and "+0.77 %" in md
    assert "## Held-out genres" in md and "## Pass-key retrieval" in md and "| k4v4 |" in md
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_a_baseline_this_cpu_cannot_run_is_refused_up_front(tmp_path, monkeypatch):
    """On an x86 CPU without AVX-512 or AMX, vLLM's CPU attention refuses an fp8 cache: quality says so
    before any engine starts, in its own words and vLLM's."""
    from conftest import without_avx512
    from vllm_int4kv.cli import main
    from vllm_int4kv.testing.tiny_model import build_tiny_llama

    without_avx512(monkeypatch)
    model = build_tiny_llama(tmp_path / "tiny")
    (tmp_path / "c").write_text("a corpus")
    monkeypatch.setattr("vllm_int4kv.quality.runner.build_prompts", lambda *a: pytest.fail("an engine would start"))
    with pytest.raises(SystemExit, match="vllm:fp8 is not available on this machine.*AVX-512 or AMX"):
        main(["quality", str(model), "--policies", "k16v16,vllm:fp8", "--corpus", str(tmp_path / "c"),
              "--out", str(tmp_path / "out")])
    from vllm_int4kv.quality.runner import check_policies

    check_policies(str(model), ["k16v16", "vllm:auto"])  # vLLM's unquantized cache runs anywhere


def test_a_silent_worker_is_killed_at_the_timeout(tmp_path, monkeypatch):
    from vllm_int4kv.quality import runner as quality

    sleeper = tmp_path / "silent-worker"
    sleeper.write_text("#!/bin/sh\nsleep 60\n")
    sleeper.chmod(0o755)
    monkeypatch.setattr(quality.sys, "executable", str(sleeper))  # the worker command's interpreter
    started = time.monotonic()
    result = quality.run_policy("k16v16", {}, tmp_path, timeout=1.0)
    assert time.monotonic() - started < 30
    assert result["ok"] is False and "killed after 1 s" in result["error"]


def test_unknown_policy_names_fail_before_any_engine_starts(tmp_path):
    from vllm_int4kv.cli import main

    (tmp_path / "c").write_text("a corpus")  # arguments are checked first: a missing corpus would stop it
    for bad, message in (("k5v4", "unknown KV policy"), ("vllm:int3", "no size known"),
                         ("k4v4@skip=first", "as indices"), ("k4v4@skip=01", "as indices"), ("k16v16@skip=0", "needs a quantized policy"),
                         ("vllm:fp8@skip=0", "this backend's policies only")):
        with pytest.raises(SystemExit, match=message):
            main(["quality", str(tmp_path / "no-model"), "--policies", bad, "--corpus", str(tmp_path / "c"),
                  "--out", str(tmp_path / "out")])


def test_reports_name_the_commit_and_whether_the_checkout_differed(tmp_path):
    """A report's commit says "+changes" when tracked files differed from it (measured on uncommitted code)."""
    import shutil
    import subprocess

    from vllm_int4kv.quality.report import _git_commit

    if shutil.which("git") is None:
        pytest.skip("no git")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git[:5] + ["init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("one")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    clean = _git_commit(tmp_path)
    assert clean and "+" not in clean
    (tmp_path / "a.txt").write_text("two")
    assert _git_commit(tmp_path) == clean + "+changes"
    (tmp_path / "untracked.txt").write_text("not part of the code")
    (tmp_path / "a.txt").write_text("one")
    assert _git_commit(tmp_path) == clean
