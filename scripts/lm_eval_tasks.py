"""lm-eval task definitions for offline use, written by ``scripts/prepare_data.py``.

This module turns prepared data into a folder that ``lm_eval --include_path <folder>`` reads without
network access: one YAML file per task, the task's documents as a JSONL file beside it (the YAML
refers to it by absolute path), and a ``SOURCES.md`` with provenance and licenses. The tasks are

* ``sotu_ppl``: rolling log-likelihood perplexity on the State of the Union evaluation corpus that
  ``prepare_data.py`` builds;
* three BIG-bench multiple-choice tasks (``BIGBENCH_TASKS``), read out of the PyPI sdist
  ``bigbench==1.0.0`` (Apache-2.0), which ``ensure_bigbench_sdist`` fetches and verifies.

It also holds the small file helpers that ``prepare_data.py`` shares (logging, digests, writing only
what changed), so that the two files do not import each other.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_TASK_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_SETUP_PY = "bigbench-1.0.0/setup.py"

# BIG-bench multiple-choice tasks: (lm-eval task name, path under benchmark_tasks/).
BIGBENCH_TASKS = [
    ("bb_general_knowledge", "general_knowledge/task.json"),
    ("bb_cause_and_effect_one_sentence", "cause_and_effect/one_sentence/task.json"),
    ("bb_physical_intuition", "physical_intuition/task.json"),
]

# What follows the common YAML header for each kind of task: how it is asked and scored.
SOTU_PPL_YAML = [
    "output_type: loglikelihood_rolling",
    "doc_to_text: \"\"",
    "doc_to_target: \"{{text}}\"",
    "metric_list:",
    "  - metric: word_perplexity",
    "  - metric: byte_perplexity",
    "  - metric: bits_per_byte",
]
MULTIPLE_CHOICE_YAML = [
    "output_type: multiple_choice",
    "doc_to_text: prompt",
    "doc_to_choice: choices",
    "doc_to_target: gold",
    "target_delimiter: \" \"",
    "metric_list:",
    "  - metric: acc",
    "    aggregation: mean",
    "    higher_is_better: true",
    "  - metric: acc_norm",
    "    aggregation: mean",
    "    higher_is_better: true",
]


# ----------------------------------------------------------------------------------------------
# file helpers (shared with prepare_data.py)
# ----------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    # one prefix for both files: the user ran one command, prepare_data.py
    print(f"[prepare_data] {msg}", flush=True)


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds exactly that; return True if written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------------------------
# BIG-bench
# ----------------------------------------------------------------------------------------------
def pypi_file(project: str, filename: str, sha256: str, target: Path, *, missing, note: str = "",
              timeout: float = 300) -> Path:
    """``filename`` of PyPI ``project`` at ``target``, located through PyPI's simple index (PEP 691 JSON)
    and checked against the sha256 the index publishes and the pinned ``sha256``; never built or
    installed. A copy already at ``target`` with that digest is kept. ``missing(listed)`` is the message
    when the index no longer lists the file (``listed``: what it does list)."""
    if target.exists() and file_digest(target, "sha256") == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        index = json.load(r)
    entry = next((f for f in index["files"] if f["filename"] == filename), None)
    if entry is None:
        raise SystemExit(missing(", ".join(f["filename"] for f in index["files"]) or "nothing"))
    if entry["hashes"].get("sha256") != sha256:
        raise SystemExit(f"PyPI publishes a different sha256 for {filename} than the pinned one")
    log(f"downloading {entry['url']}{note}")
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(entry["url"], timeout=timeout) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 22)
    if file_digest(part, "sha256") != sha256:
        part.unlink()
        raise SystemExit(f"{filename}: sha256 mismatch")
    os.replace(part, target)
    return target


def ensure_bigbench_sdist(downloads: Path) -> Path:
    """The PyPI sdist bigbench==1.0.0, fetched from PyPI and verified (never installed).

    ``pip download`` of this sdist fails while preparing its metadata (it declares a direct-URL
    dependency on ``bleurt``), so the archive is fetched from the same PyPI file URL that pip would
    use (``pypi_file``).
    """
    target = downloads / BIGBENCH_SDIST

    def missing(listed: str) -> str:  # seen 2026-12: the registry lists only bigbench-0.0.1, a placeholder
        return (f"the package index no longer offers {BIGBENCH_SDIST} (it lists {listed}), so the BIG-bench "
                f"tasks cannot be built. Put a copy with sha256 {BIGBENCH_SHA256} at {target}, or run "
                "with --skip-bigbench (the calibration text, the evaluation corpus and its perplexity task "
                "need no BIG-bench).")

    return pypi_file("bigbench", BIGBENCH_SDIST, BIGBENCH_SHA256, target, missing=missing, note=" (358 MB)",
                     timeout=600)


def read_bigbench_tasks(sdist: Path) -> tuple[dict[str, dict], str | None]:
    """The task JSON of each of ``BIGBENCH_TASKS`` (keyed by lm-eval task name) and what the sdist
    says about its license, read in one pass over the 358 MB archive."""
    wanted = {BIGBENCH_TASK_ROOT + rel: name for name, rel in BIGBENCH_TASKS}
    found: dict[str, dict] = {}
    license_line = None
    with tarfile.open(sdist, "r:gz") as t:
        for m in t:
            if m.name in wanted:
                found[wanted[m.name]] = json.load(t.extractfile(m))
            elif m.name == BIGBENCH_SETUP_PY:
                # PKG-INFO says "License: UNKNOWN"; the sdist's own license statement is the
                # Apache-2.0 header of its sources (the BIG-bench repository is Apache-2.0)
                head = t.extractfile(m).read(2000).decode("utf-8")
                license_line = ("setup.py header: Apache License 2.0"
                                if "Licensed under the Apache License, Version 2.0" in head
                                else "no license header found in setup.py")
            if len(found) == len(wanted) and license_line is not None:
                break
    missing = set(wanted.values()) - set(found)
    if missing:
        raise SystemExit(f"BIG-bench tasks not found in {sdist}: {sorted(missing)}")
    return found, license_line


def bigbench_docs(task: dict) -> list[dict]:
    """BIG-bench JSON multiple-choice examples -> prompt / choices / gold, formatted as BIG-bench does
    (task_prefix, example_input_prefix, choices appended when append_choices_to_input)."""
    prefix = task.get("task_prefix", "")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    append = task.get("append_choices_to_input", True)
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    docs = []
    for i, ex in enumerate(task["examples"]):
        scores = ex["target_scores"]
        choices = list(scores)
        best = max(scores.values())
        golds = [j for j, c in enumerate(choices) if scores[c] == best]
        if len(golds) != 1:
            continue  # ambiguous examples are skipped
        text = prefix + in_prefix + ex["input"]
        if append:
            text += "".join(choice_prefix + c for c in choices)
        text += out_prefix
        docs.append({"idx": i, "prompt": text.strip(), "choices": choices, "gold": golds[0]})
    return docs


# ----------------------------------------------------------------------------------------------
# task files
# ----------------------------------------------------------------------------------------------
def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def task_yaml(name: str, jsonl: Path, kind_lines: list[str]) -> str:
    """The YAML of task ``name`` whose test split is ``jsonl``; ``kind_lines`` say how it is scored."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml_str(str(jsonl.resolve()))}",
        "test_split: test",
        *kind_lines,
        "metadata:",
        "  version: 1.0",
        "",
    ])


