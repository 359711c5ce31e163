"""Corpus recipes: the Bible recipe on the real Debian SWORD modules, the generic files recipe, the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import unicodedata
from pathlib import Path

import pytest
from conftest import require_system_package
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt import corpus
from nmt.cli import main
from nmt.corpus import clean_osis, prepare_bible, prepare_files
from nmt.errors import NMTError
from nmt.text import normalize_text

SWORD = Path("/usr/share/sword")
HAVE_MODULES = all((SWORD / "mods.d" / f"{m}.conf").is_file() for m in ("spaRV1909eb", "engKJV2006eb"))
try:
    import pysword  # noqa: F401

    HAVE_PYSWORD = True
except ImportError:  # pragma: no cover
    HAVE_PYSWORD = False


def lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return text.split("\n")[:-1]


# ----------------------------------------------------------------------------------------------------------
# Bible recipe (built once per module, through the CLI entry point)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bible(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_system_package(HAVE_MODULES and HAVE_PYSWORD,
                           "needs the SWORD modules spaRV1909eb and engKJV2006eb in /usr/share/sword and pysword "
                           "(apt-get install -y sword-text-sparv sword-text-kjv; pip install pysword)")
    out = tmp_path_factory.mktemp("bible") / "corpus"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["prepare", "bible", str(out)])
    data: dict = {"rc": rc, "stdout": stdout.getvalue(), "dir": out}
    for split in corpus.SPLITS:
        refs, src, tgt = (lines(out / f"{split}.{ext}") for ext in ("ref", "src", "tgt"))
        assert len(refs) == len(src) == len(tgt)
        data[split] = {r: (s, t) for r, s, t in zip(refs, src, tgt, strict=True)}
        assert len(data[split]) == len(refs), "duplicate references"
        data[split + "_order"] = refs
    return data


def test_bible_counts_and_metadata(bible: dict) -> None:
    assert bible["rc"] == 0
    assert {s: len(bible[s]) for s in corpus.SPLITS} == {"train": 29533, "dev": 673, "test": 878}
    meta = json.loads((bible["dir"] / "corpus.json").read_text(encoding="utf-8"))
    assert meta["recipe"] == "bible" and meta["src_lang"] == "es" and meta["tgt_lang"] == "en"
    assert meta["counts"] == {"train": 29533, "dev": 673, "test": 878}
    assert meta["sources"]["src"]["module"] == "spaRV1909eb"
    assert meta["sources"]["tgt"]["module"] == "engKJV2006eb"
    assert meta["sources"]["src"]["version"] and meta["sources"]["tgt"]["version"]
    assert meta["verses"] == 31102 and sum(meta["skipped"].values()) == 31102 - 29533 - 673 - 878
    assert "train 29,533  dev 673  test 878" in bible["stdout"]
    assert not list(bible["dir"].parent.glob(".*")), "temporary directories left behind"


def test_bible_split_by_whole_books(bible: dict) -> None:
    def books(split: str) -> set[str]:
        return {ref.rsplit(" ", 1)[0] for ref in bible[split]}

    assert books("dev") == set(corpus.BIBLE_DEV_BOOKS)
    assert books("test") == set(corpus.BIBLE_TEST_BOOKS)
    assert not books("train") & (books("dev") | books("test"))
    assert len(books("train")) == 66 - 6 - 11
    assert bible["train_order"][0] == "Gen 1:1" and bible["train_order"][-1] == "Rev 22:21"
    assert bible["test_order"][0] == "Ruth 1:1" and bible["dev_order"][0] == "Joel 1:1"


def test_bible_verses_aligned(bible: dict) -> None:
    src, tgt = bible["train"]["Gen 1:1"]
    assert src == "EN el principio crió Dios los cielos y la tierra."
    assert tgt == "In the beginning God created the heaven and the earth."
    src, tgt = bible["test"]["Ruth 1:1"]
    assert "Moab" in src and "Elimelech" not in src and "hambre" in src
    assert tgt.startswith("Now it came to pass in the days when the judges ruled") and "famine" in tgt
    src, tgt = bible["dev"]["Joel 1:1"]
    assert src == "PALABRA de Jehová que fué á Joel hijo de Pethuel."
    assert tgt == "The word of the LORD that came to Joel the son of Pethuel."
    src, tgt = bible["train"]["John 11:35"]
    assert src == "Y lloró Jesús." and tgt == "Jesus wept."
    src, tgt = bible["train"]["Rev 22:21"]
    assert "Jesucristo" in src and "Jesus Christ" in tgt
    # Verses the RV1909 module leaves empty (its Job 38:39-41 are in chapter 39) are skipped.
    train = bible["train"]
    assert "Job 38:38" in train and "Job 38:39" not in train and "Job 39:1" in train


def test_bible_markup_removed(bible: dict) -> None:
    for split in corpus.SPLITS:
        for ref, (src, tgt) in bible[split].items():
            for text in (src, tgt):
                assert text and text == text.strip() and "  " not in text, ref
                assert not any(c in text for c in "<>\\¶[]"), (ref, text)
                assert "&amp;" not in text and "&#" not in text, ref
                assert unicodedata.is_normalized("NFC", text), ref
    # KJV footnotes are dropped whole (Ruth 1:1 has "ruled: Heb. judged").
    assert "Heb." not in bible["test"]["Ruth 1:1"][1]
    assert "Heb." not in "".join(t for _, t in bible["train"].values())
    # Words split by a tag stay whole; word elements written without a space get one; clitics attach.
    assert "shall more be given." in bible["train"]["Mark 4:24"][1]
    assert "hay allí también bdelio" in bible["train"]["Gen 2:12"][0]
    assert "sácalo de este lugar" in bible["train"]["Gen 19:12"][0]
    assert "Y no lo hizo saber" in bible["train"]["1Sam 14:1"][0]
    assert "my name JEHOVAH was" in bible["train"]["Exod 6:3"][1]  # USFM `\nd` marker removed


def test_clean_osis_rules() -> None:
    assert clean_osis('a<note placement="foot"><reference>1.1 </reference>x: Heb. y</note>b') == "a b"
    assert clean_osis('<w lemma="x">give</w>n.') == "given."
    assert clean_osis('<w>uno</w><transChange type="added">dos</transChange><w>tres</w>') == "uno dos tres"
    assert clean_osis('<w>sáca</w><transChange type="added">lo</transChange> de') == "sácalo de"
    assert clean_osis('<w>no</w><transChange type="added">lo</transChange><w>hizo</w>') == "no lo hizo"
    assert clean_osis("¶ the <divineName>LORD</divineName> &amp; \\nd GOD\\+nd* <div sID='x'/>said") == \
        "the LORD & GOD said"
    assert clean_osis('<chapter eID="Num.12"/><div eID="gen134" type="x-p"/>') == ""


def test_bible_missing_modules(tmp_path: Path) -> None:
    (tmp_path / "sword" / "mods.d").mkdir(parents=True)
    with pytest.raises(NMTError, match="apt-get install -y sword-text-sparv sword-text-kjv"):
        prepare_bible(tmp_path / "out", sword_path=str(tmp_path / "sword"))
    with pytest.raises(NMTError, match="apt-get install -y sword-text-sparv sword-text-kjv"):
        prepare_bible(tmp_path / "out", sword_path=str(tmp_path / "nowhere"))
    assert not (tmp_path / "out").exists()


def test_bible_damaged_modules_are_errors(tmp_path: Path) -> None:
    require_system_package(HAVE_MODULES and HAVE_PYSWORD, "needs the SWORD modules and pysword")
    # A module whose data directory is gone was pysword's traceback; a truncated data file gave a quarter of the
    # corpus empty and dropped, exit 0.
    sword = tmp_path / "sword"
    shutil.copytree(SWORD, sword)
    kjv = sword / "modules" / "texts" / "ztext" / "engKJV2006eb"
    with (kjv / "nt.bzz").open("r+b") as data:
        data.truncate(1000)
    with pytest.raises(NMTError, match=r"verses of SWORD module engKJV2006eb in .* are empty: its data files look "
                                       r"damaged; reinstall them \(apt-get install --reinstall -y sword-text-kjv\)"):
        prepare_bible(tmp_path / "out", sword_path=str(sword))
    shutil.rmtree(kjv)
    with pytest.raises(NMTError, match="the data files of SWORD module engKJV2006eb are missing or unreadable"):
        prepare_bible(tmp_path / "out", sword_path=str(sword))
    assert not (tmp_path / "out").exists()


def test_bible_missing_pysword(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pysword.modules", None)
    with pytest.raises(NMTError, match="pip install pysword"):
        prepare_bible(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_bible_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["prepare", "bible", str(tmp_path / "out"), "--sword-path", str(tmp_path / "nowhere")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nmt prepare: error:" in err and "apt-get install -y sword-text-sparv sword-text-kjv" in err


# ----------------------------------------------------------------------------------------------------------
# Files recipe
# ----------------------------------------------------------------------------------------------------------


def write(path: Path, rows: list[str] | bytes) -> Path:
    path.write_bytes(rows if isinstance(rows, bytes) else ("\n".join(rows) + "\n").encode("utf-8"))
    return path


def numbered(n: int, start: int = 0) -> tuple[list[str], list[str]]:
    return ([f"frase número {i} del corpus" for i in range(start, start + n)],
            [f"sentence number {i} of the corpus" for i in range(start, start + n)])


def read_split(out: Path, split: str) -> list[tuple[str, str]]:
    return list(zip(lines(out / f"{split}.src"), lines(out / f"{split}.tgt"), strict=True))


def test_files_parallel_and_tsv_agree(tmp_path: Path) -> None:
    src, tgt = numbered(200)
    a = prepare_files(tmp_path / "a", write(tmp_path / "s.txt", src), write(tmp_path / "t.txt", tgt),
                      src_lang="es", tgt_lang="en")
    tsv = write(tmp_path / "c.tsv", [f"{s}\t{t}" for s, t in zip(src, tgt, strict=True)])
    b = prepare_files(tmp_path / "b", tsv=tsv, src_lang="es", tgt_lang="en")
    assert a["counts"] == b["counts"] == {"train": 160, "dev": 20, "test": 20}  # hold-out capped at 10%
    for split in corpus.SPLITS:
        assert read_split(tmp_path / "a", split) == read_split(tmp_path / "b", split)
    everything = sorted(p for s in corpus.SPLITS for p in read_split(tmp_path / "a", s))
    assert everything == sorted(zip(src, tgt, strict=True))
    meta = json.loads((tmp_path / "a" / "corpus.json").read_text(encoding="utf-8"))
    assert meta["recipe"] == "files" and meta["src_lang"] == "es" and meta["tgt_lang"] == "en"
    assert meta["counts"] == a["counts"] and set(meta["dropped"]) == set(corpus.DROP_REASONS)
    assert len(meta["sources"]["src"]["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [f"{s}.{e}" for s in corpus.SPLITS for e in ("src", "tgt")] + ["corpus.json"])


def test_files_from_stdin_or_a_pipe_record_the_digest_of_what_was_read(tmp_path: Path, monkeypatch) -> None:
    # `zcat corpus.tsv.gz | nmt prepare files --tsv - OUT`: --tsv - failed with a traceback, and a pipe
    # (--tsv <(zcat ...)) was recorded with the digest of an empty file, as it was read a second time for it.
    src, tgt = numbered(50)
    data = "".join(f"{s}\t{t}\n" for s, t in zip(src, tgt, strict=True)).encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert main(["prepare", "files", "--tsv", "-", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "corpus.json").read_text(encoding="utf-8"))
    assert meta["sources"]["tsv"] == {"path": "-", "sha256": hashlib.sha256(data).hexdigest()}
    reader, writer = os.pipe()
    os.write(writer, data)
    os.close(writer)
    try:
        assert main(["prepare", "files", "--tsv", f"/dev/fd/{reader}", str(tmp_path / "b")]) == 0
    finally:
        os.close(reader)
    meta = json.loads((tmp_path / "b" / "corpus.json").read_text(encoding="utf-8"))
    assert meta["sources"]["tsv"]["sha256"] == hashlib.sha256(data).hexdigest()
    for split in corpus.SPLITS:
        assert read_split(tmp_path / "a", split) == read_split(tmp_path / "b", split)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a\nb\n"), encoding="utf-8"))
    with pytest.raises(NMTError, match=r"standard input \(-\) is empty; it can be read once only"):
        prepare_files(tmp_path / "c", "-", "-")


def test_files_holdout_seeded(tmp_path: Path) -> None:
    src, tgt = numbered(6000)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    r1 = prepare_files(tmp_path / "o1", s, t, seed=7)
    prepare_files(tmp_path / "o2", s, t, seed=7)
    prepare_files(tmp_path / "o3", s, t, seed=8)
    assert r1["counts"] == {"train": 5000, "dev": 500, "test": 500}
    assert read_split(tmp_path / "o1", "dev") == read_split(tmp_path / "o2", "dev")
    assert read_split(tmp_path / "o1", "dev") != read_split(tmp_path / "o3", "dev")
    dev, test, train = (set(read_split(tmp_path / "o1", x)) for x in ("dev", "test", "train"))
    assert not (dev & test or dev & train or test & train)
    r4 = prepare_files(tmp_path / "o4", s, t, dev_size=50, test_size=70)
    assert r4["counts"] == {"train": 5880, "dev": 50, "test": 70}


def test_files_cleaning_rules(tmp_path: Path) -> None:
    src, tgt = numbered(40)
    cases = [
        ("cafe\u0301  con\tleche ", "coffee\u00a0with   milk"),  # NFC, tab, nbsp, spaces
        ("a\x00b\x07c fin", "x\u200by\x1bz end"),  # control and zero-width characters removed
        ("línea\u2028partida\x0baquí", "line\x85split here"),  # odd line breaks become spaces
        ("", "empty source"),
        ("empty target", "   "),
        ("uno " * 30, "one " * 30),  # too long for max_len=20
        ("corta", "a b c d e f g h"),  # ratio 8 > 3 with a longer side over 5 words
        ("hola", "hello there my friend"),  # ratio 4, but short pairs are exempt
        ("frase número 3 del corpus", "sentence number 3 of the corpus"),  # duplicate of line 3
        ("frase  número 4 del corpus ", "sentence number 4  of the corpus"),  # duplicate after cleaning
    ]
    s = write(tmp_path / "s", src + [c[0] for c in cases])
    t = write(tmp_path / "t", tgt + [c[1] for c in cases])
    r = prepare_files(tmp_path / "out", s, t, max_len=20, dev_size=2, test_size=2)
    assert r["input_pairs"] == 50
    assert r["dropped"] == {"empty": 2, "too_long": 1, "ratio": 1, "duplicate": 2, "overlap_dev_test": 0}
    assert sum(r["counts"].values()) == 50 - 6
    pairs = {p for split in corpus.SPLITS for p in read_split(tmp_path / "out", split)}
    assert ("café con leche", "coffee with milk") in pairs
    assert ("abc fin", "xyz end") in pairs
    assert ("línea partida aquí", "line split here") in pairs
    assert ("hola", "hello there my friend") in pairs
    assert not any(p[0] == "corta" for p in pairs)


def test_files_ratio_and_length_options(tmp_path: Path) -> None:
    src, tgt = numbered(30)
    s = write(tmp_path / "s", src + ["corta", "x" * 50])
    t = write(tmp_path / "t", tgt + ["a b c d e f g h", "y" * 50])
    r = prepare_files(tmp_path / "o1", s, t, max_ratio=0)
    assert r["dropped"]["ratio"] == 0 and r["dropped"]["too_long"] == 0
    r = prepare_files(tmp_path / "o2", s, t, max_len=40, length_unit="chars")
    assert r["dropped"]["too_long"] == 1 and r["settings"]["length_unit"] == "chars"
    with pytest.raises(NMTError, match="length unit"):
        prepare_files(tmp_path / "o3", s, t, length_unit="bytes")
    # nan was taken as "off"; a ratio below 1 dropped every pair longer than 5 units.
    for ratio in (float("nan"), 0.5, -1.0, float("inf")):
        with pytest.raises(NMTError, match=re.escape(f"--max-ratio must be 0 (off) or a finite ratio of at least 1 "
                                                     f"(got {ratio})")):
            prepare_files(tmp_path / "o4", s, t, max_ratio=ratio)


def test_files_explicit_dev_test_and_overlap(tmp_path: Path) -> None:
    src, tgt = numbered(30)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    dev_s = write(tmp_path / "ds", [src[0], "otra frase", ""])  # src[0] is also in train
    dev_t = write(tmp_path / "dt", ["a different translation", "another sentence", "empty source"])
    test_tsv = write(tmp_path / "test.tsv", [f"{src[1]}\t{tgt[1]}", "prueba\ttest"])
    r = prepare_files(tmp_path / "out", s, t, dev_src=dev_s, dev_tgt=dev_t, test_tsv=test_tsv)
    assert r["counts"] == {"train": 28, "dev": 2, "test": 2}
    assert r["dropped"]["overlap_dev_test"] == 2 and r["dropped_dev_test"]["dev_empty"] == 1
    assert read_split(tmp_path / "out", "dev") == [(src[0], "a different translation"),
                                                  ("otra frase", "another sentence")]
    train_src = {p[0] for p in read_split(tmp_path / "out", "train")}
    assert src[0] not in train_src and src[1] not in train_src
    # Only one side of the dev pair given.
    with pytest.raises(NMTError, match="dev data"):
        prepare_files(tmp_path / "o2", s, t, dev_src=dev_s)
    # A size for a split whose files are given would be ignored.
    with pytest.raises(NMTError, match="--test-size holds out a test set .* but test files were given"):
        prepare_files(tmp_path / "o3", s, t, test_tsv=test_tsv, test_size=5)
    assert not (tmp_path / "o3").exists()


def test_a_drawn_test_set_never_repeats_given_dev_files(tmp_path: Path) -> None:
    src, tgt = numbered(400)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    prepare_files(tmp_path / "first", s, t)
    dev = tmp_path / "first" / "dev"
    for seed in (0, 99):  # the same corpus again, its earlier dev set given: the test set was drawn from it
        out = tmp_path / f"again{seed}"
        prepare_files(out, s, t, dev_src=dev.with_suffix(".src"), dev_tgt=dev.with_suffix(".tgt"), seed=seed)
        dev_sources = {p[0] for p in read_split(out, "dev")}
        assert dev_sources and not dev_sources & {p[0] for p in read_split(out, "test")}


def test_files_crlf_and_bom(tmp_path: Path) -> None:
    src, tgt = numbered(20)
    s = write(tmp_path / "s", ("\ufeff" + "\r\n".join(src) + "\r\n").encode("utf-8"))
    t = write(tmp_path / "t", tgt)
    prepare_files(tmp_path / "out", s, t)
    pairs = {p for split in corpus.SPLITS for p in read_split(tmp_path / "out", split)}
    assert pairs == set(zip(src, tgt, strict=True))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (write(d / "s", ["a", "b", "c"]), write(d / "t", ["a", "b"]), None),
         r"/s has 3 lines but .*/t has 2"),
        (lambda d: (write(d / "s", b"uno\ndos\ntr\xe9s\n"), write(d / "t", ["a", "b", "c"]), None),
         r"/s:3: invalid UTF-8 \(byte 0xe9 at column 3\)"),
        (lambda d: (write(d / "s", b""), write(d / "t", b""), None), r"/s: file is empty"),
        (lambda d: (d / "missing.txt", write(d / "t", ["a"]), None), r"source file not found: .*missing.txt"),
        (lambda d: (None, None, write(d / "c.tsv", ["a\tb", "c\td", "no tab here"])),
         r"c.tsv:3: expected exactly one tab \(source<TAB>target\), found 0"),
        (lambda d: (None, None, write(d / "c.tsv", ["a\tb\tc"])),
         r"c.tsv:1: expected exactly one tab.*found 2"),
        (lambda d: (write(d / "s", ["a"]), None, None), r"both a source and a target file"),
        (lambda d: (write(d / "s", ["a"]), write(d / "t", ["b"]), write(d / "c.tsv", ["a\tb"])), "not both"),
        (lambda d: (write(d / "s", ["a", "b"]), write(d / "t", ["x", "y"]), None),
         r"only 2 usable sentence pairs after cleaning"),
        (lambda d: (write(d / "s", ["", " "]), write(d / "t", ["x", "y"]), None), r"only 0 usable"),
    ],
    ids=["line-mismatch", "bad-utf8", "empty", "missing", "tsv-no-tab", "tsv-two-tabs", "no-tgt",
         "files-and-tsv", "tiny", "all-empty"],
)
def test_files_errors_leave_nothing(tmp_path: Path, make, message: str) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    src, tgt, tsv = make(inputs)
    out = tmp_path / "work" / "out"
    with pytest.raises(NMTError, match=message):
        prepare_files(out, src, tgt, tsv=tsv)
    assert not out.exists()
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_files_holdout_too_large(tmp_path: Path) -> None:
    src, tgt = numbered(100)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    with pytest.raises(NMTError, match="too little training data"):
        prepare_files(tmp_path / "out", s, t, dev_size=40, test_size=40)
    with pytest.raises(NMTError, match="at least 1"):
        prepare_files(tmp_path / "out", s, t, dev_size=0)
    assert not (tmp_path / "out").exists()


def test_files_without_languages_says_what_labels_the_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, tgt = numbered(30)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    prepare_files(tmp_path / "named", s, t, src_lang="de", tgt_lang="en")
    assert "no languages given" not in caplog.text
    prepare_files(tmp_path / "unnamed", s, t)
    assert "no language given (--src-lang, --tgt-lang): a model trained on this corpus is labelled with its " \
        "config's data.src_lang and data.tgt_lang there" in caplog.text
    prepare_files(tmp_path / "half", s, t, src_lang="de")
    assert "no language given (--tgt-lang)" in caplog.text


def test_files_refuses_what_is_no_language_code(tmp_path: Path) -> None:
    # "zh cn" got the 13a BLEU tokenizer instead of zh's, "" labelled a model with nothing, both silently.
    src, tgt = numbered(30)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    for src_lang, tgt_lang, bad in (("", "en", "--src-lang ''"), ("es", "zh cn", "--tgt-lang 'zh cn'"),
                                    ("english", "en", "--src-lang 'english'"), ("../x", "en", "--src-lang '../x'"),
                                    ("x", "en", "--src-lang 'x'")):
        with pytest.raises(NMTError, match=re.escape(f"{bad} is not a language code")):
            prepare_files(tmp_path / "out", s, t, src_lang=src_lang, tgt_lang=tgt_lang)
    assert not (tmp_path / "out").exists()
    for i, (src_lang, tgt_lang) in enumerate((("pt-BR", "zh-Hans"), ("es_ES", "sr-Latn-RS"), ("nb", "fil"),
                                               ("es-419", "zh-Hant-TW"), ("x-klingon", "de-DE-u-co-phonebk"))):
        assert prepare_files(tmp_path / f"ok{i}", s, t, src_lang=src_lang, tgt_lang=tgt_lang)["tgt_lang"] == tgt_lang


def test_files_warns_of_mix_ups_a_corpus_of_the_right_shape_hides(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    src, tgt = numbered(60)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    ds, dt = write(tmp_path / "ds", src[:5]), write(tmp_path / "dt", tgt[:5])
    prepare_files(tmp_path / "fine", s, t, dev_src=ds, dev_tgt=dt, test_src=ds, test_tgt=write(tmp_path / "x", src[:5]))
    assert "same" not in caplog.text
    prepare_files(tmp_path / "copy", s, s)
    assert "source and target are the same in every pair (one file given twice?)" in caplog.text
    prepare_files(tmp_path / "twice", s, t, dev_src=ds, dev_tgt=dt, test_src=ds, test_tgt=dt)
    assert "the dev and test data are the same pairs" in caplog.text


def test_files_existing_outdir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, tgt = numbered(30)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train.py").write_text("mine")  # a split's name, but no corpus file
    for overwrite in (False, True):  # --overwrite replaced it whole (a home directory, when OUTDIR was ~)
        with pytest.raises(NMTError, match="not empty and holds no previous corpus .*: write the corpus to a new or "
                                           "empty directory"):
            prepare_files(out, s, t, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.py"]
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / ".gitkeep").write_text("")
    with pytest.raises(NMTError, match=r"is not empty \(its hidden files count: \.gitkeep\)"):
        prepare_files(kept, s, t)
    previous = tmp_path / "previous"
    prepare_files(previous, s, t)
    (previous / "test.ref").mkdir()  # a directory named as a corpus file: it was deleted, with what it held
    (previous / "test.ref" / "mine").write_text("mine")
    with pytest.raises(NMTError, match="test.ref is a directory, not a corpus file"):
        prepare_files(previous, s, t, overwrite=True)
    assert (previous / "test.ref" / "mine").read_text() == "mine"
    shutil.rmtree(previous)
    out = tmp_path / "out2"
    prepare_files(out, s, t)
    (out / "notes.txt").write_text("mine")
    (out / "train.py").write_text("mine")
    prepare_files(out, s, t, overwrite=True)
    assert (out / "notes.txt").read_text() == (out / "train.py").read_text() == "mine"  # kept
    assert (out / "corpus.json").is_file()
    (out / "notes.txt").unlink()
    (out / "train.py").unlink()
    # A previous corpus is replaced without --overwrite, and said so; an empty directory is fine too.
    caplog.set_level(logging.INFO, logger="nmt.corpus")
    r = prepare_files(out, s, t, seed=99)
    assert caplog.text.count(f"replacing the previous corpus in {out}") == 1  # it was said twice
    assert r["settings"]["seed"] == 99
    assert json.loads((out / "corpus.json").read_text())["settings"]["seed"] == 99
    (tmp_path / "empty").mkdir()
    prepare_files(tmp_path / "empty", s, t)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NMTError, match="not a directory"):
        prepare_files(tmp_path / "file", s, t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "kept", "out", "out2", "s", "t"]


def test_files_never_replace_their_inputs_or_a_users_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # These were deleted: the inputs inside OUTDIR (with --overwrite, as the refusal advised), files beside a
    # previous corpus (without it), and the whole current directory for OUTDIR "." (a ValueError besides).
    src, tgt = numbered(30)
    out = tmp_path / "out"
    out.mkdir()
    s, t = write(out / "corpus.de", src), write(out / "corpus.en", tgt)
    with pytest.raises(NMTError, match="corpus.de is inside .*out, which the corpus replaces"):
        prepare_files(out, s, t, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["corpus.de", "corpus.en"]
    prepare_files(tmp_path / "c", s, t)
    (tmp_path / "c" / "README.txt").write_text("mine")
    with pytest.raises(NMTError, match=r"holds a previous corpus and other files \(README.txt\).*--overwrite to "
                                       "replace the corpus and keep them"):
        prepare_files(tmp_path / "c", s, t, seed=2)
    assert (tmp_path / "c" / "README.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path / "c")
    with pytest.raises(NMTError, match="holds the current directory"):
        prepare_files(".", s, t, overwrite=True)
    with pytest.raises(NMTError, match=r"corpus.de is inside \.\., which the corpus replaces"):
        prepare_files("..", s, t, overwrite=True)
    assert (tmp_path / "c" / "README.txt").read_text() == "mine" and s.is_file()


def test_files_failure_while_writing_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, tgt = numbered(30)
    s, t = write(tmp_path / "s", src), write(tmp_path / "t", tgt)
    out = tmp_path / "out"
    prepare_files(out, s, t, seed=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(corpus.json, "dumps", boom)
    with pytest.raises(NMTError, match="cannot write a corpus to .*out: disk full"):
        prepare_files(out, s, t, seed=2)
    with pytest.raises(NMTError, match="disk full"):
        prepare_files(tmp_path / "new", s, t)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s", "t"]


@settings(deadline=None)  # no timing: a loaded CI machine took past hypothesis's 200 ms
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_normalize_text_properties(text: str) -> None:
    out = normalize_text(text)
    assert out == out.strip() and "  " not in out
    assert all(c == " " or not c.isspace() for c in out)
    assert not any(unicodedata.category(c) == "Cc" for c in out)
    assert unicodedata.is_normalized("NFC", out)
    assert normalize_text(out) == out


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def test_cli_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, tgt = numbered(100)
    s = write(tmp_path / "s", src + ["", "dup", "dup"])
    t = write(tmp_path / "t", tgt + ["x", "dup", "dup"])
    out = tmp_path / "out"
    rc = main(["prepare", "files", str(out), "--src", str(s), "--tgt", str(t), "--src-lang", "es",
               "--tgt-lang", "en", "--dev-size", "5", "--test-size", "5", "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"corpus: {out} (files, es -> en)" in printed
    assert "train 91  dev 5  test 5" in printed
    assert "read 103 pairs; dropped 2 (empty 1, duplicate 1)" in printed
    assert json.loads((out / "corpus.json").read_text())["counts"] == {"train": 91, "dev": 5, "test": 5}
    with pytest.raises(SystemExit) as refused:  # it was "nmt: error: ...", then "nmt prepare: error: ..."
        main(["prepare", "files", str(out), "--src", str(s), "--tgt", str(t), "--bogus"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == ("nmt prepare files: error: unrecognized arguments: --bogus "
                                       "(see nmt prepare files --help)\n")


def test_cli_files_tsv_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, tgt = numbered(30)
    tsv = write(tmp_path / "c.tsv", [f"{a}\t{b}" for a, b in zip(src, tgt, strict=True)])
    assert main(["prepare", "files", str(tmp_path / "o1"), "--tsv", str(tsv), "--max-len", "10",
                 "--max-ratio", "2.5"]) == 0
    assert "train 24  dev 3  test 3" in capsys.readouterr().out

    bad = write(tmp_path / "bad.txt", b"ok\n\xff\xfe\n")
    rc = main(["prepare", "files", str(tmp_path / "o2"), "--src", str(bad), "--tgt", str(bad)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"nmt prepare: error: {bad}:2: invalid UTF-8" in err
    assert not (tmp_path / "o2").exists()

    rc = main(["prepare", "files", str(tsv / "sub"), "--tsv", str(tsv)])  # said "File exists"
    assert rc == 2 and f"cannot create the directory {tsv}: a file of that name is in the way" in \
        capsys.readouterr().err

    rc = main(["prepare", "files", str(tmp_path / "o3"), "--src", str(tmp_path / "nope"), "--tgt", str(bad)])
    assert rc == 2 and f"source file not found: {tmp_path / 'nope'}" in capsys.readouterr().err

    with pytest.raises(SystemExit):  # argparse: a recipe is required
        main(["prepare"])
    assert "RECIPE" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["prepare"], ["prepare", "bible"], ["prepare", "files"]])
def test_cli_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: nmt prepare" in capsys.readouterr().out


def test_training_pairs_that_all_repeat_the_dev_set_are_named_as_such(tmp_path: Path) -> None:
    # "no training pairs left after cleaning (see the drop counts with -v)": -v showed none, the overlap went unsaid.
    src = write(tmp_path / "s.txt", [f"frase {i}" for i in range(20)])
    tgt = write(tmp_path / "t.txt", [f"sentence {i}" for i in range(20)])
    other_src, other_tgt = write(tmp_path / "os.txt", ["otra"]), write(tmp_path / "ot.txt", ["other"])
    with pytest.raises(NMTError, match="all 20 repeat a source of the dev or test set"):
        prepare_files(tmp_path / "a", src, tgt, dev_src=src, dev_tgt=tgt, test_src=other_src, test_tgt=other_tgt)
    with pytest.raises(NMTError, match=r"only 0 usable sentence pairs after cleaning \(20 of the 20 repeat a source"):
        prepare_files(tmp_path / "b", src, tgt, dev_src=src, dev_tgt=tgt)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
