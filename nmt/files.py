"""Files: text lines read as parallel corpora and sacrebleu need them, directories made or refused in one line,
atomic replacement, a failed write in a few words."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from nmt.errors import NMTError

GZIP_MAGIC = b"\x1f\x8b"
NEARLY_FULL = 16 << 20  # bytes free under which a library's own words for a failed write mean a full disk


class Digest(Protocol):
    """A hashlib object, such as hashlib.sha256()."""

    def update(self, data: bytes, /) -> None: ...


READ_ERRORS = (OSError, EOFError, zlib.error)  # what reading a file raises, a damaged gzip one included


class ClosedStream(io.RawIOBase):
    """Standard input or output of a process started without it (`<&-`, `>&-`), where Python has None: print()
    then dropped every result silently (exit 0), and reading it was a TypeError. Using it is an OSError instead,
    which the commands report as any unreadable input or unwritable output."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def _closed(self, *args: Any) -> Any:
        raise OSError(errno.EBADF, f"{self.name} is closed")

    read = readline = readlines = readinto = write = writelines = fileno = _closed

    def __iter__(self) -> Iterator[bytes]:
        return self._closed()

    @property
    def buffer(self) -> ClosedStream:
        return self

    def flush(self) -> None:
        """Nothing to flush (Python flushes standard output at exit)."""


def stand_in_for_closed_streams() -> None:
    """Give a process started without standard input or output a ClosedStream for each, and one without standard
    error /dev/null there (its messages cannot be shown, but the command still runs and says how by its status).
    Each missing descriptor 0-2 gets /dev/null too: else the next file opened took its number, and what native code
    writes to standard error (libgomp, SentencePiece) went into that file, an output among them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, shown in (("stdin", "standard input"), ("stdout", "standard output")):
        if getattr(sys, name) is None:
            setattr(sys, name, ClosedStream(shown))
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the process's lifetime)


def gzip_named(path: str | Path) -> bool:
    """Whether a file's name says gzip (*.gz, in either case): such a file is read decompressed."""
    return str(path).lower().endswith(".gz")


def read_failure(name: str, compressed: bool, exc: BaseException) -> NMTError:
    """The error for one of READ_ERRORS while reading a file (compressed: as gzip)."""
    if compressed:
        return NMTError(f"{name}: not a readable gzip file ({exc})")
    return NMTError(f"cannot read {name} ({getattr(exc, 'strerror', None) or exc})")


def read_lines(path: str | Path, what: str = "file", digest: Digest | None = None) -> list[str]:
    """The lines of a UTF-8 text file (- for standard input), a trailing \\r and the byte order mark some editors
    write first dropped. Split on \\n only, as sacrebleu reads them: str.splitlines would also split at U+2028, form
    feeds and the like, so that two parallel files would no longer line up.

    A file named *.gz (or *.GZ) is decompressed as it is read, as sacrebleu reads one; so is gzip data on standard
    input, which has no name to tell. digest is updated with the bytes as read (decompressed): the text's digest,
    also of standard input or a pipe, which cannot be read a second time."""
    if str(path) == "-":
        name, stream = "standard input", getattr(sys.stdin, "buffer", sys.stdin)
        closing = contextlib.nullcontext()  # standard input stays open for the caller
        compressed = False
        if isinstance(stream, io.BufferedIOBase):  # not a text stream standing in for it
            # read(2) waits for both bytes (a pipe's first read may bring one: peek missed the gzip mark)
            head = stream.read(2)
            compressed = head == GZIP_MAGIC
            stream = io.BufferedReader(_Prefixed(head, stream))
    else:
        name = str(path)
        try:
            stream = closing = open(path, "rb")
        except FileNotFoundError:
            raise NMTError(f"{what} not found: {path}") from None
        except IsADirectoryError:
            raise NMTError(f"{what} {path} is a directory, not a text file") from None
        except OSError as exc:
            raise NMTError(f"cannot read the {what} {path} ({exc.strerror or exc})") from None
        compressed = gzip_named(name)
    if compressed:
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    with closing:
        try:
            return _decoded_lines(stream, name, digest)
        except READ_ERRORS as exc:
            raise read_failure(name, compressed, exc) from None


class _Prefixed(io.RawIOBase):
    """A binary stream with the bytes read from its start put back in front of it."""

    def __init__(self, head: bytes, rest: io.BufferedIOBase):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._head[:len(buffer)] if self._head else self._rest.read1(len(buffer))
        self._head = self._head[len(data):]
        buffer[:len(data)] = data
        return len(data)


def gzip_unnamed(name: str) -> NMTError:
    """The error for a gzip-compressed file whose name does not end in .gz."""
    return NMTError(f"{name} is gzip-compressed: name it *.gz to have it read as such, or gunzip it")


def bare_carriage_returns(name: str) -> NMTError:
    """The error for text whose lines end in a bare carriage return, which would be read as one line."""
    return NMTError(f"{name} ends its lines with a bare carriage return (old Mac OS text): convert it to \\n line "
                    "ends, e.g. with tr '\\r' '\\n'")


