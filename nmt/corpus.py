"""Corpus recipes: turn raw parallel text into cleaned `{train,dev,test}.{src,tgt}` files.

Two recipes, one output format (see DESIGN.md, "Corpus: the default recipe"):

- `prepare_bible`: the built-in Spanish->English corpus, verses of the Reina-Valera 1909 and the King
  James Version (Debian packages sword-text-sparv / sword-text-kjv, read with pysword) aligned by reference
  and split by whole books.
- `prepare_files`: a user's own corpus, two parallel plain-text files or one TSV file.

Every recipe writes `OUTDIR/{split}.src`, `OUTDIR/{split}.tgt` (UTF-8, one sentence a line, `\\n`) and
`OUTDIR/corpus.json` (recipe, languages, counts, sources); the Bible recipe adds `OUTDIR/{split}.ref`.
Output is written into a temporary directory beside OUTDIR and moved into place at the end, so a failed
run never leaves a half-written corpus.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nmt.errors import NMTError
from nmt.files import make_dir, read_lines, replace_dir, sha256_of
from nmt.text import normalize_text

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
UNNAMED_LANGUAGES = ("src", "tgt")  # corpus.json's languages when `nmt prepare files` was given none
# A language code as BCP 47 writes them (en, pt-BR, zh-Hans-TW, es-419, x-klingon; es_ES as locales, zho_Hans as
# FLORES do): "english" or "zh cn" would label models and, for the target, choose the BLEU tokenizer.
LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*|[xXiI]([-_][A-Za-z0-9]{1,8})+")
CORPUS_JSON = "corpus.json"
# Every file a corpus may hold: the only ones `nmt prepare` ever replaces in its OUTDIR.
CORPUS_FILES = frozenset({CORPUS_JSON, *(f"{split}.{ext}" for split in SPLITS for ext in ("src", "tgt", "ref"))})
TRAIN_FILES = ("train.src", "train.tgt")  # the pairs a run trains on

# ----------------------------------------------------------------------------------------------------------
# Atomic output directory
# ----------------------------------------------------------------------------------------------------------


def _check_outdir(outdir: Path, overwrite: bool, inputs: Sequence[Path | str] = ()) -> str | None:
    """Refuse a directory that holds the inputs or the current directory, or that is not empty and holds no
    previous corpus (whatever `overwrite` says: a mistyped OUTDIR, such as a home directory, was replaced whole);
    and, unless `overwrite`, one that holds other files beside a previous corpus (they are kept with it). What the
    corpus replaces there, if anything, in words."""
    if not outdir.exists():
        return None
    if not outdir.is_dir():
        raise NMTError(f"{outdir} exists and is not a directory")
    home = outdir.resolve()
    for path in inputs:
        if Path(path).resolve().is_relative_to(home):
            raise NMTError(f"{path} is inside {outdir}, which the corpus replaces: write it to another directory")
    if Path.cwd().resolve().is_relative_to(home):
        raise NMTError(f"{outdir} holds the current directory, which the corpus would replace: "
                       "write it to another directory")
    entries = list(outdir.iterdir())
    clash = next((e for e in entries if e.name in CORPUS_FILES and e.is_dir()), None)
    if clash is not None:  # its name is a corpus file's, which the corpus replaces: it went, with what it held
        raise NMTError(f"{clash} is a directory, not a corpus file: move it away, or write the corpus to "
                       "another directory")
    others = sorted(e.name for e in entries if e.name not in CORPUS_FILES)
    previous = (outdir / CORPUS_JSON).is_file()
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    if entries and not previous:
        only_hidden = all(e.name.startswith(".") for e in entries)  # such as .gitkeep: not empty either
        hidden = f" (its hidden files count: {', '.join(others[:3])})" if only_hidden else ""
        raise NMTError(f"{outdir} exists, is not empty{hidden} and holds no previous corpus ({CORPUS_JSON}): write "
                       "the corpus to a new or empty directory")
    if others and not overwrite:
        raise NMTError(f"{outdir} holds a previous corpus and other files ({shown}); choose another directory, "
                       "or pass --overwrite to replace the corpus and keep them")
    if not entries:
        return None
    return f"the previous corpus in {outdir}" + (f" (keeping {shown})" if others else "")


def _sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name in `path`'s directory, for a temporary copy of `path`."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _write_corpus(outdir: Path, splits: dict[str, dict[str, Sequence[str]]], meta: dict[str, Any],
                  overwrite: bool, inputs: Sequence[Path | str]) -> None:
    """Write `{split}.{ext}` for each split and file extension, and corpus.json, atomically.

    Everything goes into a temporary directory beside `outdir`, which then replaces `outdir` by renames, with the
    entries of `outdir` that are no corpus files moved into it; on any error the temporary directory is removed and
    `outdir` is left as it was.
    """
    if (replaced := _check_outdir(outdir, overwrite, inputs)) is not None:
        log.info("replacing %s", replaced)
    outdir = outdir.resolve()  # "." or "..": a name to rename
    tmp = _sibling(outdir, "tmp")
    try:
        make_dir(outdir.parent)
        tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask: the corpus gets ordinary permissions
    except OSError as exc:
        raise NMTError(f"cannot write a corpus to {outdir}: {exc.strerror or exc}") from None
    try:
        for split, files in splits.items():
            for ext, lines in files.items():
                with open(tmp / f"{split}.{ext}", "w", encoding="utf-8", newline="\n") as f:
                    for line in lines:
                        f.write(line)
                        f.write("\n")
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        (tmp / CORPUS_JSON).write_text(text, encoding="utf-8")
        replace_dir(outdir, tmp, keep=lambda name: name not in CORPUS_FILES)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise NMTError(f"cannot write a corpus to {outdir}: {exc.strerror or exc}") from None
        raise


# ----------------------------------------------------------------------------------------------------------
# Recipe 1: the Bible (Reina-Valera 1909 -> King James Version)
# ----------------------------------------------------------------------------------------------------------

BIBLE_SOURCES = {
    "src": {"module": "spaRV1909eb", "lang": "es", "debian_package": "sword-text-sparv"},
    "tgt": {"module": "engKJV2006eb", "lang": "en", "debian_package": "sword-text-kjv"},
}
# Whole books, by OSIS name (pysword's `osis_name`), so parallel passages cannot leak across splits.
BIBLE_DEV_BOOKS = ("Joel", "Amos", "Mic", "Gal", "Col", "1John")
BIBLE_TEST_BOOKS = ("Ruth", "Esth", "Lam", "Obad", "Hag", "Phil", "Jas", "1Pet", "Titus", "Phlm", "Jude")
BIBLE_EXPECTED_COUNTS = {"train": 29533, "dev": 673, "test": 878}
# Of the 31,102 verses, 18 are empty in the installed modules; a damaged data file reads as thousands of empty
# verses, and was a quarter of the corpus gone, exit 0.
MAX_EMPTY_VERSES = 0.01
_INSTALL_HINT = ("install them with `apt-get install -y sword-text-sparv sword-text-kjv` "
                 "and `pip install pysword`")

_NOTE_RE = re.compile(r"<note\b[^>]*?(?:/>|>.*?</note\s*>)", re.S)
_TAG_RUN_RE = re.compile(r"(?:<[^<>]*>)+")
_WORD_START_RE = re.compile(r"<(?:w|transChange)\b[^>]*(?<!/)>")
_LAST_WORD_RE = re.compile(r"(\w+)$")
# USFM character-style markers left inside the KJV text (`\nd LORD`, `\+nd*`), pilcrows, editorial brackets.
_MARKER_RE = re.compile(r"\\\+?[a-z]+[0-9]*\*?|[¶\[\]]")
# In the RV1909 module an added word (<transChange>) sometimes follows the previous word element with no
# space. Usually that is two words ("allí</w><transChange>también" -> "allí también"), but a Spanish
# clitic pronoun written that way is part of the verb ("sáca</w><transChange>lo" -> "sácalo") unless the
# word before it is one of these (pronoun before the verb: "no lo hizo", "Dios lo permitiere").
_ENCLITICS = frozenset("lo la los las le les me te se nos os".split())
_PROCLITIC_HOSTS = frozenset("no como que os y ellos gentes cuánto dios jehová josué".split())


def clean_osis(text: str) -> str:
    """Plain text of one OSIS verse: notes dropped whole, other tags stripped, markers removed,
    entities unescaped, normalized (see `normalize_text`)."""
    text = _NOTE_RE.sub(" ", text)

    def tag_run(m: re.Match[str]) -> str:
        start, end = m.span()
        left = text[start - 1] if start else " "
        right = text[end] if end < len(text) else " "
        if not (left.isalnum() and right.isalnum()) or not _WORD_START_RE.search(m.group()):
            return ""  # inside a word ("give</w>n") or next to a space or punctuation
        if m.group().rsplit("<", 1)[-1].startswith("transChange"):
            nxt = text.find("<", end)
            word = _LAST_WORD_RE.search(text, 0, start)
            if (text[end:nxt if nxt >= 0 else None] in _ENCLITICS and word is not None
                    and word.group(1).lower() not in _PROCLITIC_HOSTS):
                return ""
        return " "  # two word elements written with nothing between them

    text = _TAG_RUN_RE.sub(tag_run, text)
    text = _MARKER_RE.sub(" ", text)
    return normalize_text(html.unescape(text))


def _load_bibles(sword_path: str) -> tuple[Any, Any, dict[str, dict[str, str]]]:
    try:
        from pysword.modules import SwordModules
    except ImportError as exc:
        raise NMTError(f"the Bible recipe needs pysword (`pip install pysword`): {exc}") from exc
    modules = SwordModules(sword_path)
    try:
        confs = modules.parse_modules()
    except OSError as exc:
        raise NMTError(f"cannot read SWORD modules in {sword_path} ({exc}); {_INSTALL_HINT}") from exc
    missing = [s["module"] for s in BIBLE_SOURCES.values() if s["module"] not in confs]
    if missing:
        raise NMTError(f"SWORD module(s) {', '.join(missing)} not found in {sword_path}; {_INSTALL_HINT}")
    bibles, info = [], {}
    for side, src in BIBLE_SOURCES.items():
        conf = confs[src["module"]]
        if conf.get("versification", "KJV").lower() != "kjv":
            raise NMTError(f"{src['module']} in {sword_path} is not in KJV versification")
        try:
            bible = modules.get_bible_from_module(src["module"])
        except OSError:  # pysword's when the module's data directory is missing: "Could not open OT or NT"
            bible = None
        if bible is None or not {"ot", "nt"} <= set(getattr(bible, "_testaments", {})):
            raise NMTError(f"the data files of SWORD module {src['module']} are missing or unreadable in "
                           f"{sword_path}; {_INSTALL_HINT}")
        # pysword decompresses a whole compressed block (here: a book) for every verse it reads; keep the
        # last few blocks so reading verse by verse takes seconds, not minutes.
        if hasattr(bible, "_decompressed_text"):
            bible._decompressed_text = functools.lru_cache(maxsize=8)(bible._decompressed_text)
        bibles.append(bible)
        info[side] = {**src, "description": conf.get("description", ""), "version": conf.get("version", ""),
                      "sword_version_date": conf.get("swordversiondate", ""), "sword_path": sword_path}
    return bibles[0], bibles[1], info


def _verses(bible: Any) -> Iterator[tuple[str, int, int, str]]:
    """(book, chapter, verse, raw OSIS text) for every verse of the KJV versification, in canon order.

    Reads verse by verse through pysword's internals (`_text_for_index`), raw (our own cleaning, not
    pysword's) and one text per reference: the public `get_iter` drops verses it has no text for, which
    would shift one Bible against the other.
    """
    structure = bible.get_structure()
    for testament, books in structure.get_books().items():
        for book in books:
            offset = structure._book_offset(book.name)
            for chapter in range(1, book.num_chapters + 1):
                for verse, index in enumerate(book.get_indicies(chapter, offset=offset), 1):
                    yield book.osis_name, chapter, verse, bible._text_for_index(testament, index) or ""


def bible_split(book: str) -> str:
    """The split ("train", "dev" or "test") a book (OSIS name) belongs to."""
    if book in BIBLE_DEV_BOOKS:
        return "dev"
    if book in BIBLE_TEST_BOOKS:
        return "test"
    return "train"


def prepare_bible(outdir: str | Path, sword_path: str = "/usr/share/sword", overwrite: bool = False) -> dict:
    """Build the default Spanish->English corpus in `outdir` and return its corpus.json content.

    Verses of spaRV1909eb (source) and engKJV2006eb (target) are aligned by (book, chapter, verse), cleaned
    with `clean_osis`, and skipped when empty on either side; dev and test are whole books
    (`BIBLE_DEV_BOOKS`, `BIBLE_TEST_BOOKS`). With the Debian packages this gives train 29,533 / dev 673 /
    test 878 pairs.
    """
    outdir = Path(outdir)
    _check_outdir(outdir, overwrite, [sword_path])
    src_bible, tgt_bible, sources = _load_bibles(sword_path)
    splits: dict[str, dict[str, list[str]]] = {s: {"src": [], "tgt": [], "ref": []} for s in SPLITS}
    skipped = {"empty_src": 0, "empty_tgt": 0}
    total = 0
    for (book, chapter, verse, src_raw), (tbook, tchapter, tverse, tgt_raw) in zip(
            _verses(src_bible), _verses(tgt_bible), strict=True):
        if (book, chapter, verse) != (tbook, tchapter, tverse):  # pragma: no cover - same versification
            raise NMTError(f"verse order differs between modules: {book} {chapter}:{verse} vs "
                           f"{tbook} {tchapter}:{tverse}")
        total += 1
        src, tgt = clean_osis(src_raw), clean_osis(tgt_raw)
        if not src or not tgt:
            skipped["empty_src" if not src else "empty_tgt"] += 1
            log.debug("skipping %s %d:%d (empty %s)", book, chapter, verse, "source" if not src else "target")
            continue
        split = splits[bible_split(book)]
        split["src"].append(src)
        split["tgt"].append(tgt)
        split["ref"].append(f"{book} {chapter}:{verse}")
    counts = {s: len(splits[s]["src"]) for s in SPLITS}
    if not counts["train"]:
        raise NMTError(f"no verse pairs could be read from {sword_path}; {_INSTALL_HINT}")
    for side, empty in (("src", skipped["empty_src"]), ("tgt", skipped["empty_tgt"])):
        if empty > MAX_EMPTY_VERSES * total:
            source = BIBLE_SOURCES[side]
            raise NMTError(f"{empty:,} of {total:,} verses of SWORD module {source['module']} in {sword_path} are "
                           f"empty: its data files look damaged; reinstall them (apt-get install --reinstall -y "
                           f"{source['debian_package']})")
    if counts != BIBLE_EXPECTED_COUNTS:
        log.warning("Bible corpus counts %s differ from the expected %s (other module versions?)",
                    counts, BIBLE_EXPECTED_COUNTS)
    meta = {
        "recipe": "bible",
        "src_lang": "es",
        "tgt_lang": "en",
        "counts": counts,
        "verses": total,
        "skipped": skipped,
        "splits": {"dev": list(BIBLE_DEV_BOOKS), "test": list(BIBLE_TEST_BOOKS), "train": "all other books"},
        "sources": sources,
    }
    _write_corpus(outdir, splits, meta, overwrite, [sword_path])
    log.info("Bible corpus in %s: train %d, dev %d, test %d (skipped %d empty verses)", outdir,
             counts["train"], counts["dev"], counts["test"], sum(skipped.values()))
    return {**meta, "outdir": str(outdir)}


# ----------------------------------------------------------------------------------------------------------
# Recipe 2: the user's own parallel files
# ----------------------------------------------------------------------------------------------------------

DEFAULT_MAX_LEN = 250
DEFAULT_MAX_RATIO = 3.0
DEFAULT_HOLDOUT = 500
HOLDOUT_FRACTION = 0.1  # automatic dev/test sizes never exceed this fraction of the cleaned pairs each
MIN_PAIRS = 10  # fewest cleaned pairs from which dev and test can be held out
RATIO_MIN_LEN = 5  # the ratio filter leaves pairs alone whose longer side is at most this long
LENGTH_UNITS = ("words", "chars")
DROP_REASONS = ("empty", "too_long", "ratio", "duplicate", "overlap_dev_test")


def _read_lines(path: Path, what: str, digests: dict[Path, str]) -> list[str]:
    """Lines of a corpus file (see read_lines); an empty file is an error. Its SHA-256 goes into digests."""
    digest = hashlib.sha256()
    lines = read_lines(path, what, digest)
    if not lines:
        if str(path) == "-":
            raise NMTError("standard input (-) is empty; it can be read once only, so give at most one file as -")
        raise NMTError(f"{path}: file is empty")
    digests[path] = digest.hexdigest()
    return lines


def _read_pairs(src: Path | None, tgt: Path | None, tsv: Path | None, what: str,
                digests: dict[Path, str]) -> list[tuple[str, str]]:
    """Raw (source, target) pairs, from two parallel files or one TSV file; the files' SHA-256 go into digests."""
    if tsv is not None:
        if src is not None or tgt is not None:
            raise NMTError(f"give the {what} either as a TSV file or as source and target files, not both")
        pairs = []
        for lineno, line in enumerate(_read_lines(tsv, "TSV file", digests), 1):
            if not line.strip():
                pairs.append(("", ""))
                continue
            tabs = line.count("\t")
            if tabs != 1:
                raise NMTError(f"{tsv}:{lineno}: expected exactly one tab (source<TAB>target), found {tabs}")
            s, t = line.split("\t")
            pairs.append((s, t))
        return pairs
    if src is None or tgt is None:
        raise NMTError(f"give the {what} as both a source and a target file (or as one TSV file)")
    src_lines, tgt_lines = _read_lines(src, "source file", digests), _read_lines(tgt, "target file", digests)
    if len(src_lines) != len(tgt_lines):
        raise NMTError(f"{src} has {len(src_lines)} lines but {tgt} has {len(tgt_lines)}; "
                       "parallel files must have one line per sentence pair")
    return list(zip(src_lines, tgt_lines, strict=True))


