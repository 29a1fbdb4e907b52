"""A dependency-free progress line for long work: amount done, rate and ETA, on stderr."""

from __future__ import annotations

import sys
import time


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_count(n: float) -> str:
    return f"{n:.0f}" if abs(n) < 1000 else f"{n / 1000:.1f}k"


class Progress:
    """Redraws in place on a terminal; elsewhere prints a line every ``log_every_s`` seconds.

    ``fmt`` formats amounts (bytes by default); ``postfix`` is free text shown after the ETA.
    """

    def __init__(self, total: int, label: str, *, fmt=format_bytes, unit: str = "", stream=None,
                 log_every_s: float = 10.0, enabled: bool = True):
        self.total = max(total, 1)
        self.fmt = fmt
        self.unit = unit
        self.postfix = ""
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._last = self._start
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._every = 0.2 if self._tty else log_every_s

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last >= self._every or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = min(self.done / self.total, 1.0)
        line = (f"{self.label} {frac:6.1%} {self.fmt(self.done)}/{self.fmt(self.total)}{self.unit} "
                f"{self.fmt(rate)}{self.unit}/s ETA {eta:5.0f}s {self.postfix}")
        self.stream.write(("\r" + line) if self._tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
