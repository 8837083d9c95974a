"""Genre builders for the genres with structure (for ``genre_data``): technical (Markdown and
reStructuredText docs of click and python-lz4), code (Python, C and JavaScript from click, lz4 and
underscore) and dialogue (chatterbot-corpus exchanges as chat message lists).

Each builder returns {"calibration": [(title, text)], "heldout": [(title, text)], "cal_header":
[...], "held_header": [...]} (plus "desc", one line on the genre). Headers name the source, the license
and what was taken.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from genre_sources import (CAL_MAX, CAL_MIN, HELD_MAX, HELD_MIN, _clean, _src, _strip_license_comment, chunks,
                           read_members, take_lines)


CLICK_PREFIX = "click-8.5.1/"
LZ4_PREFIX = "lz4-4.4.5/"
TECH_CAL = ["docs/why.md", "docs/quickstart.md"]
TECH_HELD_CLICK = ["docs/options.md", "docs/commands.md", "docs/advanced.md", "docs/complex.md",
                   "docs/shell-completion.md", "docs/utils.md", "docs/exceptions.md", "docs/documentation.md",
                   "docs/unicode-support.md", "docs/parameter-types.md", "docs/faqs.md"]
TECH_HELD_LZ4 = ["docs/quickstart.rst", "docs/lz4.frame.rst", "docs/install.rst"]
CLICK_LICENSE = ["License: BSD-3-Clause (click-8.5.1/LICENSE.txt: 'Copyright 2014 Pallets ... Redistribution and",
                 "  use in source and binary forms, with or without modification, are permitted provided that",
                 "  ...'); the copyright notice and full license text are in SOURCES.md beside this file."]
LZ4_LICENSE = ["License: python-lz4 (lz4/, docs/): BSD-3-Clause, 'Copyright (c) 2012-2013, Steeve Morin'",
               "  (lz4-4.4.5/LICENSE); LZ4 library (lz4libs/): BSD-2-Clause, 'Copyright (C) 2011-2020, Yann",
               "  Collet' (header of each lz4libs/*.c file). Full texts in SOURCES.md."]
US_LICENSE = ["License: MIT, 'Copyright (c) 2009-2022 Jeremy Ashkenas, Julian Gonggrijp, and DocumentCloud and",
              "  Investigative Reporters & Editors' (package/LICENSE). Full text in SOURCES.md."]


def build_technical(click_tar: Path, lz4_tar: Path) -> dict:
    click = read_members(click_tar, CLICK_PREFIX, (".md",))
    lz4 = read_members(lz4_tar, LZ4_PREFIX, (".rst",))
    cal = [(f"click 8.5.1 documentation, {p}", take_lines(_clean(click[p]).split("\n"), CAL_MIN, CAL_MAX)[0])
           for p in TECH_CAL]
    held = []
    for p in TECH_HELD_CLICK:
        for j, c in enumerate(chunks(_clean(click[p]).split("\n"), 2, HELD_MIN, HELD_MAX, True)):
            held.append((f"click 8.5.1 documentation, {p} (part {j + 1})", c))
    for p in TECH_HELD_LZ4:
        for j, c in enumerate(chunks(_clean(lz4[p]).split("\n"), 2, HELD_MIN, HELD_MAX, True)):
            held.append((f"python-lz4 4.4.5 documentation, {p} (part {j + 1})", c))
    return {
        "desc": "technical prose: software documentation (Markdown / reStructuredText with code examples)",
        "cal_header": [f"Source: {_src('click')},", "  " + ", ".join(CLICK_PREFIX + p for p in TECH_CAL) + "."]
        + CLICK_LICENSE + [
            "Taken: the opening ~3,000 characters of each file (whole lines, cut at a blank line outside a",
            "  code fence), verbatim."],
        "held_header": [f"Source: {_src('click')}, {CLICK_PREFIX}docs/*.md;",
                        f"  and {_src('lz4')}, {LZ4_PREFIX}docs/*.rst."] + CLICK_LICENSE + LZ4_LICENSE + [
            "Taken: up to two consecutive ~4,500-character excerpts from the start of each of the click docs "
            + ", ".join(p[5:] for p in TECH_HELD_CLICK) + " and the python-lz4 docs "
            + ", ".join(p[5:] for p in TECH_HELD_LZ4) + " (other files than the shipped calibration text)."],
        "calibration": cal, "heldout": held,
    }


CODE_CAL_PY = "src/click/formatting.py"
CODE_CAL_C = "lz4libs/xxhash.c"
CODE_CAL_C_FROM = "*  32-bit hash functions"  # the excerpt starts at this section (code, not build switches)
CODE_CAL_JS = ["template.js", "debounce.js", "throttle.js"]
CODE_HELD_PY = ["src/click/core.py", "src/click/parser.py", "src/click/types.py", "src/click/termui.py",
                "src/click/decorators.py", "src/click/testing.py"]
CODE_HELD_C = ["lz4libs/lz4.c", "lz4libs/lz4hc.c", "lz4libs/lz4frame.c", "lz4/frame/_frame.c", "lz4/block/_block.c"]
US_PREFIX = "package/modules/"


def _js_concat(files: dict[str, str], names: list[str]) -> list[str]:
    lines: list[str] = []
    for n in names:
        lines += [f"// ---- underscore/modules/{n} ----"] + _clean(files[n]).split("\n") + [""]
    return lines


def build_code(click_tar: Path, lz4_tar: Path, us_tar: Path) -> dict:
    click = read_members(click_tar, CLICK_PREFIX, (".py",))
    lz4 = read_members(lz4_tar, LZ4_PREFIX, (".c", ".h"))
    us = read_members(us_tar, US_PREFIX, (".js",))
    c_lines = _clean(lz4[CODE_CAL_C]).split("\n")
    c_lines = c_lines[next(i for i, line in enumerate(c_lines) if line.startswith(CODE_CAL_C_FROM)) - 1:]
    cal = [
        (f"Python: click 8.5.1 {CODE_CAL_PY}",
         take_lines(_clean(click[CODE_CAL_PY]).split("\n"), CAL_MIN, CAL_MAX)[0]),
        (f"C: lz4 4.4.5 {CODE_CAL_C} (the 32-bit hash section)", take_lines(c_lines, CAL_MIN, CAL_MAX)[0]),
        ("JavaScript: underscore 1.13.8 modules/" + ", ".join(CODE_CAL_JS),
         take_lines(_js_concat(us, CODE_CAL_JS), CAL_MIN, CAL_MAX)[0]),
    ]
    held = []
    for p in CODE_HELD_PY:
        lines = _clean(click[p]).split("\n")
        n = 3 if p.endswith("core.py") else 1
        step = max(1, len(lines) // n)
        for j in range(n):
            for c in chunks(lines, 1, HELD_MIN, HELD_MAX, True, skip=j * step):
                held.append((f"Python: click 8.5.1 {p} (from line {j * step + 1})", c))
    for p in CODE_HELD_C:
        lines = _clean(_strip_license_comment(lz4[p])).split("\n")
        n = 3 if p == "lz4libs/lz4.c" else 2 if p.endswith("lz4frame.c") else 1
        step = max(1, len(lines) // n)
        for j in range(n):
            for c in chunks(lines, 1, HELD_MIN, HELD_MAX, True, skip=j * step):
                held.append((f"C: lz4 4.4.5 {p} (from line {j * step + 1} after the license comment)", c))
    rest = sorted(n for n in us if n not in CODE_CAL_JS and n != "index.js" and not n.startswith("_"))
    for j, c in enumerate(chunks(_js_concat(us, rest), 4, HELD_MIN, HELD_MAX, True)):
        held.append((f"JavaScript: underscore 1.13.8 modules (alphabetical, part {j + 1})", c))
    return {
        "desc": "source code: Python, C and JavaScript",
        "cal_header": [f"Source: {_src('click')}, {CLICK_PREFIX}{CODE_CAL_PY};",
                       f"  {_src('lz4')}, {LZ4_PREFIX}{CODE_CAL_C};",
                       f"  {_src('underscore')},",
                       "  " + ", ".join(US_PREFIX + n for n in CODE_CAL_JS) + "."]
        + CLICK_LICENSE + LZ4_LICENSE + US_LICENSE + [
            "Taken: ~3,000 characters of each: the start of formatting.py; xxhash.c from its '32-bit hash",
            "  functions' section (BSD-2-Clause, 'Copyright (C) 2012-2016, Yann Collet'; the notice is",
            "  reproduced in SOURCES.md);",
            "  the three underscore modules concatenated, each after a '// ---- underscore/modules/<file> ----'",
            "  line added here. Verbatim otherwise (trailing spaces removed)."],
        "held_header": [f"Source: {_src('click')}, {CLICK_PREFIX}src/click/*.py;",
                        f"  {_src('lz4')}, {LZ4_PREFIX}lz4libs/*.c, lz4/*/_*.c;",
                        f"  {_src('underscore')}, {US_PREFIX}*.js."] + CLICK_LICENSE + LZ4_LICENSE + US_LICENSE + [
            "Taken: ~4,500-character excerpts (whole lines, cut at a blank line) of click "
            + ", ".join(p.split("/")[-1] for p in CODE_HELD_PY) + "; of lz4 " + ", ".join(CODE_HELD_C)
            + " (after the license comment); and of the other underscore modules (not index.js nor _*.js),",
            "  concatenated alphabetically. Never the files of the shipped calibration text."],
        "calibration": cal, "heldout": held,
    }


CHATTER_PREFIX = "chatterbot_corpus-1.3.3/chatterbot_corpus/data/english/"
DIALOGUE_CAL = ["coding.yml", "psychology.yml"]


def _chatter_pairs(text: str) -> list[list[str]]:
    import yaml  # PyYAML (a dependency of lm-eval); BaseLoader keeps 'yes'/'no' as strings

    doc = yaml.load(text, Loader=yaml.BaseLoader)
    out, seen = [], set()
    for conv in doc.get("conversations", []):
        turns = [re.sub(r"[ \t]+\n", "\n", str(t)).strip() for t in conv]
        if len(turns) % 2:
            turns = turns[:-1]  # a conversation must end with the assistant
        key = tuple(turns)
        if len(turns) >= 2 and all(turns) and key not in seen:
            seen.add(key)
            out.append(turns)
    return out


def _conversations(pairs: list[list[str]], lo: int, hi: int, n: int) -> list[list[dict[str, str]]]:
    convs, cur, total = [], [], 0
    for turns in pairs:
        size = sum(len(t) for t in turns)
        if cur and total + size > hi:
            if total >= lo * 0.6:
                convs.append(cur)
            cur, total = [], 0
            if len(convs) == n:
                break
        cur += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        total += size
        if total >= lo:
            convs.append(cur)
            cur, total = [], 0
            if len(convs) == n:
                break
    if cur and total >= lo * 0.6 and len(convs) < n:
        convs.append(cur)
    return convs


def build_dialogue(chatter_tar: Path) -> dict:
    files = read_members(chatter_tar, CHATTER_PREFIX, (".yml",))
    cal = []
    used: set[str] = set()
    for name in DIALOGUE_CAL:
        conv = _conversations(_chatter_pairs(files[name]), CAL_MIN, CAL_MAX, 1)[0]
        used |= {m["content"] for m in conv}
        cal.append((f"chatterbot-corpus english/{name}, first exchanges", json.dumps(conv, ensure_ascii=False)))
    held = []
    for name in sorted(files):
        pairs = [p for p in _chatter_pairs(files[name]) if not used & set(p)]
        for j, conv in enumerate(_conversations(pairs, HELD_MIN, HELD_MAX, 3)):
            held.append((f"chatterbot-corpus english/{name} (part {j + 1})", json.dumps(conv, ensure_ascii=False)))
    lic = ["License: BSD-3-Clause (chatterbot_corpus-1.3.3/license.md: 'Copyright (c) 2017, Gunther Cox All",
           "  rights reserved. Redistribution and use in source and binary forms, with or without",
           "  modification, are permitted provided that ...'; PKG-INFO: 'License :: OSI Approved :: BSD",
           "  License'). Full text in SOURCES.md."]
    return {
        "desc": "dialogue: chat-style user/assistant exchanges, to be rendered with a model's chat template",
        "cal_header": [f"Source: {_src('chatterbot')},",
                       "  " + ", ".join(CHATTER_PREFIX + n for n in DIALOGUE_CAL) + "."] + lic + [
            "Taken: the first distinct exchanges of each file (in file order, exact duplicates dropped)",
            "  joined into one multi-turn conversation of >= 2,600 characters of message text."],
        "held_header": [f"Source: {_src('chatterbot')}, {CHATTER_PREFIX}*.yml."] + lic + [
            "Taken: from every English file, its distinct exchanges (none that shares a message with the",
            "  shipped calibration text) joined into up to three conversations of ~4,000-5,000 characters.",
            "  Note: the corpus is short chatbot-style Q&A (a few files, e.g. coding.yml, hold longer answers)."],
        "calibration": cal, "heldout": held,
    }
