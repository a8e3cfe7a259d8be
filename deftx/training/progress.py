"""Progress lines for long work: step, loss, rate and time left, at most every few seconds."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Prints ``[label] step i/n loss x lr y  (r it/s, eta t)`` to a sink (stderr by default)."""

    def __init__(self, label: str, total: int, sink: Callable[[str], None] | None = None,
                 min_interval: float = 5.0, quiet_for: float = 0.0, unit: str = "step") -> None:
        """``quiet_for``: print nothing until the work has lasted that long (then as usual, and the
        last line), so short work stays silent."""
        self.label, self.total, self.unit = label, total, unit
        self.quiet_for, self.printed = quiet_for, False
        self.sink = sink or (lambda line: print(line, file=sys.stderr, flush=True))
        self.min_interval = min_interval
        self.start = self.last = time.perf_counter()
        self.first_step: int | None = None
        self.rate = 0.0   # steps per second since the first update

    def update(self, step: int, **values: float) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = step - 1
        self.rate = (step - self.first_step) / max(now - self.start, 1e-9)
        done = step == self.total
        if now - self.start < self.quiet_for and not (done and self.printed):
            return
        if not done and now - self.last < self.min_interval and step != self.first_step + 1 and self.printed:
            return
        self.last, self.printed = now, True
        rate = self.rate
        eta = (self.total - step) / rate if rate > 0 else 0.0
        parts = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        tail = f"done in {_fmt_seconds(now - self.start)}" if done else f"eta {_fmt_seconds(eta)}"
        parts = f" {parts}" if parts else ""
        self.sink(f"[{self.label}] {self.unit} {step}/{self.total}{parts} ({rate:.2f} it/s, {tail})")
