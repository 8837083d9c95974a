"""Calibration and held-out text for several genres, written by ``scripts/prepare_data.py``.

The precision policy calibrates on a few prompts; a layout chosen on one genre (speeches) can fail on
another. This module builds, for each genre, two disjoint parts from packages fetched through the
ordinary registries (pinned versions, sha256-checked):

* a small **calibration** part, shipped in the package as ``vllm_int4kv/data/calibration/<genre>.txt``
  (1-3 prompts of 2600-3600 characters, i.e. at least 512 tokens with common tokenizers; the ``long``
  genre holds one document of ~45,000 characters), with ``SOURCES.md`` beside the files;
* a larger **held-out** part, never shipped, written to ``artifacts/data/genres/<genre>.txt``
  (10-16 excerpts of ~4,000-5,000 characters per genre, from other documents of the same genre
  wherever the source has them), with its own ``SOURCES.md``. ``mixed`` (the Brown corpus) exists only
  as held-out text: its license is unclear, so none of it is shipped.

File format (both parts)::

    # header lines: source, license, what was taken (the '#' lines before the first section)
    === title ===
    prompt text, verbatim (every line up to the next '=== ... ===' line; leading and trailing
    blank lines dropped). Code keeps its indentation and '#' lines; prose keeps blank-line paragraphs.

For ``dialogue`` the text of a section is one JSON array of ``{"role": "user"|"assistant",
"content": str}`` messages (alternating, starting with ``user``, ending with ``assistant``): render
it with the model's chat template (``tokenizer.apply_chat_template(messages, tokenize=False)``).
The package reads both formats (``vllm_int4kv.policy.corpus``); ``parse_genre_file`` / ``genre_prompts``
here read a file by its path.

Sources (see ``NPM_SOURCES`` / ``PYPI_SOURCES``; licenses in the generated SOURCES.md files):

===============  ==========================================  ======================================
genre            calibration (shipped)                       held out (artifacts/data/genres)
===============  ==========================================  ======================================
speeches         SOTU 1962 Kennedy, 1986 Reagan (openings)   SOTU 2010-2021, one excerpt each
fiction          Moby-Dick ch. 1, 41 (openings)              Moby-Dick, 15 other chapters
long             Moby-Dick ch. 54 (whole, ~45k chars)        Moby-Dick ch. 3, 16; SOTU 1953 Truman
encyclopedic     World Factbook: France, Kenya               World Factbook: 14 other countries
technical        click docs: why.md, quickstart.md           other click docs; python-lz4 docs
code             click formatting.py, xxhash.c, underscore   other click, lz4 (C) and underscore
                 template/debounce/throttle (Python, C, JS)  files
dialogue         chatterbot-corpus: coding, psychology       chatterbot-corpus: other topics
mixed            (none: license unclear)                     Brown corpus, one text per category
===============  ==========================================  ======================================

Modules: ``genre_sources`` (the pinned sources, downloads, the file format, cutting text),
``genre_prose`` (builders: speeches, fiction, long, encyclopedic, mixed), ``genre_structured``
(builders: technical, code, dialogue); this one puts them together: ``build_all``, the overlap check,
SOURCES.md with the license texts, and ``write_genres`` (called by ``prepare_data.py``).
"""
from __future__ import annotations

import re
from pathlib import Path

from lm_eval_tasks import log, write_if_changed

# The pieces live in sibling modules; the names below are this module's API as before
# (``from genre_data import ...`` / ``genre_data.X`` keep working).
from genre_sources import (  # noqa: F401  (sources, downloads, the file format)
    FORMAT_DIALOGUE, FORMAT_TEXT, GENRES, HELDOUT_ONLY, NPM_SOURCES, PYPI_SOURCES, PYPI_SPEC, dialogue_messages,
    ensure_npm, ensure_pypi, genre_prompts, parse_genre_file, parse_genre_text, prompt_chars, read_members, render)
from genre_prose import build_encyclopedic, build_fiction, build_long, build_mixed, build_speeches, read_moby
from genre_structured import CLICK_PREFIX, LZ4_PREFIX, build_code, build_dialogue, build_technical


