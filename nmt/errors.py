"""The one exception type for problems a user can fix (bad input, bad config, missing files, a full disk), and
the helpers that put filesystem failures in its terms."""

import shutil
from pathlib import Path


class NMTError(Exception):
    """A user-facing error: the CLI prints its message and exits non-zero, the service maps it to a 4xx."""


def make_dir(path: Path) -> None:
    """mkdir -p, with an NMTError for a directory that cannot be made (a path through a file, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NMTError(f"cannot create the directory {path}: {exc.strerror or exc}") from None


def write_failure(path: Path, exc: Exception) -> str:
    """Why a write under path failed, in a few words: a full disk said as such."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 16 << 20:
        return f"the disk is full: {free // 1024} KB free"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
