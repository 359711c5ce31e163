"""The one exception type for problems a user can fix (bad input, bad config, missing files)."""

from pathlib import Path


class NMTError(Exception):
    """A user-facing error: the CLI prints its message and exits non-zero, the service maps it to a 4xx."""


def make_dir(path: Path) -> None:
    """mkdir -p, with an NMTError for a directory that cannot be made (a path through a file, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NMTError(f"cannot create the directory {path}: {exc.strerror or exc}") from None
