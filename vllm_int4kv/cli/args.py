"""Argument types shared by the subcommands.

Each one rejects what cannot be meant at parse time, so argparse answers ``argument --context: must be
>= 1, got 0`` before a model loads or an engine starts, instead of a traceback (or a meaningless table)
at the end of a long run. Output paths are checked up front for the same reason.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {expected}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _named(parse, name: str):
    parse.__name__ = name  # argparse shows it in "invalid <name> value"
    return parse


def at_least(minimum, kind: type = int):
    """A number >= ``minimum`` (finite, for floats)."""
    def parse(text: str):
        value = _number(kind, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return _named(parse, "count" if kind is int else "number")


def above(minimum: float):
    """A finite number > ``minimum``."""
    def parse(text: str) -> float:
        value = _number(float, text)
        if not value > minimum:
            raise argparse.ArgumentTypeError(f"must be > {minimum:g}, got {text}")
        return value
    return _named(parse, "number")


def fraction(text: str) -> float:
    """A share in (0, 1], such as vLLM's --gpu-memory-utilization."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (0.9 means 90 %), got {text}")
    return value


def count_list(text: str) -> list[int]:
    """``64,512,1536`` -> [64, 512, 1536]; every entry >= 1."""
    parse = at_least(1)
    values = [parse(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one count, such as 64,512")
    return values


def counts_or_none(text: str) -> list[int]:
    """``count_list``, or ``none`` for no entries (a check turned off)."""
    return [] if text.strip().lower() in ("", "none") else count_list(text)


def input_folder(text: str) -> str:
    """An existing folder; returned with ``~`` expanded."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return str(path)


def input_file(text: str) -> str:
    """An existing file; returned with ``~`` expanded (a shell leaves ``--x=~/f`` alone)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return str(path)


def _writable_folder(folder: Path, what: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{what}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{what}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{what}: cannot write in {folder}")


def output_file(text: str) -> str:
    """A file that can be written (its folder exists and is writable; it is not a folder)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name")
    if path.exists():  # overwritten in place: only the file itself must be writable
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot overwrite {text}")
    else:
        _writable_folder(path.parent, text)
    return str(path)


def output_folder(text: str) -> str:
    """A folder that exists and is writable, or can be made inside one that does."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file: give a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    _writable_folder(existing, text)
    return str(path)
