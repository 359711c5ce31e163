"""A one-line progress display for long loops; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Redraws `label done/total [fields] ETA` in place at most a few times a second."""

    def __init__(self, total: int | None, label: str = "", enabled: bool | None = None, start: int = 0):
        self.total, self.label = total, label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start_done, self.start_time, self.last_draw = start, time.monotonic(), 0.0

    def update(self, done: int, **fields: object) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last_draw < 0.2:
            return
        self.last_draw = now
        rate = (done - self.start_done) / max(now - self.start_time, 1e-9)
        parts = [f"{self.label} {done}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        if self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - done) / rate)}")
        sys.stderr.write("\r" + "  ".join(parts)[:200].ljust(80))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