def _length(text: str, unit: str) -> int:
    return len(text.split()) if unit == "words" else len(text)


def load_split(data_dir: Path, split: str) -> tuple[list[str], list[str]]:
    """The (source, target) lines of a prepared corpus's split; NMTError for missing, empty or uneven files."""
    files = [data_dir / f"{split}.src", data_dir / f"{split}.tgt"]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise NMTError(f"corpus file not found: {missing} (run `nmt prepare` first)")
    src, tgt = (read_lines(f, "corpus file") for f in files)
    if len(src) != len(tgt):
        raise NMTError(f"{data_dir}/{split}.src has {len(src)} lines but {split}.tgt has {len(tgt)}")
    if not src:
        raise NMTError(f"{data_dir}/{split}.src is empty")
    return src, tgt


def train_pairs_sha256(data_dir: Path) -> str | None:
    """SHA-256 of a corpus's train.src and train.tgt (which pairs a run trained on); None without them."""
    paths = [data_dir / name for name in TRAIN_FILES]
    return sha256_of(*paths) if all(p.is_file() for p in paths) else None


def holds_other_pairs(data_dir: Path, trained_on: str | None) -> bool:
    """Whether a corpus's training pairs are known not to be those of digest `trained_on`: False when either is
    unknown (no digest recorded, no train files, files that cannot be read): only pairs known to differ are refused
    or warned about."""
    if not trained_on:
        return False
    try:
        return train_pairs_sha256(data_dir) not in (None, trained_on)
    except OSError:
        return False


