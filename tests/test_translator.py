"""The Translator: text in, text out, on the tiny reverse-task model (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import nmt.decoder
import nmt.int8
import nmt.onednn
import nmt.translator
from nmt.checkpoint import load_checkpoint, step_checkpoints
from nmt.cli import main
from nmt.config import load_config, save_config
from nmt.errors import NMTError
from nmt.search import Hypothesis
from nmt.shortlist import shortlist_from_corpus
from nmt.tokenizer import UNK, Tokenizer
from nmt.translator import Translator

LETTERS = "abcdefghijklmnop"


@pytest.fixture(scope="module")
def translator(tiny_model_dir: Path) -> Translator:
    return Translator.load(tiny_model_dir, threads=1)


def texts(results: list) -> list[str]:
    return [r.text for r in results]


def test_translates_the_reverse_task(translator):
    out = translator.translate(["a b c d", "p o n m l k", "e f g"])
    assert texts(out) == ["d c b a", "k l m n o p", "g f e"]
    assert all(r.score is not None and r.score < 0 for r in out)
    assert [len(r.alternatives) for r in out] == [1, 1, 1]
    assert out[0].alternatives[0].text == out[0].text and out[0].src_pieces is None


def test_no_repeat_ngram_from_the_call_the_config_or_the_cli(translator, tiny_model_dir, tmp_path, capsys):
    line = "a b a b a b"
    assert texts(translator.translate([line])) == ["b a b a b a"]  # the tiny config's default: no blocking
    blocked = texts(translator.translate([line], no_repeat_ngram=2))[0].split()
    bigrams = list(zip(blocked, blocked[1:], strict=False))
    assert len(bigrams) == len(set(bigrams)) and blocked != "b a b a b a".split()
    configured = Translator.load(tiny_model_dir, threads=1)
    configured.cfg.decode.no_repeat_ngram = 2
    assert texts(configured.translate([line]))[0].split() == blocked
    assert texts(configured.translate([line], no_repeat_ngram=0)) == ["b a b a b a"]
    src = tmp_path / "in.txt"
    src.write_text(line + "\n", encoding="utf-8")
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "--no-repeat-ngram", "2"]) == 0
    assert capsys.readouterr().out.split() == blocked
    with pytest.raises(SystemExit) as refused:  # by the argument parser, before the model loads
        main(["translate", str(tiny_model_dir), "-i", str(src), "--no-repeat-ngram", "-1"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == ("nmt translate: error: argument --no-repeat-ngram: must be an integer >= 0, "
                                       "got -1 (see nmt translate --help)\n")
    with pytest.raises(SystemExit) as refused:  # an input file as a second argument: it said "nmt: error: ..."
        main(["translate", str(tiny_model_dir), str(src)])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (f"nmt translate: error: unrecognized arguments: {src} "
                                       "(see nmt translate --help)\n")


@pytest.mark.parametrize("int8", [False, True])
def test_the_gate_table_decodes_like_the_matmul_it_replaces(tiny_model_dir, int8):
    lines = ["a b c d", "p o n m l", "e f g h i j k", "k"]
    table = Translator.load(tiny_model_dir, threads=1, int8=int8)
    plain = Translator.load(tiny_model_dir, threads=1, int8=int8)
    assert table.model.decoder.gate_table is not None
    assert not plain.model.decoder.cache_embedding_gates(0)  # a table over the limit is not built
    plain.model.decoder.gate_table = None
    for a, b in zip(table.translate(lines, beam_size=3, n_best=2), plain.translate(lines, beam_size=3, n_best=2),
                    strict=True):
        assert a.text == b.text and [x.text for x in a.alternatives] == [x.text for x in b.alternatives]
        assert a.score == pytest.approx(b.score, abs=1e-4)  # the table is fp32 with int8 too


def test_order_is_restored_and_batching_does_not_matter(translator):
    lines = ["a", "b c d e f g h i j k l", "p o", "k l m n o p a b", "c d e"]
    batched = translator.translate(lines, batch_tokens=10_000)
    for line, result in zip(lines, batched, strict=True):
        alone = translator.translate([line])[0]
        assert result.text == alone.text
        assert result.score == pytest.approx(alone.score, abs=1e-4)
    assert texts(translator.translate(lines, batch_tokens=1)) == texts(batched)


def test_empty_and_whitespace_inputs_skip_the_model(translator, monkeypatch):
    calls = []
    search = nmt.translator.search_ids

    def counting(model, ids, *args, **kwargs):
        calls.append(ids)
        return search(model, ids, *args, **kwargs)

    monkeypatch.setattr(nmt.translator, "search_ids", counting)
    out = translator.translate(["", "   ", "\n\t \n"], n_best=3, beam_size=3, return_alignment=True)
    assert texts(out) == ["", "   ", "\n\t \n"]  # whitespace as sent, as around translated text (it was "")
    assert all(r.score is None and r.alternatives == [] and r.alignment == [] for r in out)
    assert all(ids == [] for ids in calls)
    assert translator.translate([]) == []


def test_control_and_invisible_characters_are_removed_as_in_training_corpora(translator):
    # Corpora are normalized (nmt.text) before training: the same text at inference, not a NUL piece mid-word.
    odd = ["a\x00b c", "\u202ea b c\u202c", "a\u200b b\ufeff c\x1b", "\x00\u200b", "a b\x00\n\x00\u200e"]
    out = translator.translate(odd)
    assert texts(out) == texts(translator.translate(["ab c", "a b c", "a b c", "", "a b\n"]))
    assert out[3].score is None and out[3].alternatives == []
    assert translator.translate(["a b\x0c\n\x1fc d\x0b"])[0].text == translator.translate(["a b \n c d "])[0].text


def test_a_text_never_translates_to_nothing_unless_asked(translator):
    # As fairseq's --min-len 1: the shipped model translated "hola" to "" before (BeamSearch's min_len: test_search).
    assert translator.prepare(["a"]).search["min_len"] == 1
    assert translator.prepare(["a"], min_len=0).search["min_len"] == 0


def test_paragraphs_and_whitespace_are_kept(translator):
    out = translator.translate(["  a b c\n\n  d e f g \n", "a b\r\nc d"])[0:2]
    assert out[0].text == "  c b a\n\n  g f e d \n"
    assert out[1].text == "b a\r\nd c"


def test_long_input_is_split_into_sentences_not_truncated(translator):
    max_len = translator.max_len
    first = " ".join(LETTERS[i % 16] for i in range(max_len - 10)) + "."
    second = " ".join(LETTERS[(3 * i) % 16] for i in range(20)) + "!"
    text = first + "  " + second
    assert len(translator.src_tok.encode(text)) > max_len
    parts = texts(translator.translate([first, second]))
    assert translator.translate([text])[0].text == parts[0] + "  " + parts[1]


def test_each_sentence_of_a_line_is_its_own_segment(translator):
    # A short line of two sentences was one segment, and a model trained on single sentences (or verses) often
    # dropped the second one. Capitals here are pieces the tiny model maps to <unk>: the split is what counts.
    job = translator.prepare(["a b c.  D e f", "a b. c d", "Q. Xy"])
    assert [[job.segments[p].pieces for p in plan if isinstance(p, int)] for plan in job.plans] == [
        [translator._encode("a b c.")[1], translator._encode("D e f")[1]],
        [translator._encode("a b. c d")[1]], [translator._encode("Q. Xy")[1]]]
    alone = texts(translator.translate(["a b c.", "D e f"]))
    assert translator.translate(["a b c.  D e f"])[0].text == alone[0] + "  " + alone[1]
    # Control spaces between sentences come out as plain spaces, as around lines (they reached the output).
    for space in ("\x0c", "\x0b", " \x1c", "\x85"):
        assert translator.translate([f"a b c.{space}D e f"])[0].text == alone[0] + " " * len(space) + alone[1]


def test_a_sentence_longer_than_max_len_is_chunked_at_word_starts(translator, monkeypatch):
    words = [LETTERS[(7 * i) % 16] for i in range(2 * translator.max_len + 20)]
    n = translator.max_len
    chunks = texts(translator.translate([" ".join(words[:n]), " ".join(words[n:2 * n]), " ".join(words[2 * n:])]))
    searched = []
    search = nmt.translator.search_ids

    def recording(model, ids, *args, **kwargs):
        searched.extend(ids)
        return search(model, ids, *args, **kwargs)

    monkeypatch.setattr(nmt.translator, "search_ids", recording)
    assert translator.translate([" ".join(words)])[0].text == " ".join(chunks)
    # Every source piece went to the model, none in a segment over max_len: nothing was truncated.
    assert [len(ids) for ids in searched] == [n, n, 20]
    assert sum(searched, []) == translator.src_tok.encode(" ".join(words))


def test_non_latin_and_unknown_characters(translator):
    inputs = ["日本語のテキスト", "Привет мир", "a 🙂 b", "a\u200bb", "ÿ ü a"]
    for result in translator.translate(inputs, return_alignment=True):
        assert isinstance(result.text, str)
        assert len(result.alignment) == len(result.tgt_pieces)
    assert "\u2047" not in "".join(texts(translator.translate(inputs, ban_unk=True)))


def test_unknown_output_is_replaced_by_the_most_attended_source_piece(translator, monkeypatch):
    tok = translator.tgt_tok.sp.PieceToId
    asked = []

    def fake_search(model, ids, batch_tokens, device, return_attention=False, **kwargs):
        asked.append(return_attention)
        hyps = []
        for sentence in ids:
            attention = torch.zeros(4, len(sentence) + 1)
            attention[:, 0] = 1.0
            attention[1, 0], attention[1, 2] = 0.0, 1.0  # the <unk> looks at source piece 2
            hyps.append([Hypothesis([tok("▁b"), UNK, tok("▁a")], -1.0, -1.0, attention if return_attention else None)])
        return hyps

    monkeypatch.setattr(nmt.translator, "search_ids", fake_search)
    # Source pieces ▁a ▁b ▁ ü: the bare word start (2) goes out together with the character after it.
    assert translator.translate(["a b ü"])[0].text == "b ü a"
    assert asked == [False, True]  # decoded again with attention only because an <unk> came out
    assert translator.translate(["a b cü"])[0].text == "b c a"  # pieces ▁a ▁b ▁c ü: piece 2 is ▁c
    # An <unk> looking mostly at the source's end of sentence copies the most attended real piece (no IndexError).
    ends = []

    def at_the_end(model, ids, batch_tokens, device, return_attention=False, **kwargs):
        hyps = fake_search(model, ids, batch_tokens, device, return_attention, **kwargs)
        for sentence, (hyp,) in zip(ids, hyps, strict=True):
            if hyp.attention is not None:
                hyp.attention[1] = 0.0
                hyp.attention[1, len(sentence)], hyp.attention[1, 1] = 0.9, 0.1
                ends.append(len(sentence))
        return hyps

    monkeypatch.setattr(nmt.translator, "search_ids", at_the_end)
    assert translator.translate(["a b ü"])[0].text == "b b a" and ends
    monkeypatch.setattr(nmt.translator, "search_ids", fake_search)
    # SentencePiece writes <unk> as " ⁇ ", spaces around: one space each side of a word, none at the ends.
    assert translator.translate(["a b ü"], replace_unk=False)[0].text == "b \u2047 a"
    assert translator.tgt_tok.decode([UNK, tok("▁a"), UNK, UNK]) == "\u2047 a \u2047 \u2047"
    asked.clear()
    decoder = translator.model.decoder
    attention, decoder.attention = decoder.attention, None  # not monkeypatch: its undo deletes a submodule
    try:
        assert translator.translate(["a b ü"])[0].text == "b \u2047 a"
    finally:
        decoder.attention = attention
    assert asked == [False]  # a model without attention has nothing to copy: no second decoding


def test_n_best_alternatives_are_sorted_and_distinct(translator):
    for result in translator.translate(["a b c d e", "p a p a", "k"], beam_size=5, n_best=4):
        scores = [a.score for a in result.alternatives]
        assert scores == sorted(scores, reverse=True)
        assert len({a.text for a in result.alternatives}) == len(result.alternatives)
        assert 1 <= len(result.alternatives) <= 4
        assert result.alternatives[0].text == result.text


def test_the_n_best_of_a_text_of_sentences_are_the_best_combinations(translator, monkeypatch):
    # The r-th alternative used to join each sentence's r-th best: "a b c d" (-4.5) came second, and the better
    # "a b d c" (-1.6) never came.
    tok = translator.tgt_tok.sp.PieceToId
    first = translator._encode("a b.")[0]

    def fake_search(model, ids, batch_tokens, device, **kwargs):
        one = [(["▁b", "▁a"], -1.0), (["▁a", "▁b"], -1.5)]
        two = [(["▁d", "▁c"], -0.1), (["▁c", "▁d"], -3.0)]
        return [[Hypothesis([tok(p) for p in pieces], score, score) for pieces, score in (one if s == first else two)]
                for s in ids]

    monkeypatch.setattr(nmt.translator, "search_ids", fake_search)
    result = translator.translate(["a b.  D c"], beam_size=4, n_best=3)[0]
    assert [(a.text, round(a.score, 6)) for a in result.alternatives] == [
        ("b a  d c", -1.1), ("a b  d c", -1.6), ("b a  c d", -4.0)]
    assert result.text == "b a  d c" and len(translator.translate(["a b.  D c"], beam_size=4, n_best=4)[0]
                                                 .alternatives) == 4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=LETTERS + " \n.", max_size=40), min_size=1, max_size=3))
def test_alignment_cells_bound_the_alignments_before_decoding(translator, inputs):
    job = translator.prepare(inputs, return_alignment=True, beam_size=2)
    cells = sum(len(r.alignment) * len(r.alignment[0]) for r in translator.run(job) if r.alignment)
    assert cells <= job.alignment_cells


def test_alignment_shapes(translator):
    result = translator.translate(["a b c\nd e"], return_alignment=True)[0]
    assert result.src_pieces == ["▁a", "▁b", "▁c", "</s>", "▁d", "▁e", "</s>"]
    assert result.tgt_pieces.count("</s>") == 2
    matrix = torch.tensor(result.alignment)
    assert matrix.shape == (len(result.tgt_pieces), len(result.src_pieces))
    assert torch.allclose(matrix.sum(1), torch.ones(len(result.tgt_pieces)), atol=1e-4)
    first_rows = result.tgt_pieces.index("</s>") + 1
    assert float(matrix[:first_rows, 4:].sum()) == 0.0  # block diagonal: sentences do not attend across
    # the first target piece of "c b a" attends to "c"
    assert int(matrix[0].argmax()) == 2


def test_score_agrees_with_search(translator):
    sources = ["a b c d", "k l m", ""]
    best = translator.translate(sources, beam_size=1, length_penalty=0.0)
    scored = translator.score(sources, texts(best))
    for b, s in zip(best, scored, strict=True):
        if b.text:
            assert s.logprob == pytest.approx(b.score, abs=1e-4)
        assert len(s.pieces) == len(s.token_logprobs)
        assert s.pieces[-1] == "</s>"
        assert s.logprob == pytest.approx(sum(s.token_logprobs))
    wrong = translator.score(["a b c d"], ["a b c d"])[0]
    assert wrong.logprob < scored[0].logprob
    with pytest.raises(NMTError, match="pair up"):
        translator.score(["a"], ["a", "b"])


@pytest.mark.parametrize("options, message", [
    ({"beam_size": 0}, "beam_size"), ({"n_best": 6, "beam_size": 5}, "n_best"),
    ({"length_penalty": -1}, "length_penalty"), ({"batch_tokens": 0}, "batch_tokens"),
    ({"max_len": 0}, "max_len"), ({"beam_size": "5"}, "beam_size"),
])
def test_bad_options_are_clear_errors(translator, options, message):
    with pytest.raises(NMTError, match=message):
        translator.translate(["a"], **options)


def test_texts_must_be_a_list_of_strings(translator):
    with pytest.raises(NMTError, match="list of strings"):
        translator.translate("a b c")
    with pytest.raises(NMTError, match="list of strings"):
        translator.translate(["a", None])


def test_the_shortlist_comes_with_the_export_and_can_be_turned_off(tiny_run, tiny_model_dir, tmp_path, capsys):
    listed = Translator.load(tiny_model_dir, threads=1)
    assert listed.shortlist is not None and listed.info["shortlist"] is True and listed.info["decode"]["shortlist"]
    run = Translator.load(tiny_run)  # a run directory has no shortlist, whatever its config's decode.shortlist
    assert run.cfg.decode.shortlist and run.info["decode"]["shortlist"] is False
    lines = ["a b c d", "p o n m l", "e f g h i j k", "k"]

    def outputs(**options) -> list:
        return [(r.text, r.score) for r in listed.translate(lines, n_best=2, **options)]

    # The default list (the 2,000 most frequent pieces, and more) holds this tiny vocabulary whole.
    assert outputs() == outputs(shortlist=False)
    # Only each source letter's best candidate: still reversed, and scored over fewer pieces.
    listed.cfg.decode.shortlist_frequent, listed.cfg.decode.shortlist_per_source = 0, 1
    assert texts(listed.translate(lines)) == ["d c b a", "l m n o p", "k j i h g f e", "k"]
    assert all(a[1] > b[1] for a, b in zip(outputs(), outputs(shortlist=False), strict=True))

    narrow = tmp_path / "narrow"
    shutil.copytree(tiny_model_dir, narrow)
    config = narrow / "config.yaml"
    save_config(load_config(config, ["decode.shortlist_frequent=0", "decode.shortlist_per_source=1"]), config)
    src = tmp_path / "in.txt"
    src.write_text("a b c d\n", encoding="utf-8")
    sizes = ["--shortlist-frequent", "0", "--shortlist-per-source", "1"]
    for model, flag, expected in ((narrow, [], outputs()[0]), (narrow, ["--no-shortlist"], outputs(shortlist=False)[0]),
                                  (tiny_model_dir, sizes, outputs()[0])):
        assert main(["translate", str(model), "-i", str(src), "--n-best", "2", *flag]) == 0
        best = capsys.readouterr().out.splitlines()[0].split(" ||| ")
        assert best[1] == expected[0] and float(best[2]) == pytest.approx(expected[1], abs=1e-4)
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "--shortlist-per-source", "51"]) == 2
    assert "shortlist_per_source must be at most 50" in capsys.readouterr().err

    save_config(load_config(config, ["decode.shortlist=false"]), config)
    assert Translator.load(narrow).shortlist is None
    save_config(load_config(config, ["decode.shortlist=true"]), config)
    with pytest.raises(NMTError, match="shortlist_per_source' must be at most 50"):  # at export, as any config key
        load_config(config, ["decode.shortlist_per_source=51"])
    edited = config.read_text(encoding="utf-8").replace("shortlist_per_source: 1\n", "shortlist_per_source: 51\n")
    config.write_text(edited, encoding="utf-8")  # by hand
    with pytest.raises(NMTError, match="shortlist_per_source' must be at most 50"):
        Translator.load(narrow)
    save_config(load_config(config, ["decode.shortlist_per_source=1"]), config)
    (narrow / "shortlist.safetensors").write_bytes(b"garbage")
    assert main(["translate", str(narrow), "-i", str(src)]) == 2
    err = capsys.readouterr().err
    assert "not a readable shortlist file" in err and "Traceback" not in err
    # Told not to use it, translate refused for it all the same.
    assert main(["translate", str(narrow), "-i", str(src), "--no-shortlist"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == outputs(shortlist=False)[0][0]


def test_shortlist_sizes_that_cannot_apply_are_said_to_be_ignored(tiny_run, tiny_model_dir, tmp_path, caplog, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a b\n", encoding="utf-8")
    for model, flags, why in ((tiny_model_dir, ["--no-shortlist"], "--no-shortlist turns the shortlist off"),
                              (tiny_run, [], f"{tiny_run} decodes without one")):
        caplog.clear()
        assert main(["translate", str(model), "-i", str(src), "--shortlist-frequent", "5", *flags]) == 0
        assert f"--shortlist-frequent ignored: {why}" in caplog.text
    caplog.clear()
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "--shortlist-frequent", "5"]) == 0
    assert "ignored" not in caplog.text
    capsys.readouterr()


def test_a_shortlist_or_options_that_leave_nothing_to_choose_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    # Both were an IndexError: the search ended with no hypothesis at all.
    listed = Translator.load(tiny_model_dir, threads=1)
    with pytest.raises(NMTError, match="shortlist_frequent and shortlist_per_source are both 0"):
        listed.translate(["a b"], shortlist_frequent=0, shortlist_per_source=0, ban_unk=True)
    assert listed.translate(["a b"], shortlist=False, shortlist_frequent=0, shortlist_per_source=0)[0].text
    src = tmp_path / "in.txt"
    src.write_text("a b\n", encoding="utf-8")
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "--shortlist-frequent", "0",
                 "--shortlist-per-source", "0"]) == 2
    err = capsys.readouterr().err
    assert "both 0" in err and "Traceback" not in err
    # One candidate piece, which may not repeat, no <unk> and no end before five pieces: no translation is left.
    impossible = {"shortlist_frequent": 0, "shortlist_per_source": 1, "ban_unk": True, "no_repeat_ngram": 1,
                  "min_len": 5}
    with pytest.raises(NMTError, match="no translation of 'k' meets the decoding options"):
        listed.translate(["k"], **impossible)
    assert listed.translate(["a b"], **{**impossible, "min_len": 1})[0].text == "b a"


def test_no_training_data_means_no_shortlist(tiny_run, tmp_path, caplog):
    tokenizers = Tokenizer(tiny_run / "src.model"), Tokenizer(tiny_run / "tgt.model")
    assert shortlist_from_corpus(tmp_path / "gone", *tokenizers) is None
    assert "decodes over its whole vocabulary" in caplog.text
    (tmp_path / "empty").mkdir()
    for name in ("train.src", "train.tgt"):
        (tmp_path / "empty" / name).write_text("", encoding="utf-8")
    assert shortlist_from_corpus(tmp_path / "empty", *tokenizers) is None
    assert "is empty" in caplog.text


def test_export_reads_the_corpus_given_by_data(tiny_run, tiny_data, tmp_path, capsys):
    moved = shutil.copytree(tiny_data, tmp_path / "moved")
    out = tmp_path / "model"
    assert main(["export", str(tiny_run), str(out), "--data", str(moved)]) == 0
    assert (out / "shortlist.safetensors").is_file()
    # No corpus.json: the card names the directory, without the local part of its path.
    assert json.loads((out / "card.json").read_text(encoding="utf-8"))["data"] == {"dir": f"{tmp_path.name}/moved"}
    assert main(["export", str(tiny_run), str(tmp_path / "other"), "--data", str(tmp_path / "gone")]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "other").exists()
    (moved / "train.tgt").unlink()  # a directory, but not a prepared corpus
    assert main(["export", str(tiny_run), str(tmp_path / "other"), "--data", str(moved)]) == 2
    assert "no train.tgt" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_int8_is_the_cpu_default_and_translates_like_fp32(tiny_model_dir, translator, tmp_path):
    quantized, fp32 = Translator.load(tiny_model_dir, int8=True), Translator.load(tiny_model_dir, int8=False)
    # The default follows the config's decode.int8 (on) where the CPU has VNNI: the fixture's translator.
    assert (translator.info["int8"], quantized.info["int8"], fp32.info["int8"]) == (nmt.int8.vnni(), True, False)
    assert (translator.decode_defaults["int8"], fp32.decode_defaults["int8"]) == (nmt.int8.vnni(), False)
    off = tmp_path / "fp32-model"
    shutil.copytree(tiny_model_dir, off)
    cfg = load_config(off / "config.yaml")
    cfg.decode.int8 = False
    save_config(cfg, off / "config.yaml")
    assert Translator.load(off).info["int8"] is False
    # What decodes: int8 runs through oneDNN whatever decode.packed_matmuls says (that is the fp32 choice).
    packable = nmt.onednn.packable(torch.zeros(1, 1))
    assert (quantized.decode_defaults["packed_matmuls"], fp32.decode_defaults["packed_matmuls"]) == (
        True, packable and fp32.cfg.decode.packed_matmuls)
    assert quantized.info["parameters"] == fp32.info["parameters"]
    assert quantized.weights_sha256 == fp32.weights_sha256  # the float weights, quantized as they load
    lines = ["a b c d", "e f g h i j", "p o n", "k k l"]
    together = quantized.translate(lines)
    pairs = zip(texts(together), texts(fp32.translate(lines)), strict=True)
    assert sum(a == b for a, b in pairs) >= 3
    for line, batched in zip(lines, together, strict=True):  # as fp32: a text translates as it does alone
        alone = quantized.translate([line])[0]
        assert (alone.text, alone.score) == (batched.text, pytest.approx(batched.score, abs=1e-4))
    assert quantized.score(["a b"], ["b a"])[0].logprob > -1.0


def test_info(translator, tiny_model_dir):
    info = translator.info
    assert info["name"] == tiny_model_dir.name
    assert (info["src_lang"], info["tgt_lang"]) == ("src", "tgt")
    assert info["parameters"] == sum(p.numel() for p in translator.model.parameters())
    assert info["card"]["languages"] == {"src": "src", "tgt": "tgt"}


def test_run_directory_and_checkpoint_load(tiny_run, translator):
    lines = ["a b c", "m n o p"]
    expected = texts(translator.translate(lines))
    assert texts(Translator.load(tiny_run).translate(lines)) == expected
    from_checkpoint = Translator.load(tiny_run / "best.pt")
    assert texts(from_checkpoint.translate(lines)) == expected
    run = Translator.load(tiny_run)
    assert run.info["card"] is None
    # Without a card the id names the run, and the checkpoint when loaded from one: not just "best.pt".
    assert (run.name, from_checkpoint.name) == (tiny_run.name, f"{tiny_run.name}/best.pt")
    kept = step_checkpoints(tiny_run)[0]  # RUN/checkpoints/step-N.pt: the run's tokenizers are one level up
    from_step = Translator.load(kept)
    assert from_step.step == load_checkpoint(kept)["position"]["step"]
    assert from_step.name == f"{tiny_run.name}/checkpoints/{kept.name}"
    assert len(texts(from_step.translate(lines))) == 2


def test_one_thread_at_a_time(translator):
    lines = [" ".join(LETTERS[j] for j in range(i % 7 + 3)) for i in range(12)]
    expected = texts(translator.translate(lines))
    results: list = [None] * 4

    def work(i: int) -> None:
        results[i] = texts(translator.translate(lines))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=LETTERS + " .\n", max_size=40), max_size=5))
@example([" ", "ab c", "\n \n"])
def test_property_each_text_translates_as_if_alone(translator, inputs):
    together = translator.translate(inputs, beam_size=2)
    assert len(together) == len(inputs)
    for text, result in zip(inputs, together, strict=True):
        assert result.text == translator.translate([text], beam_size=2)[0].text
        if not text.strip():
            assert result.text == text  # whitespace-only texts come back as sent (a document keeps its layout)
        else:
            assert result.text.count("\n") == text.count("\n")


# ----------------------------------------------------------------------------------------------------------
# Loading errors and the CLI
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def broken(tmp_path: Path, tiny_run: Path) -> dict[str, Path]:
    """A corrupted checkpoint, a foreign one (a plain torch.save), a run dir without tokenizers, an empty dir."""
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes((tiny_run / "best.pt").read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "last.pt").write_bytes((tiny_run / "best.pt").read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"corrupt": bad, "foreign": foreign, "bare": bare, "empty": empty, "missing": tmp_path / "nope"}


@pytest.mark.parametrize("case, message", [
    ("corrupt", "not a readable rnnsearch checkpoint"), ("foreign", "not an rnnsearch checkpoint"),
    ("bare", "SentencePiece model not found"), ("empty", "holds no best.pt or last.pt"),
    ("missing", "model not found"),
])
def test_bad_models_are_clear_errors(broken, case, message, capsys, monkeypatch):
    with pytest.raises(NMTError, match=message):
        Translator.load(broken[case])
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\n"))
    assert main(["translate", str(broken[case])]) == 2
    err = capsys.readouterr().err
    assert "nmt translate: error:" in err and message in err and "Traceback" not in err


def test_cli_translate_files_and_n_best(tiny_model_dir, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("a b c\n\nm n o p\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "-o", str(out), "--beam", "2"]) == 0
    assert out.read_text(encoding="utf-8") == "c b a\n\np o n m\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b c\n"))  # - for stdin and stdout, as fairseq and sacrebleu
    assert main(["translate", str(tiny_model_dir), "-i", "-", "-o", "-", "--beam", "2"]) == 0
    assert capsys.readouterr().out == "c b a\n" and not Path("-").exists()
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "--beam", "3", "--n-best", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0 ||| c b a ||| -")
    assert lines[2] == "1 |||  ||| 0.0000"
    assert [line.split(" ||| ")[0] for line in lines] == ["0", "0", "1", "2", "2"]
    # --n-best 1 printed the plain translations: no way to get the best one's score.
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "--beam", "3", "--n-best", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [lines[0], lines[2], lines[3]]
    spaced = tmp_path / "spaced.txt"  # the 1-best keeps a line's layout; an n-best field has no spaces around it
    spaced.write_text("  a b \n", encoding="utf-8")
    assert main(["translate", str(tiny_model_dir), "-i", str(spaced), "--beam", "2"]) == 0
    assert capsys.readouterr().out == "  b a \n"
    assert main(["translate", str(tiny_model_dir), "-i", str(spaced), "--beam", "2", "--n-best", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("0 ||| b a ||| -")
    assert main(["translate", str(tiny_model_dir), "--beam", "2", "--n-best", "3", "-i", str(src)]) == 2
    assert "--n-best 3 is more than --beam 2" in capsys.readouterr().err
    assert main(["translate", str(tiny_model_dir), "-i", str(tmp_path / "nope.txt")]) == 2
    capsys.readouterr()
    # The same file as input and output was emptied, with exit status 0.
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "-o", str(tmp_path / "." / "in.txt")]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert src.read_text(encoding="utf-8") == "a b c\n\nm n o p\n"
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "-o", os.devnull]) == 0  # a device: fine
    if Path("/dev/full").exists():  # a full disk: every write fails with ENOSPC (was a traceback)
        assert main(["translate", str(tiny_model_dir), "-i", str(src), "-o", "/dev/full"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "nmt translate: error: cannot write the translations to /dev/full after 0 lines (No space " \
                      "left on device)"
    with open(src, encoding="utf-8") as stdin:  # `nmt translate MODEL -o in.txt < in.txt`
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(["translate", str(tiny_model_dir), "-o", str(src)]) == 2
    assert "is also an input (standard input)" in capsys.readouterr().err
    assert src.read_text(encoding="utf-8") == "a b c\n\nm n o p\n"
    # `nmt translate MODEL < in.txt >> in.txt` read its own output back without end, the file growing.
    with open(src, "rb") as stdin, open(src, "ab") as stdout:
        done = subprocess.run([sys.executable, "-m", "nmt", "translate", str(tiny_model_dir)], stdin=stdin,
                              stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2 and "standard output is also an input (standard input)" in done.stderr
    assert src.read_text(encoding="utf-8") == "a b c\n\nm n o p\n"


def test_translations_never_replace_the_model_files(tiny_model_dir, tmp_path, capsys):
    # `-o MODEL/model.safetensors` replaced the weights with the translations, exit 0: the model was gone.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = {path.name: path.read_bytes() for path in model.iterdir()}
    src = tmp_path / "in.txt"
    src.write_text("a b c\n", encoding="utf-8")
    for name in before:
        assert main(["translate", str(model), "-i", str(src), "-o", str(model / name)]) == 2
        assert f"{model / name} is also an input: write the output to another file" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in model.iterdir()} == before
    for _ in range(2):  # a file of its own, there, written again (not an input: the model never reads it)
        assert main(["translate", str(model), "-i", str(src), "-o", str(model / "new.txt")]) == 0


def test_an_output_that_cannot_be_written_is_refused_before_translating(tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    # -o naming a directory passed the check made for atomic writes and failed after the first batch.
    src = tmp_path / "in.txt"
    src.write_text("a b c\n", encoding="utf-8")
    real, batches = nmt.translator.Translator.translate, []

    def counted(self, texts, **options):
        batches.append(len(texts))
        return real(self, texts, **options)

    monkeypatch.setattr(nmt.translator.Translator, "translate", counted)
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "-o", str(tmp_path)]) == 2
    assert f"cannot write {tmp_path}: it is a directory" in capsys.readouterr().err and not any(batches)
    kept = tmp_path / "kept.txt"
    kept.write_text("mine\n", encoding="utf-8")
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "-o", str(kept)]) == 0
    assert kept.read_text(encoding="utf-8") == "c b a\n"


def test_closed_standard_streams_are_errors_not_silence(tiny_model_dir, tmp_path):
    # Started without standard input or output (`<&-`, `>&-`): translate hung after a TypeError traceback, score
    # exited 0 with its scores dropped, and without standard error translate failed (exit 1) having written nothing.
    src = tmp_path / "in.txt"
    src.write_text("a b c\n", encoding="utf-8")
    nmt = f"{shlex.quote(sys.executable)} -m nmt"
    model, text = shlex.quote(str(tiny_model_dir)), shlex.quote(str(src))
    for command, closed, message in (
            (f"translate {model}", "<&-", "cannot read standard input (standard input is closed)"),
            (f"score {model} --src - --hyp {text}", "<&-", "cannot read standard input (standard input is closed)"),
            (f"score {model} --src {text} --hyp {text}", ">&-", "cannot write to standard output (standard output "
                                                                "is closed)"),
            (f"translate {model} -i {text}", ">&-", "cannot write the translations to standard output after 0 lines "
                                                    "(standard output is closed)")):
        done = subprocess.run(["bash", "-c", f"{nmt} {command} {closed}"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.rstrip().endswith(message), (command, done.stderr)
    done = subprocess.run(["bash", "-c", f"{nmt} translate {model} -i {text} -o {text}.out 2>&-"], timeout=120)
    assert done.returncode == 0 and Path(f"{src}.out").read_text(encoding="utf-8") == "c b a\n"


def test_cli_translate_stdin_and_bad_utf8(tiny_model_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\nc d e\n"))
    assert main(["translate", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out == "b a\ne d c\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a b\n\xff\xfe\n")
    assert main(["translate", str(tiny_model_dir), "-i", str(bad)]) == 2
    captured = capsys.readouterr()
    assert f"{bad}:2: invalid UTF-8 (byte 0xff at column 1); convert it to UTF-8" in captured.err
    assert captured.out == "b a\n"
    out = tmp_path / "new" / "dir" / "out.txt"  # directories made, as every command's outputs
    assert main(["translate", str(tiny_model_dir), "-i", str(bad), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{bad}:2: invalid UTF-8 (byte 0xff at column 1); convert it to UTF-8, e.g. with iconv; {out} holds the "
        "translation of line 1")
    assert out.read_text(encoding="utf-8") == "b a\n"
    # Refused at its first line, the input leaves an existing output file as it was: it was emptied before.
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("año\n".encode("latin-1"))
    out.write_text("PRECIOUS\n", encoding="utf-8")
    assert main(["translate", str(tiny_model_dir), "-i", str(latin1), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{latin1}:1: invalid UTF-8 (byte 0xf1 at column 2); convert it "
                                                    "to UTF-8, e.g. with iconv")
    assert out.read_text(encoding="utf-8") == "PRECIOUS\n"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main(["translate", str(tiny_model_dir), "-i", str(empty), "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == ""  # no lines in, none out


def test_cli_translate_says_what_the_output_holds_when_interrupted(tiny_model_dir, monkeypatch, capsys, tmp_path):
    # It said "interrupted" alone, of a file it had overwritten with some of the translations.
    src, out = tmp_path / "s.txt", tmp_path / "out.txt"
    src.write_text("a b\n" * 200, encoding="utf-8")
    real, calls = nmt.translator.Translator.translate, []

    def interrupted(self, texts, **options):
        calls.append(len(texts))
        if len(calls) == 3:  # the options check, the first batch, then Ctrl-C
            raise KeyboardInterrupt
        return real(self, texts, **options)

    monkeypatch.setattr(nmt.translator.Translator, "translate", interrupted)
    assert main(["translate", str(tiny_model_dir), "-i", str(src), "-o", str(out)]) == 130
    done = calls[1]  # a batch: the lines read before input stalled for a moment, at most 64
    held = "the translation of line 1" if done == 1 else f"the translations of lines 1-{done}"
    assert capsys.readouterr().err.strip().endswith(f"nmt translate: interrupted; {out} holds {held}")
    assert out.read_text(encoding="utf-8") == "b a\n" * done


def test_cli_translate_refuses_old_mac_line_ends(tiny_model_dir, capsys, tmp_path):
    # Read as one line with carriage returns inside, translated as one text.
    mac, crlf = tmp_path / "mac.txt", tmp_path / "crlf.txt"
    mac.write_bytes(b"a b\rc d e\r")
    assert main(["translate", str(tiny_model_dir), "-i", str(mac)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().endswith(f"{mac} ends its lines with a bare carriage return (old Mac OS text): "
                                         "convert it to \\n line ends, e.g. with tr '\\r' '\\n'")
    assert captured.out == ""
    crlf.write_bytes(b"a b\r\nc d e\r")  # Windows line ends, the last line without its \n
    assert main(["translate", str(tiny_model_dir), "-i", str(crlf)]) == 0
    assert capsys.readouterr().out == "b a\ne d c\n"


def test_cli_translate_reads_gzip_files(tiny_model_dir, monkeypatch, capsys, tmp_path):
    # As evaluate, score and prepare do; it said "input line 1 is not valid UTF-8", and nothing of why.
    packed = tmp_path / "s.txt.gz"
    packed.write_bytes(gzip.compress(b"a b\nc d e\n"))
    assert main(["translate", str(tiny_model_dir), "-i", str(packed)]) == 0
    assert capsys.readouterr().out == "b a\ne d c\n"
    out = tmp_path / "out.txt.gz"  # and written compressed: plain text in a *.gz was no gzip file to read back
    assert main(["translate", str(tiny_model_dir), "-i", str(packed), "-o", str(out)]) == 0
    assert gzip.decompress(out.read_bytes()) == b"b a\ne d c\n"
    upper = tmp_path / "OUT.GZ"  # the name's case does not matter
    assert main(["translate", str(tiny_model_dir), "-i", str(packed), "-o", str(upper)]) == 0
    assert gzip.decompress(upper.read_bytes()) == b"b a\ne d c\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(packed.read_bytes())))
    assert main(["translate", str(tiny_model_dir)]) == 2
    assert "standard input is gzip-compressed: decompress it first (zcat FILE.gz | nmt translate ...)" in (
        capsys.readouterr().err)
    unnamed = tmp_path / "s.txt"
    unnamed.write_bytes(packed.read_bytes())
    assert main(["translate", str(tiny_model_dir), "-i", str(unnamed)]) == 2
    assert capsys.readouterr().err.strip().endswith("is gzip-compressed: name it *.gz to have it read as such, or "
                                                    "gunzip it")
    # A damaged one is said, not a reader thread that died and left the command waiting for ever.
    for damaged in (packed.read_bytes()[:-12], b"a b\n"):
        packed.write_bytes(damaged)
        assert main(["translate", str(tiny_model_dir), "-i", str(packed)]) == 2
        assert f"{packed}: not a readable gzip file" in capsys.readouterr().err


def test_cli_translate_streams_in_a_pipe(tiny_model_dir):
    """A line written to the pipe comes back translated before the input is closed."""
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "translate", str(tiny_model_dir), "--threads", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        proc.stdin.write("a b c\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "c b a\n"
        proc.stdin.write("d e\n")
        proc.stdin.close()
        assert proc.stdout.read() == "e d\n"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_cli_score(tiny_model_dir, tmp_path, capsys):
    src, hyp = tmp_path / "s.txt", tmp_path / "h.txt"
    src.write_text("a b c\nd e\n", encoding="utf-8")
    hyp.write_text("c b a\nd e\n", encoding="utf-8")
    assert main(["score", str(tiny_model_dir), "--src", str(src), "--hyp", str(hyp), "--tokens"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and float(rows[0][0]) > float(rows[1][0])
    assert rows[0][2].split()[0].startswith("▁c:") and rows[0][2].split()[-1].startswith("</s>:")
    hyp.write_text("c b a\n", encoding="utf-8")
    assert main(["score", str(tiny_model_dir), "--src", str(src), "--hyp", str(hyp)]) == 2
    assert "has 2 lines but" in capsys.readouterr().err
    assert main(["score", str(tiny_model_dir), "--src", "-", "--hyp", "-"]) == 2  # said "- has 4 lines but - has 0"
    assert "standard input can be read once: --src and --hyp cannot both be -" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["translate", "score"])
def test_thread_counts_that_crash_the_process_are_refused(tiny_model_dir, capsys, command):
    # `--threads 100000` was a segmentation fault (libgomp), exit 139.
    with pytest.raises(SystemExit) as refused:
        main([command, str(tiny_model_dir), *(["--src", "s", "--hyp", "h"] if command == "score" else []),
              "--threads", "100000"])
    assert refused.value.code == 2
    assert "argument --threads: must be an integer from 1 to 1024, got 100000" in capsys.readouterr().err
    with pytest.raises(NMTError, match="threads must be an integer from 1 to 1024, got 1025"):
        Translator.load(tiny_model_dir, threads=1025)
    with pytest.raises(NMTError, match="config key 'train.threads' must be at most 1024, got 100000"):
        load_config(None, ["train.threads=100000"])


def test_cli_score_prints_as_it_goes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    # It scored every pair before printing any: a Ctrl-C lost them all.
    src, hyp = tmp_path / "s.txt", tmp_path / "h.txt"
    src.write_text("a b c\n" * 300, encoding="utf-8")
    hyp.write_text("c b a\n" * 300, encoding="utf-8")
    real, parts = nmt.translator.Translator.run_score, []

    def interrupted(self, job, batch_tokens=None):
        parts.append(len(job.sources))
        if len(parts) == 2:
            raise KeyboardInterrupt
        return real(self, job, batch_tokens)

    monkeypatch.setattr(nmt.translator.Translator, "run_score", interrupted)
    assert main(["score", str(tiny_model_dir), "--src", str(src), "--hyp", str(hyp), "--batch-tokens", "16"]) == 130
    lines = capsys.readouterr().out.splitlines()
    assert 1 < parts[0] < 300 and len(lines) == parts[0] and len(set(lines)) == 1


def test_cli_score_batches_fill_the_budget(tiny_model_dir, tmp_path, monkeypatch):
    # Parts of 256 pairs capped every batch at 256 pairs, whatever --batch-tokens said.
    src, hyp = tmp_path / "s.txt", tmp_path / "h.txt"
    src.write_text("a b c\n" * 600, encoding="utf-8")
    hyp.write_text("c b a\n" * 600, encoding="utf-8")
    real, batches = nmt.translator.Translator.score_group, []

    def counted(self, job, group):
        batches.append(len(group))
        return real(self, job, group)

    monkeypatch.setattr(nmt.translator.Translator, "score_group", counted)
    assert main(["score", str(tiny_model_dir), "--src", str(src), "--hyp", str(hyp), "--batch-tokens", "100000"]) == 0
    assert batches == [600]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_results_that_cannot_be_written_are_a_one_line_error(tiny_model_dir, tiny_run, tiny_data, tmp_path):
    # Standard output on a full disk: score, evaluate, prepare and plot ended in a traceback with status 1.
    src, hyp = tmp_path / "s.txt", tmp_path / "h.txt"
    src.write_text("a b c\n" * 3000, encoding="utf-8")  # more than a buffer's worth of results
    hyp.write_text("c b a\n" * 3000, encoding="utf-8")
    commands = [["score", str(tiny_model_dir), "--src", str(src), "--hyp", str(hyp)],
                ["evaluate", "--hyp", str(hyp), "--ref", str(src)],
                ["plot", str(tiny_run), "-o", str(tmp_path / "curves.png")],
                ["prepare", "files", str(tmp_path / "corpus"), "--src", str(tiny_data / "train.src"), "--tgt",
                 str(tiny_data / "train.tgt")]]
    for command in commands:
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "-m", "nmt", *command], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
            f"nmt {command[0]}: error: cannot write to standard output (no space left on the device)", done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a pseudo-terminal")
def test_ctrl_c_on_interactive_translate_exits_130(tiny_model_dir):
    # It aborted (SIGABRT, "could not acquire lock for <_io.BufferedReader name='<stdin>'>") at shutdown.
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # as a terminal's foreground job: SIGINT as Python expects it (a background shell ignores it)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "nmt", "translate", str(tiny_model_dir)])
    seen = b""

    def read_until(text: bytes, seconds: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + seconds
        while text not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(fd, 4096)

    try:
        os.write(fd, b"a b c\n")
        read_until(b"c b a", 60)
        assert b"c b a" in seen
        os.write(fd, b"\x03")
        read_until(b"interrupted", 30)
        deadline = time.monotonic() + 30
        while not (done := os.waitpid(pid, os.WNOHANG))[0]:
            assert time.monotonic() < deadline, "still running 30 s after Ctrl-C"
            time.sleep(0.05)
        status = done[1]
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130
    assert b"nmt translate: interrupted" in seen and b"Fatal Python error" not in seen


def test_without_onednn_int8_the_default_decodes_in_fp32(tiny_model_dir, monkeypatch, caplog, tmp_path):
    # int8 is a speed option: where this torch build has no oneDNN int8 matmul, the model decodes in fp32, as
    # --no-int8 would, with a warning only when int8 was asked for.
    fp32 = Translator.load(tiny_model_dir, threads=1, int8=False)
    monkeypatch.setattr(nmt.decoder, "int8_available", lambda: False)
    with caplog.at_level("INFO", logger="nmt.translator"):
        default, asked = Translator.load(tiny_model_dir, threads=1), Translator.load(tiny_model_dir, int8=True)
    assert (default.int8, asked.int8) == (False, False)
    assert default.model.decoder.packs_matmuls == fp32.model.decoder.packs_matmuls
    off = tmp_path / "no-packing"  # and decode.packed_matmuls: false is kept, int8 or not
    shutil.copytree(tiny_model_dir, off)
    cfg = load_config(off / "config.yaml")
    cfg.decode.packed_matmuls = False
    save_config(cfg, off / "config.yaml")
    assert not Translator.load(off, threads=1).model.decoder.packs_matmuls
    warned = [r.levelname for r in caplog.records if "int8 matmuls cannot decode this model here" in r.message]
    assert warned == ["INFO", "WARNING"]
    lines = ["a b c d", "p o n"]
    assert texts(default.translate(lines)) == texts(fp32.translate(lines))


def test_a_model_with_non_finite_weights_decodes_in_fp32_not_in_int8(tiny_model_dir):
    # Quantizing an infinite weight gives finite nonsense: such a model decodes in fp32, where its overflowing scores
    # end the search as the search says (no hypotheses), rather than translating something.
    broken = Translator.load(tiny_model_dir, threads=1, int8=False).model
    with torch.no_grad():
        broken.decoder.hidden_proj.weight[0, 0] = float("inf")
    assert not broken.decoder.can_int8()
    assert Translator.load(tiny_model_dir, threads=1).model.decoder.can_int8() == nmt.int8.int8_available()


def test_without_vnni_the_default_decodes_in_fp32_and_int8_is_there_when_asked_for(tiny_model_dir, monkeypatch):
    # Without VNNI oneDNN's int8 kernels decoded at half fp32's speed or worse: the config's default does not use
    # them, --int8 still does.
    monkeypatch.setattr(nmt.translator, "vnni", lambda: False)
    assert Translator.load(tiny_model_dir, threads=1).int8 is False
    assert Translator.load(tiny_model_dir, threads=1, int8=True).int8 is True
    monkeypatch.setattr(nmt.translator, "vnni", lambda: True)
    assert Translator.load(tiny_model_dir, threads=1).int8 is True


@pytest.mark.parametrize(("limit", "fast"), [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", True),
                                             ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_a_oneDNN_isa_limit_without_vnni_turns_the_int8_default_off(limit, fast, monkeypatch):
    monkeypatch.setattr(nmt.int8, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    assert nmt.int8.vnni() is fast
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", limit)  # oneDNN's older name for the same limit
    assert nmt.int8.vnni() is fast
    monkeypatch.setattr(nmt.int8, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert nmt.int8.vnni() is False
