"""Progress of long calibrations: steps done, time spent, and an estimate of the time left.

A calibration on CPU can take many minutes; without this, it prints nothing until it ends. The
``report`` callable decides where lines go: stderr for the command line (so ``--json`` output on
stdout stays clean), the engine's log at start-up.
"""
from __future__ import annotations

import sys
import time
from typing import Callable


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """Counts the steps of one stage (``total`` of them, if known) and reports each as it ends.

    Lines are rate limited to one per ``every`` seconds, except the first and last of a stage."""

    def __init__(self, report: Callable[[str], None] | None = None, label: str = "calibration",
                 every: float = 5.0):
        self.report, self.label, self.every = report, label, every
        self.started = time.monotonic()
        self._stage, self._total, self._done = "", None, 0
        self._stage_started, self._last = self.started, 0.0

    def stage(self, name: str, total: int | None = None) -> None:
        self._stage, self._total, self._done = name, total, 0
        self._stage_started = time.monotonic()
        self._say(f"{name}: {'' if total is None else f'{total} measurements, '}started")

    def step(self, what: str) -> None:
        self._done += 1
        now = time.monotonic()
        last = self._total is not None and self._done >= self._total
        if not (last or self._done == 1 or now - self._last >= self.every):
            return
        done = f"{self._done}/{self._total}" if self._total else str(self._done)
        line = f"{self._stage}: {done} ({what}), {_duration(now - self.started)} elapsed"
        if self._total and not last:
            per_step = (now - self._stage_started) / self._done
            line += f", about {_duration(per_step * (self._total - self._done))} left in this stage"
        self._say(line)

    def _say(self, line: str) -> None:
        self._last = time.monotonic()
        if self.report is not None:
            self.report(f"[{self.label}] {line}")


SILENT = Progress(None)
