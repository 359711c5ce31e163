"""Lexical shortlists: decode over the target pieces a source sentence can plausibly need, not all of them.

As Marian's lexical shortlist and the candidate lists of Jean et al. (2015), a sentence's output vocabulary is
the most frequent target pieces plus, for each of its source pieces, the target pieces that co-occur with it
most in the training pairs (ranked by Dice's coefficient over sentence pairs). The output layer and the
softmax then run over a few hundred to a few thousand pieces instead of the whole vocabulary.

A batch computes logits for the union of its sentences' shortlists once, and each sentence's softmax is masked
to its own shortlist, so a translation never depends on the other sentences in its batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nmt.errors import NMTError
from nmt.tokenizer import EOS, PAD, Tokenizer

log = logging.getLogger(__name__)

SHORTLIST_FILE = "shortlist.safetensors"
SPECIALS = 4  # pad, unk, bos, eos: ids 0-3, always in the list so that their positions equal their ids
STORED_PER_SOURCE = 100  # candidates kept per source piece in the file; decoding uses the first k of them


@dataclass
class Shortlist:
    by_frequency: torch.Tensor  # (V_tgt,) target ids, most frequent first
    per_source: torch.Tensor  # (V_src, STORED_PER_SOURCE) target ids, best first; EOS where there are fewer

    def save(self, path: Path) -> None:
        dtype = torch.int16 if self.by_frequency.numel() <= 2**15 else torch.int32
        save_file({"by_frequency": self.by_frequency.to(dtype).contiguous(),
                   "per_source": self.per_source.to(dtype).contiguous()}, str(path))

    @classmethod
    def load(cls, path: Path, src_vocab: int, tgt_vocab: int) -> Shortlist:
        """Read a shortlist file; a corrupted one or one for other vocabularies raises NMTError."""
        try:
            tensors = load_file(str(path))
            freq, per_source = tensors["by_frequency"].long(), tensors["per_source"].long()
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
            raise NMTError(f"{path} is not a readable shortlist file ({exc})") from None
        if (freq.dim() != 1 or per_source.dim() != 2 or per_source.size(0) != src_vocab
                or freq.numel() != tgt_vocab or per_source.numel() and int(per_source.max()) >= tgt_vocab
                or per_source.numel() and int(per_source.min()) < 0):
            raise NMTError(f"{path} does not fit this model's vocabularies ({src_vocab} source, {tgt_vocab} "
                           "target pieces); export the model again to rebuild it")
        return cls(freq, per_source)

    def for_batch(self, src: torch.Tensor, frequent: int, per_source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a padded (B, S) source batch: the sorted target ids to compute logits for (V',), and a (B, V')
        bias that is 0 where a piece is in that sentence's own shortlist and -inf elsewhere."""
        common = torch.cat([torch.arange(SPECIALS), self.by_frequency[:frequent]])
        own = self.per_source[:, :per_source].index_select(0, src.reshape(-1).cpu()).view(src.size(0), -1)
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
                    chunk: int = 10_000) -> Shortlist:
    """Rank, for each source piece, the target pieces that occur in the same training pairs (at least twice)."""
    if not src or len(src) != len(tgt):
        raise NMTError("a shortlist needs the training pairs (none were found)")
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
    log.info("shortlist from %d pairs: candidates for %d source pieces", len(src), int(torch.unique(s_id).numel()))
    return Shortlist(by_frequency, per_source)


def shortlist_from_corpus(data_dir: Path, src_tok: Tokenizer, tgt_tok: Tokenizer) -> Shortlist | None:
    """The shortlist of a prepared corpus's training pairs (train.src, train.tgt), or None when they are gone."""
    files = [data_dir / "train.src", data_dir / "train.tgt"]
    if not all(f.is_file() for f in files):
        log.warning("no shortlist: the training data (%s) is not there; the model decodes over its whole "
                    "vocabulary", " and ".join(map(str, files)))
        return None
    try:
        src, tgt = (f.read_text(encoding="utf-8").splitlines() for f in files)
    except (OSError, UnicodeDecodeError) as exc:
        raise NMTError(f"cannot read the training data in {data_dir} for the shortlist ({exc})") from None
    if len(src) != len(tgt):
        raise NMTError(f"{files[0]} and {files[1]} have {len(src)} and {len(tgt)} lines: not a prepared corpus")
    return build_shortlist(src_tok.encode_batch(src), tgt_tok.encode_batch(tgt), len(src_tok), len(tgt_tok))