# ----------------------------------------------------------------------------------------------
# SOURCES.md and the license texts
# ----------------------------------------------------------------------------------------------
def license_texts(downloads: Path) -> list[tuple[str, str]]:
    """(what, verbatim license text) of the non-public-domain sources, read from the archives."""
    click = read_members(ensure_pypi(downloads, "click"), CLICK_PREFIX + "LICENSE.txt")
    lz4 = read_members(ensure_pypi(downloads, "lz4"), LZ4_PREFIX + "LICENSE")
    xx = read_members(ensure_pypi(downloads, "lz4"), LZ4_PREFIX + "lz4libs/xxhash.c")
    us = read_members(ensure_npm(downloads, "underscore"), "package/LICENSE")
    ch = read_members(ensure_pypi(downloads, "chatterbot"), "chatterbot_corpus-1.3.3/license.md")
    xx_head = next(iter(xx.values()))
    xx_head = xx_head[xx_head.index("/*") + 2:xx_head.index("*/")].strip("\n")
    return [
        ("click 8.5.1 (BSD-3-Clause), click-8.5.1/LICENSE.txt", next(iter(click.values()))),
        ("python-lz4 4.4.5 (BSD-3-Clause), lz4-4.4.5/LICENSE", next(iter(lz4.values()))),
        ("LZ4 library / xxHash as bundled in python-lz4 4.4.5 (BSD-2-Clause), header of lz4libs/xxhash.c "
         "(lz4libs/lz4*.c carry the same license, 'Copyright (C) 2011-2020, Yann Collet')", xx_head),
        ("underscore 1.13.8 (MIT), package/LICENSE", next(iter(us.values()))),
        ("chatterbot-corpus 1.3.3 (BSD-3-Clause), chatterbot_corpus-1.3.3/license.md", next(iter(ch.values()))),
    ]


def _sources_md(title: str, intro: list[str], built: dict[str, dict], part: str,
                licenses: list[tuple[str, str]] | None) -> str:
    out = [f"# {title}", "", *intro, ""]
    out += ["| file | genre | sections | characters |", "| --- | --- | ---: | ---: |"]
    for g, b in built.items():
        secs = b[part]
        if secs:
            out.append(f"| `{g}.txt` | {b['desc']} | {len(secs)} | {sum(len(t) for _, t in secs)} |")
    out.append("")
    for g, b in built.items():
        header = b["cal_header" if part == "calibration" else "held_header"]
        if not header or not b[part]:
            continue
        out += [f"## {g}", "", b["desc"] + ".", ""]
        out += [h for h in header]
        out.append("")
    used_for = {"stdlib": "speeches, fiction, long", "factbook": "encyclopedic", "underscore": "code",
                "brown": "mixed (held out only, never shipped)", "click": "technical, code",
                "lz4": "code (held out: technical too)", "chatterbot": "dialogue"}
    out += ["## Sources", "",
            "| package | registry | file | sha256 | genres |", "| --- | --- | --- | --- | --- |"]
    for key, (spec, name, sha) in NPM_SOURCES.items():
        out.append(f"| `{spec}` | npm | {name} | `{sha}` | {used_for[key]} |")
    for key, (_, name, sha) in PYPI_SOURCES.items():
        out.append(f"| `{PYPI_SPEC[key]}` | PyPI | {name} | `{sha}` | {used_for[key]} |")
    out.append("")
    out += ["Considered and not used: RFC text (the IETF Trust's legal provisions allow copying RFCs but",
            "not modified or excerpted reuse of their prose outside the IETF process; only code components",
            "are BSD-licensed), the npm package `nlp-corpus` (its README asks not to republish its texts",
            "commercially), the Brown corpus for shipping (license unclear, see `mixed`), Wikipedia-derived",
            "text (CC-BY-SA, share-alike).", ""]
    if licenses:
        out += ["## License texts of the non-public-domain sources", "",
                "The excerpts keep these notices: each calibration file's header names its copyright holder",
                "and license, and the full texts follow.", ""]
        for what, text in licenses:
            out += [f"### {what}", "", "```", text.strip("\n"), "```", ""]
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------
# entry point (called by prepare_data.py)
# ----------------------------------------------------------------------------------------------
def build_all(sotu: dict[str, dict], downloads: Path) -> dict[str, dict]:
    stdlib = ensure_npm(downloads, "stdlib")
    moby = read_moby(stdlib)
    click, lz4 = ensure_pypi(downloads, "click"), ensure_pypi(downloads, "lz4")
    built = {
        "speeches": build_speeches(sotu),
        "fiction": build_fiction(moby),
        "long": build_long(moby, sotu),
        "encyclopedic": build_encyclopedic(ensure_npm(downloads, "factbook")),
        "technical": build_technical(click, lz4),
        "code": build_code(click, lz4, ensure_npm(downloads, "underscore")),
        "dialogue": build_dialogue(ensure_pypi(downloads, "chatterbot")),
        "mixed": build_mixed(ensure_npm(downloads, "brown")),
    }
    assert list(built) == GENRES + HELDOUT_ONLY
    return built


