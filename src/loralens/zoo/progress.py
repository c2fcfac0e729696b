"""What a zoo build tells the user while it runs, on stderr: log lines and a progress bar."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def log_stderr(msg: str) -> None:
    """Print one line to stderr at once (the default log of builds, merges and presets)."""
    print(msg, file=sys.stderr, flush=True)


class ProgressBar:
    """A one-line progress bar with ETA and LoRAs/minute (plain lines when not on a terminal)."""

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        every_s: float = 15.0,
    ):
        self.total, self.done = total, 0
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.time()
        self.last = 0.0
        self.every_s = every_s

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished LoRAs; redraw (on a terminal) or print every ``every_s``."""
        self.done += n
        now = time.time()
        if not self.enabled:
            return
        if self.tty or now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        """The bar, counts, rate, elapsed time and ETA as one line of text."""
        elapsed = (now or time.time()) - self.start
        rate = self.done / elapsed * 60 if elapsed > 0 else 0.0
        left = (self.total - self.done) / (rate / 60) if rate > 0 else math.inf
        width = 28
        fill = int(width * self.done / self.total) if self.total else width
        bar = "#" * fill + "-" * (width - fill)
        eta = _hms(left) if math.isfinite(left) else "?"
        return (
            f"[{bar}] {self.done}/{self.total} LoRAs  {rate:.1f} LoRAs/min  "
            f"elapsed {_hms(elapsed)}  ETA {eta}"
        )

    def _print(self, now: float) -> None:
        end = "" if self.tty and self.done < self.total else "\n"
        prefix = "\r" if self.tty else ""
        print(prefix + self.line(now), end=end, file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