def _opt_path(p: str | Path | None) -> Path | None:
    return None if p is None else Path(p)


def _holdout_size(requested: int | None, available: int, name: str) -> int:
    if requested is None:
        return max(1, min(DEFAULT_HOLDOUT, int(available * HOLDOUT_FRACTION)))
    if requested < 1:
        raise NMTError(f"--{name}-size must be at least 1 (got {requested})")
    return requested


def prepare_files(
    outdir: str | Path,
    src: str | Path | None = None,
    tgt: str | Path | None = None,
    *,
    tsv: str | Path | None = None,
    dev_src: str | Path | None = None,
    dev_tgt: str | Path | None = None,
    dev_tsv: str | Path | None = None,
    test_src: str | Path | None = None,
    test_tgt: str | Path | None = None,
    test_tsv: str | Path | None = None,
    dev_size: int | None = None,
    test_size: int | None = None,
    seed: int = 1234,
    src_lang: str = UNNAMED_LANGUAGES[0],
    tgt_lang: str = UNNAMED_LANGUAGES[1],
    max_len: int = DEFAULT_MAX_LEN,
    max_ratio: float = DEFAULT_MAX_RATIO,
    length_unit: str = "words",
    overwrite: bool = False,
) -> dict:
    """Build a corpus in `outdir` from the user's parallel text; return its corpus.json content.

    Input: `src` + `tgt` (parallel plain-text files, one sentence a line) or `tsv` (source<TAB>target a
    line). Dev and test come from explicit files (`dev_src` + `dev_tgt` or `dev_tsv`, the same for test)
    or are held out at random (seeded) from the cleaned training pairs: `dev_size` / `test_size` pairs,
    by default 500 each but at most 10% of the pairs each.

    Cleaning of every pair: `normalize_text` (NFC, control and invisible characters, whitespace). Training pairs are
    then dropped when a side is empty, a side is longer than `max_len` units, the longer side is more
    than `max_ratio` times the shorter (`max_ratio` 0 turns this off; pairs whose longer side has at most
    5 units are exempt), the pair repeats an earlier pair, or its source sentence is also a dev or test
    source. Length is counted in `length_unit`: "words" (whitespace-separated, the default) or "chars"
    (for languages written without spaces). Explicit dev/test files are normalized and only their empty
    pairs dropped, so a standard test set stays what it is.
    """
    outdir = Path(outdir)
    for flag, lang in (("--src-lang", src_lang), ("--tgt-lang", tgt_lang)):
        if not LANGUAGE_CODE.fullmatch(lang):
            raise NMTError(f"{flag} {lang!r} is not a language code: give one such as en, de, pt-BR or zh-Hans")
    if length_unit not in LENGTH_UNITS:
        raise NMTError(f"length unit must be one of {', '.join(LENGTH_UNITS)} (got {length_unit!r})")
    if max_len < 1:
        raise NMTError(f"--max-len must be at least 1 (got {max_len})")
    if not (max_ratio == 0 or 1 <= max_ratio < math.inf):  # nan was "off"; below 1, every pair over 5 units dropped
        raise NMTError(f"--max-ratio must be 0 (off) or a finite ratio of at least 1 (got {max_ratio})")
    given = [src, tgt, tsv, dev_src, dev_tgt, dev_tsv, test_src, test_tgt, test_tsv]
    _check_outdir(outdir, overwrite, [p for p in given if p])

    holdouts = {"dev": (dev_size, dev_src, dev_tgt, dev_tsv), "test": (test_size, test_src, test_tgt, test_tsv)}
    for split, (size, *files) in holdouts.items():
        if size is not None and any(f is not None for f in files):
            raise NMTError(f"--{split}-size holds out a {split} set from the training data, but {split} files "
                           "were given: drop one or the other")
    src_p, tgt_p, tsv_p = _opt_path(src), _opt_path(tgt), _opt_path(tsv)
    digests: dict[Path, str] = {}
    raw = _read_pairs(src_p, tgt_p, tsv_p, "training data", digests)
    explicit: dict[str, list[tuple[str, str]] | None] = {}
    input_files: dict[str, Path] = {k: v for k, v in (("src", src_p), ("tgt", tgt_p), ("tsv", tsv_p)) if v}
    for split, s, t, ts in (("dev", dev_src, dev_tgt, dev_tsv), ("test", test_src, test_tgt, test_tsv)):
        if s is None and t is None and ts is None:
            explicit[split] = None
            continue
        paths = {"src": _opt_path(s), "tgt": _opt_path(t), "tsv": _opt_path(ts)}
        explicit[split] = _read_pairs(paths["src"], paths["tgt"], paths["tsv"], f"{split} data", digests)
        input_files.update({f"{split}_{k}": v for k, v in paths.items() if v})
    # Mix-ups that a corpus of the right shape hides: said, as a copy task is made so on purpose.
    if raw and all(s == t for s, t in raw):
        log.warning("the training data's source and target are the same in every pair (one file given twice?): a "
                    "model trained on it learns to copy")
    if explicit["dev"] is not None and explicit["dev"] == explicit["test"]:
        log.warning("the dev and test data are the same pairs: training chooses best.pt on them, so its test score "
                    "is no held-out measure")

    dropped = dict.fromkeys(DROP_REASONS, 0)
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for s_raw, t_raw in raw:
        s, t = normalize_text(s_raw), normalize_text(t_raw)
        if not s or not t:
            dropped["empty"] += 1
            continue
        ls, lt = _length(s, length_unit), _length(t, length_unit)
        if max(ls, lt) > max_len:
            dropped["too_long"] += 1
            continue
        if max_ratio and max(ls, lt) > RATIO_MIN_LEN and max(ls, lt) > max_ratio * min(ls, lt):
            dropped["ratio"] += 1
            continue
        if (s, t) in seen:
            dropped["duplicate"] += 1
            continue
        seen.add((s, t))
        pairs.append((s, t))

    held: dict[str, list[tuple[str, str]]] = {}
    dropped_eval = {"dev_empty": 0, "test_empty": 0}
    for split in ("dev", "test"):
        given = explicit[split]
        if given is not None:
            cleaned = [(normalize_text(s), normalize_text(t)) for s, t in given]
            held[split] = [(s, t) for s, t in cleaned if s and t]
            dropped_eval[f"{split}_empty"] = len(cleaned) - len(held[split])
            if not held[split]:
                raise NMTError(f"the {split} files hold no non-empty sentence pairs")
    to_draw = [split for split in ("dev", "test") if explicit[split] is None]
    if to_draw:
        given = {s for split in held for s, _ in held[split]}  # a drawn set must not repeat a given one
        candidates = [i for i, (s, _) in enumerate(pairs) if s not in given]
        if len(candidates) < MIN_PAIRS:
            repeated = len(pairs) - len(candidates)
            why = f" ({repeated} of the {len(pairs)} repeat a source of the given dev/test files)" if repeated else ""
            raise NMTError(f"only {len(candidates)} usable sentence pairs after cleaning{why}; at least {MIN_PAIRS} "
                           "are needed to hold out dev and test sets (or give dev and test files)")
        sizes = {split: _holdout_size(holdouts[split][0], len(candidates), split) for split in to_draw}
        wanted = sum(sizes[s] for s in to_draw)
        if wanted > len(candidates) // 2:
            raise NMTError(f"holding out {wanted} pairs for {' and '.join(to_draw)} would leave too little "
                           f"training data ({len(candidates)} usable pairs); lower --dev-size/--test-size")
        picked = random.Random(seed).sample(candidates, wanted)
        taken = set(picked)
        for split in to_draw:
            held[split], picked = [pairs[i] for i in picked[:sizes[split]]], picked[sizes[split]:]
        pairs = [p for i, p in enumerate(pairs) if i not in taken]

    eval_sources = {s for split in ("dev", "test") for s, _ in held[split]}
    train = [p for p in pairs if p[0] not in eval_sources]
    dropped["overlap_dev_test"] = len(pairs) - len(train)
    if not train:
        why = (f": all {len(pairs)} repeat a source of the dev or test set (training pairs must not)" if pairs
               else "")
        raise NMTError(f"no training pairs left after cleaning{why}")

    splits = {"train": train, "dev": held["dev"], "test": held["test"]}
    counts = {s: len(splits[s]) for s in SPLITS}
    meta = {
        "recipe": "files",
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "counts": counts,
        "input_pairs": len(raw),
        "dropped": dropped,
        "dropped_dev_test": dropped_eval,
        "holdout": {s: explicit[s] is None for s in ("dev", "test")},
        "settings": {"max_len": max_len, "length_unit": length_unit, "max_ratio": max_ratio,
                     "ratio_min_len": RATIO_MIN_LEN, "dev_size": dev_size, "test_size": test_size,
                     "seed": seed},
        # Standard input (-) and pipes (/dev/fd/63) keep their names: resolved, a pipe's says nothing.
        "sources": {k: {"path": str(p.resolve()) if p.is_file() else str(p), "sha256": digests[p]}
                    for k, p in input_files.items()},
    }
    files = {s: {"src": [p[0] for p in v], "tgt": [p[1] for p in v]} for s, v in splits.items()}
    _write_corpus(outdir, files, meta, overwrite, list(input_files.values()))
    unnamed = [flag for flag, lang, none in zip(("--src-lang", "--tgt-lang"), (src_lang, tgt_lang), UNNAMED_LANGUAGES,
                                                strict=True) if lang == none]
    if unnamed:
        log.warning("no language given (%s): a model trained on this corpus is labelled with its config's "
                    "data.src_lang and data.tgt_lang there (es and en in configs/base.yaml), which also choose its "
                    "BLEU tokenizer", ", ".join(unnamed))
    return {**meta, "outdir": str(outdir)}
