"""Lexical shortlists: what they hold, how they are stored, and the per-sentence lists a batch gets."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from nmt.errors import NMTError
from nmt.shortlist import STORED_PER_SOURCE, Shortlist, build_shortlist, split_words
from nmt.tokenizer import EOS

# Source pieces 10-13, target pieces 20-23; 10 <-> 20, 11 <-> 21 and 12 <-> 22 go together. Every piece starts
# a word, except 14 and 15, which continue one.
SRC = [[10, 11], [10, 12], [10, 11, 13], [12]]
TGT = [[20, 21], [20, 22], [20, 21, 23], [22, 22]]
STARTS = [True] * 14 + [False, False]


def build(src=SRC, tgt=TGT, **kwargs) -> Shortlist:
    return build_shortlist(src, tgt, 16, 26, STARTS, **kwargs)


def test_candidates_are_ranked_by_dice_and_pairs_seen_once_are_left_out():
    shortlist = build()
    # Dice over sentence pairs: (10, 20) 6/6, (10, 21) 4/5; (11, 21) 4/4, (11, 20) 4/5; (12, 22) 4/4.
    # (10, 22), (12, 20) and everything with 13 or 23 co-occur once.
    assert shortlist.per_source.shape == (16, STORED_PER_SOURCE) and shortlist.words == []
    assert shortlist.per_source[10, :3].tolist() == [20, 21, EOS]
    assert shortlist.per_source[11, :3].tolist() == [21, 20, EOS]
    assert shortlist.per_source[12, :2].tolist() == [22, EOS]
    assert (shortlist.per_source[13] == EOS).all() and (shortlist.per_source[0] == EOS).all()
    assert shortlist.by_frequency[:4].tolist() == [20, 22, 21, 23]  # 3, 3, 2 and 1 occurrences
    assert sorted(shortlist.by_frequency.tolist()) == list(range(26))


def test_counting_in_chunks_gives_the_same_lists():
    whole = build(SRC * 5, TGT * 5)
    chunked = build(SRC * 5, TGT * 5, chunk=3)
    assert torch.equal(whole.per_source, chunked.per_source)
    assert torch.equal(whole.by_frequency, chunked.by_frequency)


def test_a_batch_gets_the_union_and_each_sentence_its_own_pieces():
    shortlist = build()
    src = torch.tensor([[10, 0, 0], [12, 13, 3]])  # padding, and an EOS
    ids, bias = shortlist.for_batch(src, frequent=1, per_source=2)
    assert ids.tolist() == [0, 1, 2, 3, 20, 21, 22]  # the special ids keep their positions
    open_ids = [[i for i, b in zip(ids.tolist(), row, strict=True) if b == 0] for row in bias.tolist()]
    assert open_ids == [[0, 1, 2, 3, 20, 21], [0, 1, 2, 3, 20, 22]]
    assert bias.shape == (2, 7) and set(bias.unique().tolist()) == {0.0, float("-inf")}


def test_save_and_load_round_trip_and_mismatches_are_clear_errors(tmp_path):
    shortlist = build()
    path = tmp_path / "shortlist.safetensors"
    shortlist.save(path)
    loaded = Shortlist.load(path, 16, 26)
    assert torch.equal(loaded.per_source, shortlist.per_source)
    assert torch.equal(loaded.by_frequency, shortlist.by_frequency)
    with pytest.raises(NMTError, match="does not fit this model's vocabularies"):
        Shortlist.load(path, 16, 8000)
    with pytest.raises(NMTError, match="does not fit this model's vocabularies"):
        Shortlist.load(path, 17, 26)
    tensors = load_file(str(path))
    for name, bad in (("by_frequency", torch.full((26,), 99, dtype=torch.int16)),
                      ("per_source", torch.full((16, STORED_PER_SOURCE), -1, dtype=torch.int16)),
                      ("word_offsets", torch.tensor([0, 5], dtype=torch.int64)),
                      ("starts_word", torch.ones((4, 4), dtype=torch.uint8))):
        save_file({**tensors, name: bad}, str(path))
        with pytest.raises(NMTError, match="does not fit this model's vocabularies"):
            Shortlist.load(path, 16, 26)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(NMTError, match="not a readable shortlist file"):
        Shortlist.load(path, 16, 26)


def test_no_training_pairs_is_a_clear_error():
    with pytest.raises(NMTError, match="needs the training pairs"):
        build([], [])


def test_words_of_several_pieces_get_candidates_of_their_own():
    # Pieces 13 14 15 spell one word (like "c re ó"), which goes with target piece 23; each of its pieces occurs
    # more often elsewhere, with other targets, so that no piece alone ranks 23 first.
    src = [[13, 14, 15, 10], [13, 14, 15], [13, 14, 15]] + [[13, 11]] * 3 + [[12, 14]] * 4 + [[12, 15]] * 4
    tgt = [[23, 20], [23], [25]] + [[21]] * 3 + [[22]] * 8
    assert split_words([13, 14, 15, 10, 12, 14], STARTS) == [(13, 14, 15), (10,), (12, 14)]
    shortlist = build(src, tgt)
    assert shortlist.words == [(12, 14), (12, 15), (13, 14, 15)]
    word = 16 + 2
    assert shortlist.per_source[word, 0].item() == 23
    assert [shortlist.per_source[piece, 0].item() for piece in (13, 14, 15)] == [21, 22, 22]
    assert shortlist.rows([13, 14, 15, 10]) == [13, 14, 15, 10, word]
    assert shortlist.rows([10, 14]) == [10, 14]  # a word without candidates adds no row
    ids, bias = shortlist.for_batch(torch.tensor([[13, 14, 15, 3], [13, 10, 14, 3]]), frequent=0, per_source=1)
    open_ids = [{i for i, b in zip(ids.tolist(), row, strict=True) if b == 0} for row in bias.tolist()]
    assert 23 in open_ids[0] and 23 not in open_ids[1]


def test_save_and_load_keep_the_words(tmp_path):
    src = [[13, 14, 15, 10], [13, 14, 15], [13, 11]]
    shortlist = build(src, [[23, 20], [23], [21]])
    shortlist.save(tmp_path / "s.safetensors")
    loaded = Shortlist.load(tmp_path / "s.safetensors", 16, 26)
    assert loaded.words == shortlist.words == [(13, 14, 15)]
    assert torch.equal(loaded.per_source, shortlist.per_source)
    assert loaded.rows([13, 14, 15]) == [13, 14, 15, 16]