# UTF-32's marks first: UTF-32-LE's begins as UTF-16-LE's does.
_BYTE_ORDER_MARKS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                     (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def not_utf8(name: str, lineno: int, raw: bytes, exc: UnicodeDecodeError) -> NMTError:
    """The error for a line of input that is not UTF-8, naming UTF-16 or UTF-32 where the input begins with its byte
    order mark."""
    for mark, encoding in _BYTE_ORDER_MARKS if lineno == 1 else ():
        if raw.startswith(mark):
            return NMTError(f"{name} is {encoding} (it begins with {encoding}'s byte order mark): convert it to "
                            f"UTF-8, e.g. with iconv -f {encoding} -t UTF-8")
    return NMTError(f"{name}:{lineno}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "convert it to UTF-8, e.g. with iconv")


def _decoded_lines(stream: Any, name: str, digest: Digest | None) -> list[str]:
    lines = []
    newline = False  # the file holds a \n
    for lineno, raw in enumerate(stream, 1):
        if isinstance(raw, str):  # a text stream standing in for standard input
            raw = raw.encode("utf-8", "surrogateescape")
        if digest is not None:
            digest.update(raw)
        newline = newline or raw.endswith(b"\n")
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if lineno == 1 and raw.startswith(GZIP_MAGIC):
                raise gzip_unnamed(name) from None
            raise not_utf8(name, lineno, raw, exc) from None
        lines.append(line.removeprefix("\ufeff") if lineno == 1 else line)
    if not newline and "\r" in "".join(lines):  # lines that would be read as one: a sentence, or a count mismatch
        raise bare_carriage_returns(name)
    return lines


def replace_dir(outdir: Path, new: Path, keep: Callable[[str], bool] = lambda name: False) -> None:
    """Put the directory `new` in the place of `outdir` (which may not exist) by renames, moving into it the
    entries of the old one whose names `keep` picks; the rest of the old directory is deleted. On a failed rename
    `outdir` is left as it was; OSError then. If kept entries cannot be moved, NMTError says where they are."""
    if not outdir.exists():
        os.replace(new, outdir)
        return
    old = Path(tempfile.mkdtemp(dir=outdir.parent, prefix=f".{outdir.name}.old."))
    try:
        os.replace(outdir, old)  # onto the empty directory: a name no one else uses
    except OSError:
        old.rmdir()
        raise
    try:
        os.replace(new, outdir)
    except OSError:
        os.replace(old, outdir)
        raise
    try:
        for entry in old.iterdir():
            if keep(entry.name):
                os.replace(entry, outdir / entry.name)
    except OSError as exc:
        raise NMTError(f"wrote {outdir}, but files of the directory it replaced could not be moved back "
                       f"({exc.strerror or exc}): they are in {old}") from None
    shutil.rmtree(old, ignore_errors=True)


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


# The names of this process's standard output and error (read when written: tests and callers may replace them).
_OWN_STREAMS: dict[str, Callable[[], Any]] = {
    **dict.fromkeys(("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"), lambda: sys.stdout),
    **dict.fromkeys(("/dev/stderr", "/dev/fd/2", "/proc/self/fd/2"), lambda: sys.stderr),
}


def is_special_file(path: Path) -> bool:
    """Whether path is written into rather than replaced: a device or pipe (/dev/null), or a name under /dev or
    /proc, such as /dev/stdout, which stands for whatever a process has open (a pipe, or a file a shell redirection
    opened: renaming over that file would cut the shell's output off from it)."""
    absolute = os.path.abspath(path)  # not resolved: /dev/stdout resolves to the file it stands for
    if absolute.startswith(("/dev/", "/proc/")):
        return True
    try:
        return path.exists() and not path.is_file() and not path.is_dir()
    except OSError:  # a symbolic link loop: no file to write into
        return False


def probe_writable(path: Path) -> None:
    """NMTError when atomic_write could not write path: its directory cannot be made or written in. For a command
    that works a long while before it writes (so that the work is not lost to a read-only directory)."""
    if is_special_file(path):
        return
    directory = path.resolve().parent
    make_dir(directory)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise NMTError(f"cannot write {path} ({write_failure(path, exc)})") from None
    os.close(fd)
    os.unlink(tmp)


def probe_openable(path: Path) -> None:
    """NMTError when path could not be opened and written in place (as `translate -o` writes it, not through
    atomic_write): a directory, or a file or directory that cannot be written; an existing file keeps its text."""
    if is_special_file(path):
        return
    if path.is_dir():
        raise NMTError(f"cannot write {path}: it is a directory")
    if not path.exists():
        probe_writable(path)
        return
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise NMTError(f"cannot write {path} ({write_failure(path, exc)})") from None


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path), then rename it over path, so readers never see a half-written file. A failure is an
    NMTError naming path, judged while the unfinished file still holds its space; path is left as it was.

    A symbolic link stays one: the file it points to is replaced. A device or pipe (/dev/null, /dev/stdout) is
    written into (see is_special_file)."""
    shown = path
    if is_special_file(path):
        # Written aside, then copied: opening /dev/stdout truncates the file a shell's >> opened, or writes at
        # another offset than the process's own output there, so our own standard streams are written as such.
        with tempfile.TemporaryDirectory(prefix="nmt-") as aside:
            tmp = os.path.join(aside, path.name or "output")
            stream = _OWN_STREAMS.get(os.path.abspath(path))
            try:
                write(tmp)
                with open(tmp, "rb") as src:
                    if stream is not None:
                        stream().flush()
                        shutil.copyfileobj(src, stream().buffer)
                        stream().flush()
                    else:
                        with open(path, "ab") as dst:
                            shutil.copyfileobj(src, dst)
            except (OSError, RuntimeError) as exc:
                raise NMTError(f"cannot write {shown} ({write_failure(path, exc)})") from None
        return
    if path.is_symlink():
        try:
            path = path.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # a loop: RuntimeError before Python 3.13, OSError since
            raise NMTError(f"cannot write {shown} ({exc})") from None
    make_dir(path.parent)
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise NMTError(f"cannot write {shown} ({write_failure(path, exc)})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints unreadable to other users
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch.save's failures
        kept = f"; the earlier {path.name} is kept" if existed else ""
        raise NMTError(f"cannot write {shown} ({write_failure(path, exc)}){kept}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_of(*paths: Path) -> str:
    """SHA-256 of the files' bytes, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
