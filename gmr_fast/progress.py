"""Progress reporting shared by the Reranker, the score CLI and training."""

from __future__ import annotations

import sys
import time


class Progress:
    """Pairs done, pairs/s and ETA on stderr; silent unless enabled. On a terminal one line is
    redrawn in place; in a log (a pipe or file) a full line is written every ``interval``
    seconds, so a long job leaves a readable trail instead of thousands of carriage returns."""

    def __init__(self, total: int, enabled: bool, label: str = "", interval: float = 5.0):
        self.total, self.enabled, self.label = total, enabled, label
        self.tty = enabled and sys.stderr.isatty()
        self.interval = 0.2 if self.tty else interval
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()
        self.suffix = ""  # extra figures appended to each line (e.g. training loss)
        self.unit = "pairs"

    def line(self) -> str:
        now = time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"{self.label}{self.done}/{self.total} {self.unit}  {rate:.1f} {self.unit}/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}{self.suffix}")

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            if self.tty:
                print("\r" + self.line(), end="", file=sys.stderr, flush=True)
            else:
                print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.done and self.tty:
            print(file=sys.stderr, flush=True)
