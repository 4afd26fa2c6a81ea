"""Progress reporting on stderr: named stages with elapsed time, and a counter for long
loops. Off when a machine reads the output (--json) or when asked (quiet=True); stdout
carries the result only."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """`with progress.stage("tracing"):` prints 'tracing ...' then 'tracing done (3.2 s)'."""
        t0 = time.perf_counter()
        self._write(f"{name} ...", end="\r" if self._tty else "\n")
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = round(dt, 3)
        self._write(f"{name} done ({dt:.1f} s)")

    def count(self, name: str, i: int, n: int) -> None:
        """A one-line counter, redrawn in place on a terminal."""
        if self._tty:
            self._write(f"{name} {i}/{n}", end="\n" if i == n else "\r")
        elif i == n:
            self._write(f"{name} {i}/{n}")

    @property
    def _tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def _write(self, text: str, end: str = "\n") -> None:
        if self.enabled:
            self.stream.write(f"\x1b[2K{text}{end}" if self._tty else f"{text}{end}")
            self.stream.flush()


NULL = Progress(enabled=False)
