"""A progress bar on stderr, shared by the commands (benchmark grid, prefill of long prompts)."""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.perf_counter()

    def step(self, label: str, advance: int = 1) -> None:
        self.update(self.done + advance, label)

    def update(self, done: int, label: str) -> None:
        self.done = done
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        width = 30
        bar = "#" * round(width * self.done / max(self.total, 1))
        line = f"[{bar:<{width}}] {self.done}/{self.total} {label} | {elapsed:.0f}s elapsed, ~{eta:.0f}s left"
        end = "\r" if sys.stderr.isatty() and self.done < self.total else "\n"
        print(line[:160].ljust(160) if end == "\r" else line, end=end, file=sys.stderr, flush=True)
