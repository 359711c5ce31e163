"""Files: lines read alike everywhere; a failed write is one line that says what happened, and leaves what was there."""

from __future__ import annotations

import errno
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nmt.corpus import load_split
from nmt.errors import NMTError
from nmt.files import atomic_write, make_dir, read_lines, replace_dir, write_failure


def test_read_lines_splits_at_newlines_only(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_bytes("a\r\n\nb \u2028 c\x0c d\x85 e\u2029\n".encode())
    assert read_lines(f) == ["a", "", "b \u2028 c\x0c d\x85 e\u2029"]
    f.write_text("", encoding="utf-8")
    assert read_lines(f) == []
    # A file saved with a byte order mark (Windows Notepad) scored lower, its first line not matching, silently.
    f.write_bytes("\ufeffa b\n\ufeffc\n".encode())
    assert read_lines(f) == ["a b", "\ufeffc"]  # only the mark that opens the file is no text
    f.write_bytes(b"ok\nbad \xff\n")
    with pytest.raises(NMTError, match=r"x.txt:2: invalid UTF-8 \(byte 0xff at column 5\)"):
        read_lines(f)
    with pytest.raises(NMTError, match="hypothesis file not found: .*nope"):
        read_lines(tmp_path / "nope", "hypothesis file")
    # Old Mac OS line ends read as one line: a corpus of one pair, or "has 1 lines" with no word of why.
    f.write_bytes(b"uno\rdos\rtres\r")
    with pytest.raises(NMTError, match="x.txt ends its lines with a bare carriage return"):
        read_lines(f)
    for text, read in ((b"uno\r", ["uno"]), (b"uno\r\r\n", ["uno\r"]), (b"a\rb\n", ["a\rb"])):  # as sacrebleu reads
        f.write_bytes(text)
        assert read_lines(f) == read
    with pytest.raises(NMTError, match="is a directory"):
        read_lines(tmp_path)


def test_training_reads_a_line_separator_as_text_as_the_shortlist_and_evaluation_do(tmp_path: Path) -> None:
    # str.splitlines would make three source lines of these two, and training would refuse the corpus.
    (tmp_path / "train.src").write_text("uno \u2028 dos\ntres\n", encoding="utf-8")
    (tmp_path / "train.tgt").write_text("one two\nthree\n", encoding="utf-8")
    assert load_split(tmp_path, "train") == (["uno \u2028 dos", "tres"], ["one two", "three"])


def test_a_full_disk_is_said_as_such_and_only_then(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nmt.files.shutil.disk_usage", lambda path: SimpleNamespace(free=200 << 20))
    target = tmp_path / "f"
    assert write_failure(target, OSError(errno.ENOSPC, "No space left on device")) == "no space left on the device"
    assert write_failure(target, RuntimeError("... No space left on device (os error 28)")) == \
        "no space left on the device"
    assert write_failure(target, RuntimeError("unexpected pos 1\nmore")) == "unexpected pos 1"  # the first line
    monkeypatch.setattr("nmt.files.shutil.disk_usage", lambda path: SimpleNamespace(free=4096))
    assert write_failure(target, OSError(errno.EACCES, "Permission denied")) == "Permission denied"  # not "full"
    assert write_failure(target, RuntimeError("unexpected pos 1")) == "no space left on the device"


def test_atomic_write_judges_a_failure_while_the_unfinished_file_holds_its_space(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.pt"
    target.write_text("step 10", encoding="utf-8")
    # The disk is full while the unfinished file is there, and has room again once it is removed.
    monkeypatch.setattr("nmt.files.shutil.disk_usage",
                        lambda path: SimpleNamespace(free=0 if list(tmp_path.glob(".*.tmp")) else 1 << 30))

    def cut_short(tmp: str) -> None:
        Path(tmp).write_text("half", encoding="utf-8")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 93568 vs 93456")

    with pytest.raises(NMTError) as error:
        atomic_write(target, cut_short)
    assert str(error.value) == f"cannot write {target} (no space left on the device); the earlier last.pt is kept"
    assert target.read_text(encoding="utf-8") == "step 10" and sorted(tmp_path.iterdir()) == [target]
    atomic_write(target, lambda tmp: Path(tmp).write_text("step 20", encoding="utf-8"))
    assert target.read_text(encoding="utf-8") == "step 20" and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(NMTError, match=r"cannot write .*nope/x \(Not a directory\)|cannot create the directory"):
        atomic_write(target / "nope" / "x", lambda tmp: None)


def test_atomic_write_keeps_links_and_devices(tmp_path: Path) -> None:
    # Renaming over them turned a link into a plain file, and /dev/full into a file holding a report.
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old", encoding="utf-8")
    link.symlink_to(real)
    atomic_write(link, lambda tmp: Path(tmp).write_text("new", encoding="utf-8"))
    assert link.is_symlink() and real.read_text(encoding="utf-8") == "new"
    atomic_write(Path(os.devnull), lambda tmp: Path(tmp).write_text("gone", encoding="utf-8"))
    assert Path(os.devnull).is_char_device()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(NMTError, match="cannot write .*loop"):  # was a RuntimeError's traceback
        atomic_write(loop, lambda tmp: Path(tmp).write_text("x", encoding="utf-8"))
    if Path("/dev/full").is_char_device():
        with pytest.raises(NMTError, match=r"^cannot write /dev/full \(no space left on the device\)$"):
            atomic_write(Path("/dev/full"), lambda tmp: Path(tmp).write_text("x" * 10000, encoding="utf-8"))
        assert Path("/dev/full").is_char_device()


def test_dev_stdout_is_this_process_s_output_not_the_file_behind_it(capsys: pytest.CaptureFixture[str]) -> None:
    # Resolved, it was the file a shell's redirection had opened: renamed over (the shell's later output lost), or
    # a pipe's name under /proc that could not be written.
    print("before")
    atomic_write(Path("/dev/stdout"), lambda tmp: Path(tmp).write_text("report\n", encoding="utf-8"))
    print("after")
    assert capsys.readouterr().out == "before\nreport\nafter\n"


def test_a_directory_that_a_file_is_in_the_way_of_says_so(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("", encoding="utf-8")
    with pytest.raises(NMTError) as error:
        make_dir(tmp_path / "out")
    assert str(error.value) == f"cannot create the directory {tmp_path / 'out'}: a file of that name is in the way"
    with pytest.raises(NMTError, match="Not a directory"):
        make_dir(tmp_path / "out" / "deeper")


def test_replace_dir_keeps_what_it_is_told_and_loses_nothing_on_failure(tmp_path):
    out, new = tmp_path / "out", tmp_path / "new"
    new.mkdir()
    (new / "model").write_text("new")
    replace_dir(out, new)  # nothing there yet
    assert (out / "model").read_text() == "new" and not new.exists()
    (out / "notes").write_text("mine")
    new.mkdir()
    (new / "model").write_text("newer")
    replace_dir(out, new, keep=lambda name: name == "notes")
    assert sorted(p.name for p in out.iterdir()) == ["model", "notes"] and (out / "model").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden leftovers
    with pytest.raises(FileNotFoundError):  # the new directory is gone: the old one stays where it was
        replace_dir(out, new)
    assert (out / "notes").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (new / "notes").mkdir(parents=True)  # a kept file cannot go back where a directory now is: it is not lost
    with pytest.raises(NMTError, match=r"files of the directory it replaced could not be moved back .*: they are in"):
        replace_dir(out, new, keep=lambda name: name == "notes")
    kept = next(tmp_path.glob(".out.old.*"))
    assert (kept / "notes").read_text() == "mine" and (out / "notes").is_dir()


def test_gzip_files_are_read_as_text_and_a_bad_one_is_named(tmp_path):
    # sacrebleu reads test.ref.gz; nmt said "invalid UTF-8 (byte 0x8b) ... convert the file with iconv".
    import gzip
    import hashlib

    text = "uno\r\ndós\n".encode()
    packed = tmp_path / "ref.txt.gz"
    packed.write_bytes(gzip.compress(text))
    digest = hashlib.sha256()
    assert read_lines(packed, digest=digest) == ["uno", "dós"]
    assert digest.hexdigest() == hashlib.sha256(text).hexdigest()  # of the text
    unnamed = tmp_path / "ref.txt"
    unnamed.write_bytes(gzip.compress(text))
    with pytest.raises(NMTError, match="ref.txt is gzip-compressed: name it \\*.gz to have it read as such"):
        read_lines(unnamed)
    shouting = tmp_path / "REF.TXT.GZ"  # gunzip takes the name in either case
    shouting.write_bytes(gzip.compress(text))
    assert read_lines(shouting) == ["uno", "dós"]
    packed.write_bytes(gzip.compress(text)[:-6])
    with pytest.raises(NMTError, match="ref.txt.gz: not a readable gzip file"):
        read_lines(packed)


def test_gzip_data_on_standard_input_is_decompressed(monkeypatch):
    # `cat ref.gz | nmt evaluate ... --refs -` was told to name standard input *.gz.
    import gzip
    import io

    def stdin(data: bytes) -> None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data)), encoding="utf-8"))

    stdin(gzip.compress("uno\ndós\n".encode()))
    assert read_lines("-") == ["uno", "dós"]
    stdin(b"\x1fplain\nuno\n")  # one magic byte alone is text
    assert read_lines("-") == ["\x1fplain", "uno"]
    stdin(gzip.compress(b"uno\n")[:-6])
    with pytest.raises(NMTError, match="standard input: not a readable gzip file"):
        read_lines("-")

    class Trickle(io.RawIOBase):  # a pipe whose first read brings one byte: peek(2) saw no gzip mark
        def __init__(self, data: bytes):
            self.chunks = [data[:1], data[1:]]

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            chunk = self.chunks.pop(0) if self.chunks else b""
            buffer[:len(chunk)] = chunk
            return len(chunk)

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(Trickle(gzip.compress(b"uno\n")))))
    assert read_lines("-") == ["uno"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_a_utf16_or_utf32_file_is_named_as_such(tmp_path, encoding):
    # It was "invalid UTF-8 (byte 0xff at column 1)"; then UTF-32 was named UTF-16 (its mark begins as UTF-16's).
    path = tmp_path / "src.txt"
    bom = "\ufeff" if encoding.endswith("be") else ""  # Python's utf-16 and utf-32 write one themselves
    path.write_bytes((bom + "uno\ndós\n").encode(encoding))
    name = encoding[:6].upper()
    with pytest.raises(NMTError, match=re.escape(f"{path} is {name} (it begins with {name}'s byte order mark): "
                                                 f"convert it to UTF-8, e.g. with iconv -f {name} -t UTF-8")):
        read_lines(path)


def test_missing_standard_descriptors_are_never_taken_by_files(tmp_path):
    # Started with `>&- 2>&-`, the next file opened took descriptor 1 or 2, and what native code writes to standard
    # error (libgomp, SentencePiece) went into it: into a translation output, say.
    out = tmp_path / "out.txt"
    script = ("import os, sys; from nmt.files import stand_in_for_closed_streams; stand_in_for_closed_streams(); "
              f"f = open({str(out)!r}, 'w'); f.write('mine'); f.flush(); os.write(2, b'native'); os.write(1, b'x')")
    done = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} >&- 2>&-"],
                          timeout=60)
    assert done.returncode == 0 and out.read_text(encoding="utf-8") == "mine"