def _header(genre: str, b: dict, part: str) -> list[str]:
    shipped = part == "calibration"
    fmt = FORMAT_DIALOGUE if genre == "dialogue" else FORMAT_TEXT
    head = [f"vllm-int4kv {'calibration' if shipped else 'HELD-OUT evaluation'} text, genre '{genre}': {b['desc']}."]
    head += b["cal_header" if shipped else "held_header"]
    if shipped:
        head += ["Held out (not shipped): scripts/prepare_data.py writes other text of this genre to",
                 f"  artifacts/data/genres/{genre}.txt; it never shares a 200-character window with this file."]
    else:
        head += ["Not shipped. Never shares a 200-character window with the shipped calibration text",
                 "  (vllm_int4kv/data/calibration/*.txt)."]
    return head + fmt + ["Generated by scripts/prepare_data.py -- do not edit by hand."]


def render_all(built: dict[str, dict], licenses: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """({file name: text} of the shipped calibration folder, {file name: text} of the held-out one)."""
    cal, held = {}, {}
    for g, b in built.items():
        if b["calibration"]:
            cal[f"{g}.txt"] = render(_header(g, b, "calibration"), b["calibration"])
        held[f"{g}.txt"] = render(_header(g, b, "heldout"), b["heldout"])
    cal["SOURCES.md"] = _sources_md(
        "Genre calibration text shipped with vllm-int4kv", [
            "Generated by `scripts/prepare_data.py` (module `scripts/genre_data.py`) from packages fetched",
            "through the registries at pinned versions (sha256 below). One file per genre; format in each",
            "file's header (`=== title ===` sections, text verbatim; `dialogue.txt` holds JSON message lists",
            "for a chat template). The held-out text of each genre is written, not shipped, to",
            "`artifacts/data/genres/` and never overlaps these files (no shared 200-character window)."],
        {g: b for g, b in built.items() if b["calibration"]}, "calibration", licenses)
    held["SOURCES.md"] = _sources_md(
        "Held-out genre text (generated by scripts/prepare_data.py; not shipped)", [
            "Per genre, text of the same genre as the shipped calibration files but from other documents",
            "(other addresses, chapters, countries, files, topics), to check that a layout chosen on the",
            "calibration prompts holds on every genre. `mixed.txt` (Brown corpus) has no shipped",
            "counterpart: a genre the calibration never saw."],
        built, "heldout", licenses)
    return cal, held


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def shared_window(shipped: set[str], text: str, width: int = 200) -> str | None:
    """The first ``width``-character window of ``text`` (whitespace-normalized) found in ``shipped``."""
    s = _norm(text)
    for i in range(0, max(1, len(s) - width + 1)):
        if s[i:i + width] in shipped:
            return s[i:i + width]
    return None


def windows(texts: list[str], width: int = 200) -> set[str]:
    out: set[str] = set()
    for text in texts:
        s = _norm(text)
        out |= {s[i:i + width] for i in range(0, max(1, len(s) - width + 1))}
    return out


def write_genres(sotu: dict[str, dict], downloads: Path, cal_dir: Path, held_dir: Path,
                 check_only: bool = False) -> bool:
    """Write (or, with ``check_only``, compare) both parts; returns True when all is up to date.

    A held-out excerpt that shares a 200-character window with any shipped calibration text (boiler-
    plate comments repeated across files of one project, say) is dropped, and named in the log."""
    built = build_all(sotu, downloads)
    shipped_texts = [t for b in built.values() for _, t in b["calibration"]]
    shipped = windows(shipped_texts)
    for g, b in built.items():
        keep = []
        for title, text in b["heldout"]:
            hit = shared_window(shipped, text)
            if hit is None:
                keep.append((title, text))
            else:
                log(f"held-out {g}: dropped {title!r} (shares {hit[:60]!r}... with the calibration text)")
        b["heldout"] = keep
    cal, held = render_all(built, license_texts(downloads))
    if check_only:
        ok = True
        for n, text in cal.items():
            p = cal_dir / n
            if not (p.exists() and p.read_text(encoding="utf-8") == text):
                log(f"genre calibration file STALE or missing: {p}")
                ok = False
        return ok
    for n, text in cal.items():
        changed = write_if_changed(cal_dir / n, text)
        log(f"genre calibration: {cal_dir / n} ({len(text.encode())} bytes, {'written' if changed else 'unchanged'})")
    for n, text in held.items():
        write_if_changed(held_dir / n, text)
    total = sum(len(t.encode()) for n, t in held.items() if n.endswith(".txt"))
    log(f"held-out genre text: {held_dir} ({len(held) - 1} genres, {total} bytes)")
    return True


def main_check(path: Path) -> None:  # pragma: no cover - a helper for a quick look by hand
    header, sections = parse_genre_file(path)
    print("\n".join(header))
    for t, s in sections:
        print(f"{t}: {len(s)} chars")


if __name__ == "__main__":  # pragma: no cover
    import sys

    for arg in sys.argv[1:]:
        main_check(Path(arg))
