"""Token-budget batches from length buckets, and their padded tensors."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from nmt.tokenizer import BOS, EOS, PAD


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source ids, padded with PAD
    src_lens: torch.Tensor  # (B,) on CPU, as pack_padded_sequence wants
    tgt_in: torch.Tensor  # (B, T) BOS + target ids
    tgt_out: torch.Tensor  # (B, T) target ids + EOS, PAD where padded
    index: list[int]  # position of each row in the original list of sentences

    @property
    def ntokens(self) -> int:
        return int((self.tgt_out != PAD).sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device, non_blocking=True), self.src_lens,
                     self.tgt_in.to(device, non_blocking=True), self.tgt_out.to(device, non_blocking=True),
                     self.index)


def pad(seqs: list[list[int]], prefix: list[int] = (), suffix: list[int] = ()) -> torch.Tensor:
    """Right-pad id lists (each wrapped in prefix/suffix) into one (N, L) long tensor."""
    width = max(len(s) for s in seqs) + len(prefix) + len(suffix)
    out = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = [*prefix, *s, *suffix]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(src: list[list[int]], tgt: list[list[int]] | None, index: list[int]) -> Batch:
    src_t = pad(src, suffix=[EOS])
    lens = torch.tensor([len(s) + 1 for s in src], dtype=torch.long)
    if tgt is None:
        empty = torch.zeros((len(src), 0), dtype=torch.long)
        return Batch(src_t, lens, empty, empty, index)
    return Batch(src_t, lens, pad(tgt, prefix=[BOS]), pad(tgt, suffix=[EOS]), index)


def padded_tokens(longest: int, count: int) -> int:
    """What `count` sentences of at most `longest` tokens take of a token budget: each padded to the longest,
    its end of sentence included."""
    return (longest + 1) * count


def token_batches(src_lens: list[int], tgt_lens: list[int] | None, batch_tokens: int, max_sentences: int,
                  bucket_width: int = 1, rng: random.Random | None = None) -> list[list[int]]:
    """Group sentence indices into batches whose padded size stays within the token budget.

    Sentences are sorted by length bucket (shuffled inside a bucket when rng is given), so a batch holds
    sentences of similar length; the budget counts padded target tokens (source tokens when no target).
    """
    order = list(range(len(src_lens)))
    if rng is not None:
        rng.shuffle(order)
    lens = tgt_lens if tgt_lens is not None else src_lens
    order.sort(key=lambda i: (src_lens[i] // bucket_width, lens[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and (padded_tokens(max(longest, lens[i]), len(current) + 1) > batch_tokens
                        or len(current) >= max_sentences):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lens[i])
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches


class ParallelData:
    """A tokenized parallel corpus that yields a seeded, shuffled list of batches per epoch."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]], batch_tokens: int, max_sentences: int,
                 bucket_width: int):
        self.src, self.tgt = src, tgt
        self.batch_tokens, self.max_sentences, self.bucket_width = batch_tokens, max_sentences, bucket_width

    def __len__(self) -> int:
        return len(self.src)

    def epoch_batches(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        """The batches of one epoch (the same for a given seed and epoch), this rank's shard of them."""
        rng = random.Random(seed * 100_003 + epoch)
        batches = token_batches([len(s) for s in self.src], [len(t) for t in self.tgt], self.batch_tokens,
                                self.max_sentences, self.bucket_width, rng)
        usable = len(batches) - len(batches) % world if world > 1 else len(batches)
        return batches[rank:usable:world]

    def batch(self, indices: list[int]) -> Batch:
        return collate([self.src[i] for i in indices], [self.tgt[i] for i in indices], indices)
