"""Lexical shortlists: decode over the target pieces a source sentence can plausibly need, not all of them.

As Marian's lexical shortlist and the candidate lists of Jean et al. (2015), a sentence's output vocabulary is
the most frequent target pieces plus, for each of its source pieces and each of its words of several pieces,
the target pieces that co-occur with it most in the training pairs (ranked by Dice's coefficient over sentence
pairs). Words matter because a piece such as "re" (of "creó") says little about the translation, while the
word says "created". The output layer and the softmax then run over about two thousand pieces (the shipped
model's 2,000 most frequent and 10 per source piece or word) instead of the whole vocabulary.

A batch computes logits for the union of its sentences' shortlists once, and each sentence's softmax is masked
to its own shortlist, so in float32 a translation depends on the other sentences in its batch only through
rounding (its score in the last float digits: matrix products of other shapes round differently).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nmt.config import SPECIAL_PIECES, STORED_PER_SOURCE
from nmt.corpus import TRAIN_FILES, load_split
from nmt.errors import NMTError
from nmt.tokenizer import BOS, EOS, PAD, WORD_START, Tokenizer

log = logging.getLogger(__name__)

SHORTLIST_FILE = "shortlist.safetensors"


def split_words(ids: list[int], starts_word: list[bool]) -> list[tuple[int, ...]]:
    """The words of a piece sequence: runs of pieces, each beginning at a piece that starts a word."""
    words: list[tuple[int, ...]] = []
    current: list[int] = []
    for i in ids:
        if starts_word[i] and current:
            words.append(tuple(current))
            current = []
        current.append(i)
    if current:
        words.append(tuple(current))
    return words


@dataclass
class Shortlist:
    by_frequency: torch.Tensor  # (V_tgt,) target ids, most frequent first
    per_source: torch.Tensor  # (V_src + W, STORED_PER_SOURCE) target ids per source piece, then per word; EOS pads
    starts_word: torch.Tensor  # (V_src,) bool: the source piece begins a word
    words: list[tuple[int, ...]]  # the W words of several pieces that have candidates (row V_src + w)
    _rows: dict[tuple[int, ...], int] = field(init=False, repr=False)
    _starts: list[bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        base = self.starts_word.numel()
        self._rows = {w: base + i for i, w in enumerate(self.words)}
        self._starts = self.starts_word.tolist()

    def save(self, path: Path) -> None:
        dtype = torch.int16 if self.by_frequency.numel() <= 2**15 else torch.int32
        flat = [i for w in self.words for i in w]
        offsets = torch.cumsum(torch.tensor([0] + [len(w) for w in self.words]), 0)
        save_file({"by_frequency": self.by_frequency.to(dtype).contiguous(),
                   "per_source": self.per_source.to(dtype).contiguous(),
                   "starts_word": self.starts_word.to(torch.uint8).contiguous(),
                   "word_pieces": torch.tensor(flat, dtype=torch.int32),
                   "word_offsets": offsets.to(torch.int64).contiguous()}, str(path))

    @classmethod
    def load(cls, path: Path, src_vocab: int, tgt_vocab: int) -> Shortlist:
        """Read a shortlist file; a corrupted one or one for other vocabularies raises NMTError."""
        path.open("rb").close()  # PermissionError as such: safetensors says "No such file or directory"
        try:
            t = load_file(str(path))
            freq, per_source = t["by_frequency"].long(), t["per_source"].long()
            starts, pieces, offsets = t["starts_word"].bool(), t["word_pieces"].tolist(), t["word_offsets"].tolist()
            words = [tuple(pieces[a:b]) for a, b in zip(offsets, offsets[1:], strict=False)]
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
            raise NMTError(f"{path} is not a readable shortlist file ({exc})") from None

        def ids_in(t: torch.Tensor, size: int) -> bool:
            return not t.numel() or 0 <= int(t.min()) <= int(t.max()) < size

        if (freq.dim() != 1 or freq.numel() != tgt_vocab or not ids_in(freq, tgt_vocab)
                or starts.dim() != 1 or starts.numel() != src_vocab
                or not offsets or offsets[0] != 0 or offsets[-1] != len(pieces)
                or any(a > b for a, b in zip(offsets, offsets[1:], strict=False))
                or not ids_in(torch.tensor(pieces, dtype=torch.long), src_vocab)
                or per_source.dim() != 2 or per_source.size(0) != src_vocab + len(words)
                or not ids_in(per_source, tgt_vocab)):
            raise NMTError(f"{path} does not fit this model's vocabularies ({src_vocab} source, {tgt_vocab} "
                           "target pieces); export the model again to rebuild it")
        return cls(freq, per_source, starts, words)

    def rows(self, ids: list[int]) -> list[int]:
        """The per_source rows of a source sentence: its pieces, then its words of several pieces that have one."""
        words = (self._rows.get(w) for w in split_words(ids, self._starts) if len(w) > 1)
        return [*ids, *(r for r in words if r is not None)]

    def for_batch(self, src: torch.Tensor, frequent: int, per_source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a padded (B, S) source batch: the sorted target ids to compute logits for (V',), and a (B, V')
        bias that is 0 where a piece is in that sentence's own shortlist and -inf elsewhere."""
        sentences = [[i for i in row if i not in (PAD, BOS, EOS)] for row in src.tolist()]
        rows = [self.rows(ids) for ids in sentences]
        width = max((len(r) for r in rows), default=0)
        index = torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long).view(-1)
        # The special pieces, ids 0-3, are always in the list, so that their positions equal their ids.
        common = torch.cat([torch.arange(SPECIAL_PIECES), self.by_frequency[:frequent]])
        own = self.per_source[:, :per_source].index_select(0, index).view(src.size(0), -1)
        ids = torch.unique(torch.cat([common, own.reshape(-1)]))  # sorted, so specials keep their ids
        bias = torch.full((src.size(0), ids.numel()), float("-inf"))
        bias[:, torch.searchsorted(ids, common)] = 0.0
        bias.scatter_(1, torch.searchsorted(ids, own), 0.0)
        return ids.to(src.device), bias.to(src.device)


