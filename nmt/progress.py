"""A one-line progress display for long loops; silent when stderr is not a terminal."""

from __future__ import annotations

import logging
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
        self.drawn = ""  # what is on the line now
        self._filter = _ClearForLogging(self)
        if self.enabled:  # a log line (a validation's scores) starts on a line of its own, then the bar comes back
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._filter)

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
        self.drawn = "  ".join(parts)[:200].ljust(80)
        sys.stderr.write("\r" + self.drawn)
        sys.stderr.flush()

    def clear_line(self) -> None:
        """Blank the bar's line and put the cursor at its start; the next update draws it again at once."""
        if self.drawn:
            sys.stderr.write("\r" + " " * len(self.drawn) + "\r")
            sys.stderr.flush()
            self.drawn, self.last_draw = "", 0.0

    def close(self) -> None:
        """End the bar's line (an error printed after it starts on a line of its own); closing twice is harmless."""
        if self.enabled:
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._filter)
            if self.drawn:
                sys.stderr.write("\n")
                sys.stderr.flush()
                self.drawn = ""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ClearForLogging(logging.Filter):
    """A filter on the root logger's handlers that clears the progress line before each record is written."""

    def __init__(self, bar: Progress) -> None:
        super().__init__()
        self.bar = bar

    def filter(self, record: logging.LogRecord) -> bool:
        self.bar.clear_line()
        return True
