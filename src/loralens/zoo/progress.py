"""What a zoo build tells the user while it runs, on stderr: log lines and a progress bar; and
:func:`silence_libraries`, which keeps the libraries it uses quiet under ``--quiet``."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import time
from collections.abc import Iterator
from typing import TextIO


def log_stderr(msg: str) -> None:
    """Print one line to stderr at once (the default log of builds, merges and presets)."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def silence_libraries() -> Iterator[None]:
    """Turn off the progress bars (tqdm) and info/warning logs of transformers, diffusers and
    huggingface_hub for the block, and restore their settings after. Only installed libraries
    are touched; they are imported here so that their later first use is silenced too."""
    restore = []
    for lib in ("transformers", "diffusers"):
        if importlib.util.find_spec(lib) is None:
            continue
        logging = importlib.import_module(f"{lib}.utils.logging")
        bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
        logging.disable_progress_bar()
        logging.set_verbosity_error()
        restore.append((logging, bars, level))
    hub = None
    if importlib.util.find_spec("huggingface_hub") is not None:
        hub = importlib.import_module("huggingface_hub.utils")
        hub_bars = not hub.are_progress_bars_disabled()
        if hub_bars:
            hub.disable_progress_bars()
    try:
        yield
    finally:
        for logging, bars, level in restore:
            logging.set_verbosity(level)
            if bars:
                logging.enable_progress_bar()
        if hub is not None and hub_bars:
            hub.enable_progress_bars()


class ProgressBar:
    """A one-line progress bar with LoRAs/minute and ETA (plain lines when not on a terminal).

    The rate and ETA appear once ``eta_after`` LoRAs are done (the builder passes its group
    size): LoRAs finish in bursts, one group per preset call, so earlier rates mislead.
    """

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        every_s: float = 15.0,
        eta_after: int = 1,
    ):
        self.total, self.done = total, 0
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.time()
        self.last = 0.0
        self.every_s = every_s
        self.eta_after = min(max(1, eta_after), max(1, total))

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
        width = 28
        fill = int(width * self.done / self.total) if self.total else width
        head = f"[{'#' * fill}{'-' * (width - fill)}] {self.done}/{self.total} LoRAs  "
        rate = self.done / elapsed * 60 if elapsed > 0 else 0.0
        if self.done < self.eta_after or rate <= 0:
            return head + f"elapsed {_hms(elapsed)}  ETA after the first {self.eta_after} LoRAs"
        left = (self.total - self.done) / (rate / 60)
        return head + f"{rate:.1f} LoRAs/min  elapsed {_hms(elapsed)}  ETA {_hms(left)}"

    def _print(self, now: float) -> None:
        end = "" if self.tty and self.done < self.total else "\n"
        prefix = "\r" if self.tty else ""
        print(prefix + self.line(now), end=end, file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