def _sentence_sets(seqs: list[list[int]], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids of each sequence, concatenated (grouped by sequence), and how many each has."""
    lens = torch.tensor([len(x) for x in seqs], dtype=torch.long)
    flat = torch.tensor([i for x in seqs for i in x], dtype=torch.long)
    keys = torch.unique(torch.repeat_interleave(torch.arange(len(seqs)), lens) * vocab + flat)
    return keys % vocab, torch.bincount(keys // vocab, minlength=len(seqs))


def _cooccurrences(src: list[list[int]], tgt: list[list[int]], tgt_vocab: int) -> torch.Tensor:
    """Keys source_id * tgt_vocab + target_id, one for each pair of pieces that occur in the same sentence pair."""
    s_ids, s_lens = _sentence_sets(src, 1 << 31)
    t_ids, t_lens = _sentence_sets(tgt, 1 << 31)
    combos = s_lens * t_lens
    sent = torch.repeat_interleave(torch.arange(len(src)), combos)
    local = torch.arange(int(combos.sum())) - torch.repeat_interleave(torch.cumsum(combos, 0) - combos, combos)
    s_start, t_start = torch.cumsum(s_lens, 0) - s_lens, torch.cumsum(t_lens, 0) - t_lens
    width = t_lens[sent]
    return s_ids[s_start[sent] + local // width] * tgt_vocab + t_ids[t_start[sent] + local % width]


def build_shortlist(src: list[list[int]], tgt: list[list[int]], src_vocab: int, tgt_vocab: int,
                    starts_word: list[bool], chunk: int = 10_000) -> Shortlist:
    """Rank, for each source piece and each word of several pieces seen in two or more training pairs, the
    target pieces that occur in the same pairs (at least twice)."""
    if not src or len(src) != len(tgt):
        raise NMTError("a shortlist needs the training pairs (none were found)")
    sentence_words = [{w for w in split_words(ids, starts_word) if len(w) > 1} for ids in src]
    df = Counter(w for words in sentence_words for w in words)
    words = sorted(w for w, n in df.items() if n >= 2)
    row = {w: src_vocab + i for i, w in enumerate(words)}
    src = [ids + [row[w] for w in ws if w in row] for ids, ws in zip(src, sentence_words, strict=True)]
    src_vocab += len(words)
    src_df, tgt_df = torch.zeros(src_vocab, dtype=torch.long), torch.zeros(tgt_vocab, dtype=torch.long)
    tgt_count = torch.zeros(tgt_vocab, dtype=torch.long)
    keys, cooc = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    for at in range(0, len(src), chunk):
        s_part, t_part = src[at:at + chunk], tgt[at:at + chunk]
        src_df += torch.bincount(_sentence_sets(s_part, src_vocab)[0], minlength=src_vocab)
        tgt_df += torch.bincount(_sentence_sets(t_part, tgt_vocab)[0], minlength=tgt_vocab)
        tgt_count += torch.bincount(torch.tensor([i for x in t_part for i in x], dtype=torch.long),
                                    minlength=tgt_vocab)
        keys, inverse = torch.unique(torch.cat([keys, _cooccurrences(s_part, t_part, tgt_vocab)]),
                                     return_inverse=True)
        cooc = torch.zeros(keys.numel(), dtype=torch.long).index_add_(
            0, inverse, torch.cat([cooc, torch.ones(inverse.numel() - cooc.numel(), dtype=torch.long)]))
    # A piece pair seen in one sentence pair only says little; leaving such pairs out keeps the lists short.
    keys, cooc = keys[cooc >= 2], cooc[cooc >= 2]
    s_id, t_id = keys // tgt_vocab, keys % tgt_vocab
    dice = 2.0 * cooc / (src_df[s_id] + tgt_df[t_id])
    # Best first within each source piece: sort by score, then (stably) by source id.
    order = torch.argsort(dice, descending=True, stable=True)
    order = order[torch.argsort(s_id[order], stable=True)]
    s_sorted, t_sorted = s_id[order], t_id[order]
    rank = torch.arange(s_sorted.numel()) - torch.searchsorted(s_sorted, s_sorted)
    keep = rank < STORED_PER_SOURCE
    per_source = torch.full((src_vocab, STORED_PER_SOURCE), EOS, dtype=torch.long)
    per_source[s_sorted[keep], rank[keep]] = t_sorted[keep]
    per_source[PAD] = EOS
    by_frequency = torch.argsort(tgt_count, descending=True, stable=True)
    log.info("shortlist from %d pairs: candidates for %d source pieces and words", len(src),
             int(torch.unique(s_id).numel()))
    return Shortlist(by_frequency, per_source, torch.tensor(starts_word, dtype=torch.bool), words)


def shortlist_from_corpus(data_dir: Path, src_tok: Tokenizer, tgt_tok: Tokenizer) -> Shortlist | None:
    """The shortlist of a prepared corpus's training pairs (train.src, train.tgt), or None when they are gone."""
    files = [data_dir / name for name in TRAIN_FILES]
    if not all(f.is_file() for f in files):
        log.warning("no shortlist: the training data (%s) is not there (nmt export --data DIR points to it); "
                    "the model decodes over its whole vocabulary", " and ".join(map(str, files)))
        return None
    if not files[0].stat().st_size:
        log.warning("no shortlist: %s is empty; the model decodes over its whole vocabulary", files[0])
        return None
    src, tgt = load_split(data_dir, "train")
    # A punctuation piece stands alone, so that "creó," and "creó." count as "creó".
    starts_word = [p.startswith(WORD_START) or not any(c.isalnum() for c in p)
                   for p in src_tok.pieces(list(range(len(src_tok))))]
    return build_shortlist(src_tok.encode_batch(src), tgt_tok.encode_batch(tgt), len(src_tok), len(tgt_tok),
                           starts_word)
