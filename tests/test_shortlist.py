"""Lexical shortlists: what they hold, how they are stored, and the per-sentence lists a batch gets."""

from __future__ import annotations

import pytest
import torch

from nmt.errors import NMTError
from nmt.shortlist import STORED_PER_SOURCE, Shortlist, build_shortlist
from nmt.tokenizer import EOS

# Source pieces 10-13, target pieces 20-23; 10 <-> 20, 11 <-> 21 and 12 <-> 22 go together.
SRC = [[10, 11], [10, 12], [10, 11, 13], [12]]
TGT = [[20, 21], [20, 22], [20, 21, 23], [22, 22]]


def test_candidates_are_ranked_by_dice_and_pairs_seen_once_are_left_out():
    shortlist = build_shortlist(SRC, TGT, 16, 26)
    # Dice over sentence pairs: (10, 20) 6/6, (10, 21) 4/5; (11, 21) 4/4, (11, 20) 4/5; (12, 22) 4/4.
    # (10, 22), (12, 20) and everything with 13 or 23 co-occur once.
    assert shortlist.per_source.shape == (16, STORED_PER_SOURCE)
    assert shortlist.per_source[10, :3].tolist() == [20, 21, EOS]
    assert shortlist.per_source[11, :3].tolist() == [21, 20, EOS]
    assert shortlist.per_source[12, :2].tolist() == [22, EOS]
    assert (shortlist.per_source[13] == EOS).all() and (shortlist.per_source[0] == EOS).all()
    assert shortlist.by_frequency[:4].tolist() == [20, 22, 21, 23]  # 3, 3, 2 and 1 occurrences
    assert sorted(shortlist.by_frequency.tolist()) == list(range(26))


def test_counting_in_chunks_gives_the_same_lists():
    whole = build_shortlist(SRC * 5, TGT * 5, 16, 26)
    chunked = build_shortlist(SRC * 5, TGT * 5, 16, 26, chunk=3)
    assert torch.equal(whole.per_source, chunked.per_source)
    assert torch.equal(whole.by_frequency, chunked.by_frequency)


def test_a_batch_gets_the_union_and_each_sentence_its_own_pieces():
    shortlist = build_shortlist(SRC, TGT, 16, 26)
    src = torch.tensor([[10, 0, 0], [12, 13, 3]])  # padding, and an EOS
    ids, bias = shortlist.for_batch(src, frequent=1, per_source=2)
    assert ids.tolist() == [0, 1, 2, 3, 20, 21, 22]  # the special ids keep their positions
    open_ids = [[i for i, b in zip(ids.tolist(), row, strict=True) if b == 0] for row in bias.tolist()]
    assert open_ids == [[0, 1, 2, 3, 20, 21], [0, 1, 2, 3, 20, 22]]
    assert bias.shape == (2, 7) and set(bias.unique().tolist()) == {0.0, float("-inf")}


def test_save_and_load_round_trip_and_mismatches_are_clear_errors(tmp_path):
    shortlist = build_shortlist(SRC, TGT, 16, 26)
    path = tmp_path / "shortlist.safetensors"
    shortlist.save(path)
    loaded = Shortlist.load(path, 16, 26)
    assert torch.equal(loaded.per_source, shortlist.per_source)
    assert torch.equal(loaded.by_frequency, shortlist.by_frequency)
    with pytest.raises(NMTError, match="does not fit this model's vocabularies"):
        Shortlist.load(path, 16, 8000)
    with pytest.raises(NMTError, match="does not fit this model's vocabularies"):
        Shortlist.load(path, 17, 26)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(NMTError, match="not a readable shortlist file"):
        Shortlist.load(path, 16, 26)


def test_no_training_pairs_is_a_clear_error():
    with pytest.raises(NMTError, match="needs the training pairs"):
        build_shortlist([], [], 16, 26)
