"""Writing files: directories made or refused in one line, atomic replacement, a failed write in a few words, and
a command's results on standard output."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from nmt.errors import NMTError

NEARLY_FULL = 16 << 20  # bytes free under which a library's own words for a failed write mean a full disk


def make_dir(path: Path) -> None:
    """mkdir -p, with an NMTError for a directory that cannot be made (a path through a file, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NMTError(f"cannot create the directory {path}: a file of that name is in the way") from None
    except OSError as exc:
        raise NMTError(f"cannot create the directory {path}: {exc.strerror or exc}") from None


def write_failure(path: Path, exc: BaseException) -> str:
    """Why a write under path failed, in a few words: a full disk said as such."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text:
        return "no space left on the device"
    if isinstance(exc, OSError):
        return exc.strerror or text or type(exc).__name__
    try:
        full = shutil.disk_usage(path.parent).free < NEARLY_FULL
    except OSError:
        full = False
    if full:  # torch says "unexpected pos" for a write cut short
        return "no space left on the device"
    return text.splitlines()[0] if text else type(exc).__name__


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path), then rename it over path, so readers never see a half-written file. A failure is an
    NMTError naming path, judged while the unfinished file still holds its space; path is left as it was."""
    make_dir(path.parent)
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise NMTError(f"cannot write {path} ({write_failure(path, exc)})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints unreadable to other users
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch.save's failures
        kept = f"; the earlier {path.name} is kept" if existed else ""
        raise NMTError(f"cannot write {path} ({write_failure(path, exc)}){kept}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def say(*lines: str) -> None:
    """Print a command's result lines on standard output, written at once: a failed write (a full disk behind a
    redirection) is an NMTError, and a closed pipe stays a BrokenPipeError, on which the CLI ends quietly."""
    try:
        print(*lines, sep="\n", flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise NMTError(f"cannot write to standard output ({write_failure(Path(os.devnull), exc)})") from None