def write_sotu_ppl_task(tasks_out: Path, eval_jsonl: Path, eval_source: str, eval_license: str) -> str:
    """The perplexity task on the evaluation corpus ``eval_jsonl``; returns its SOURCES.md row."""
    with open(eval_jsonl, encoding="utf-8") as f:
        n_docs = sum(1 for _ in f)
    jsonl = tasks_out / "sotu_ppl.jsonl"
    write_if_changed(jsonl, eval_jsonl.read_text(encoding="utf-8"))
    write_if_changed(tasks_out / "sotu_ppl.yaml", task_yaml("sotu_ppl", jsonl, SOTU_PPL_YAML))
    return f"| sotu_ppl | loglikelihood_rolling | {n_docs} | {eval_source} | {eval_license} |"


def write_bigbench_task(tasks_out: Path, name: str, rel: str, task: dict, license_line: str | None) -> str:
    """One BIG-bench multiple-choice task (``rel`` under benchmark_tasks/); returns its SOURCES.md row."""
    docs = bigbench_docs(task)
    jsonl = tasks_out / f"{name}.jsonl"
    write_if_changed(jsonl, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    write_if_changed(tasks_out / f"{name}.yaml", task_yaml(name, jsonl, MULTIPLE_CHOICE_YAML))
    chance = sum(1.0 / len(d["choices"]) for d in docs) / len(docs)
    return (f"| {name} | multiple_choice | {len(docs)} (chance acc {chance:.3f}) | BIG-bench "
            f"`benchmark_tasks/{rel}` from the PyPI sdist `bigbench==1.0.0` (sha256 "
            f"`{BIGBENCH_SHA256[:16]}...`) | Apache-2.0 (BIG-bench, github.com/google/BIG-bench; sdist "
            f"{license_line}) |")


def write_tasks(tasks_out: Path, bigbench_sdist: Path | None, eval_jsonl: Path, *,
                eval_source: str, eval_license: str) -> list[str]:
    """All tasks and SOURCES.md into ``tasks_out`` (the BIG-bench ones unless ``bigbench_sdist`` is
    None); ``eval_source`` and ``eval_license`` describe the corpus. Returns the task names."""
    tasks_out.mkdir(parents=True, exist_ok=True)
    sources = [
        "# lm-eval tasks for offline use (generated by scripts/prepare_data.py)",
        "",
        "Use with `lm_eval --include_path %s --tasks <name> ...`. The YAML files refer to the JSONL"
        " files by absolute path: regenerate the folder after moving it." % tasks_out,
        "",
        "| task | kind | docs | source | license |",
        "|---|---|---|---|---|",
    ]
    sources.append(write_sotu_ppl_task(tasks_out, eval_jsonl, eval_source, eval_license))
    written = ["sotu_ppl"]
    if bigbench_sdist is not None:
        found, license_line = read_bigbench_tasks(bigbench_sdist)
        canary = None
        for name, rel in BIGBENCH_TASKS:
            canary = found[name].get("canary", canary)
            sources.append(write_bigbench_task(tasks_out, name, rel, found[name], license_line))
            written.append(name)
        sources += ["", "BIG-bench asks that its data never be used for training; its canary string:",
                    "", f"    {canary}"]
    sources += ["", "No data here is committed to the repository (artifacts/ is git-ignored).", ""]
    write_if_changed(tasks_out / "SOURCES.md", "\n".join(sources))
    log(f"lm-eval tasks in {tasks_out}: {', '.join(written)}")
    return written


def check_tasks(tasks_out: Path, names: list[str]) -> None:
    """Load the generated tasks with lm-eval's TaskManager and build their requests."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_out), include_defaults=False)
    tasks = tm.load(names)["tasks"]
    for name, task in tasks.items():
        task.build_all_requests(limit=2, rank=0, world_size=1)
        reqs = task.instances
        assert reqs, f"{name}: no requests built"
        log(f"lm-eval loads {name}: {len(task.eval_docs)} docs, first request {reqs[0].request_type} "
            f"{str(reqs[0].arguments)[:100]!r}")
