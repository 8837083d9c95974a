"""The calibration text shipped with the package, by genre (pure Python; no torch, no vLLM).

``data/calibration/<genre>.txt``: speeches, fiction, encyclopedic and technical prose, source code, chat
dialogue, and one long document; each file's header names its source and licence (all public domain or
permissive; ``data/calibration/SOURCES.md``). ``scripts/prepare_data.py`` makes them, and writes held-out
text of the same genres (never shipped, never overlapping) to ``artifacts/data/genres/``.

File format: ``#`` header lines, then one ``=== title ===`` line per prompt followed by its text, verbatim
(code keeps its indentation). A dialogue file holds, per prompt, one JSON array of ``{"role", "content"}``
messages, rendered with the model's chat template.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "data" / "calibration"
GENRES = ("speeches", "fiction", "encyclopedic", "technical", "code", "dialogue")  # short prompts
LONG = "long"  # one document of several thousand tokens
EVAL_CORPUS_NAME = "sotu_2010_2021.txt"
SECTION_RE = re.compile(r"^=== (.+) ===$")

Prompt = "str | list[dict[str, str]]"  # text, or chat messages


def parse_genre_text(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """``(header lines without '#', [(title, text), ...])`` of a genre file."""
    header: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.split("\n"), 1):
        match = SECTION_RE.match(line)
        if match:
            sections.append((match.group(1).strip(), []))
        elif not sections:
            if line.startswith("#"):
                header.append(line[1:].strip())
            elif line.strip():
                raise ValueError(f"line {number}: text before the first '=== title ===' line")
        else:
            sections[-1][1].append(line)
    return header, [(title, "\n".join(lines).strip("\n")) for title, lines in sections]


def dialogue_messages(section_text: str) -> list[dict[str, str]]:
    """The messages of one dialogue section, checked (roles alternate user/assistant, assistant last)."""
    messages = json.loads(section_text)
    if not messages or not isinstance(messages, list):
        raise ValueError("a dialogue section must be a non-empty JSON array")
    for i, message in enumerate(messages):
        role = ("user", "assistant")[i % 2]
        if not isinstance(message, dict) or set(message) != {"role", "content"} or message["role"] != role \
                or not isinstance(message["content"], str):
            raise ValueError(f"message {i}: expected role {role!r} and a content string")
    if messages[-1]["role"] != "assistant":
        raise ValueError("a dialogue must end with an assistant message")
    return messages


def genre_file(genre: str, directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or CALIBRATION_DIR) / f"{genre}.txt"


def genre_prompts(genre: str, directory: str | os.PathLike | None = None) -> list[Prompt]:
    """The prompts of one genre, in file order: strings, or message lists for the dialogue genre."""
    path = genre_file(genre, directory)
    header, sections = parse_genre_text(path.read_text(encoding="utf-8"))
    if not sections:
        raise ValueError(f"{path} holds no '=== title ===' section")
    is_dialogue = any("chat template" in line for line in header)
    return [dialogue_messages(text) if is_dialogue else text for _, text in sections]


def calibration_set(per_genre: int = 1, long: bool = True,
                    directory: str | os.PathLike | None = None) -> list[tuple[str, Prompt]]:
    """``(genre, prompt)`` pairs: the first ``per_genre`` prompts of every genre, then the long document."""
    chosen = []
    for genre in GENRES:
        prompts = genre_prompts(genre, directory)
        if len(prompts) < per_genre:
            raise ValueError(f"genre {genre} has {len(prompts)} calibration prompts, asked for {per_genre}")
        chosen += [(genre, prompt) for prompt in prompts[:per_genre]]
    if long:
        chosen.append((LONG, genre_prompts(LONG, directory)[0]))
    return chosen


def load_eval_corpus(path: str | os.PathLike) -> str:
    """The evaluation text. ``path`` is the text file, or the directory ``prepare_data.py`` wrote
    (``artifacts/data``), in which case ``sotu_2010_2021.txt`` inside it is read."""
    p = Path(path)
    if p.is_dir():
        p = p / EVAL_CORPUS_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: run `python scripts/prepare_data.py` to create it")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{p} is empty")
    return text
