"""Batched beam search (greedy is beam size 1): B sentences x K beams advance as one tensor batch."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from nmt.batching import collate, token_batches
from nmt.config import DecodeConfig
from nmt.decoder import MemorySlots, OutputVocab, SegmentedMemory, State
from nmt.model import Seq2Seq
from nmt.tokenizer import BOS, EOS, PAD, UNK

# Source lengths (EOS included) at which a search's memory is split into parts (see SegmentedMemory): sentences up
# to 24 pieces, up to 48, and longer ones. Bible verses are 33 pieces on average, but a batch of 28 usually holds
# one of 70 or more, and attention over a single memory would read that much padding for every sentence.
SOURCE_GROUPS = (24, 48)
_DEFAULT = DecodeConfig()  # a search's defaults are the config's
# Candidates per chunk in best_candidates, and the number of candidates (beams x vocabulary columns) over all
# sentences from which it takes the best through chunks: below that, one top-k over all costs less.
TOP_CHUNK = 64
CHUNKED_FROM = 32_768


@dataclass
class Hypothesis:
    tokens: list[int]  # target ids, without BOS/EOS
    score: float  # log-probability divided by the length penalty: what hypotheses are ranked by
    logprob: float  # total log-probability, EOS included
    attention: torch.Tensor | None = None  # (len(tokens) + 1, S) weights per output token (EOS last)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha; 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha if alpha else 1.0


def output_limit(pieces: int, max_len_a: float, max_len_b: int) -> int:
    """The most pieces (EOS not counted) a sentence of this many source pieces (EOS not counted) decodes to."""
    return max(1, int(max_len_a * pieces + max_len_b))


def ngram_bans(tokens: torch.Tensor, ages: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The moves that would repeat an n-gram, as (rows, tokens): for each row of tokens (R, T), whose history is
    its last ages[r] entries, the token after each earlier occurrence of its last n - 1 tokens."""
    rows, width = tokens.shape
    if width < n:
        return tokens.new_zeros(0), tokens.new_zeros(0)
    windows = tokens.unfold(1, n, 1)  # (R, T - n + 1, n): every n-gram, by where it starts
    starts = torch.arange(width - n + 1, device=tokens.device)
    repeat = starts.unsqueeze(0) >= (width - ages).unsqueeze(1)  # the n-gram lies in the row's history
    if n > 1:
        repeat &= (windows[:, :, :-1] == tokens[:, width - n + 1:].unsqueeze(1)).all(-1)
    row, start = repeat.nonzero(as_tuple=True)
    return row, windows[row, start, n - 1]


def _merge_vocab(ids_a: torch.Tensor, bias_a: torch.Tensor, ids_b: torch.Tensor,
                 bias_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two shortlists' sorted ids and row biases over their union: (ids, bias_a, bias_b) with shared columns."""
    ids = torch.unique(torch.cat([ids_a, ids_b]))

    def spread(old: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out = bias.new_full((bias.size(0), ids.numel()), float("-inf"))
        out[:, torch.searchsorted(ids, old)] = bias
        return out
    return ids, spread(ids_a, bias_a), spread(ids_b, bias_b)


def best_candidates(scores: torch.Tensor, logp: torch.Tensor, n: int,
                    count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `count` best continuations of each of n sentences, from its beams' scores (n * k,) and their next-token
    log-probabilities (n * k, V): (n, count) totals, best first, and the beam (0..k-1) and column of each."""
    width = logp.size(1)
    cand = (scores.view(-1, 1) + logp).view(n, -1)
    full = cand.size(1) // TOP_CHUNK
    if cand.numel() < CHUNKED_FROM or full < count:
        top, index = cand.topk(count, dim=1)
        return top, index // width, index % width
    # torch's CPU top-k takes about 3 ns a candidate (a 24-sentence step's 330,000 took 0.4-0.6 ms, 5-7% of the
    # step), its max about 0.1. The best `count` lie in the `count` chunks with the highest maxima or in the tail
    # after the last whole chunk (ties aside: those keep the values and may take another of the equal
    # candidates), so top-k runs over those alone.
    chunks = cand[:, :full * TOP_CHUNK].view(n, full, TOP_CHUNK)
    best = chunks.amax(dim=2).topk(count, dim=1).indices
    picked = chunks.gather(1, best.unsqueeze(2).expand(-1, -1, TOP_CHUNK)).view(n, -1)
    top, at = torch.cat([picked, cand[:, full * TOP_CHUNK:]], dim=1).topk(count, dim=1)
    in_chunk = best.gather(1, (at // TOP_CHUNK).clamp(max=count - 1)) * TOP_CHUNK + at % TOP_CHUNK
    index = torch.where(at < picked.size(1), in_chunk, at - picked.size(1) + full * TOP_CHUNK)
    return top, index // width, index % width


class BeamSearch:
    """A batched beam search that sentences join (`add`) and leave (when done) between steps.

    B sentences x K beams advance as one tensor batch; each sentence keeps its own step count, output limit
    (max_len_a * source length + max_len_b tokens, EOS not counted; at least 1) and, below that limit, at least
    min_len tokens. A sentence stops once n_best finished hypotheses are out of reach of every live beam
    (log-probabilities only fall, so a live beam's best final score is bounded), or once beam_size finished ones
    all score above the best live beam as it stands (so beam size 1 is greedy decoding). `step` returns the
    sentences that stopped, with their n_best hypotheses, best first. Nothing about one sentence depends on the
    others in the batch, or on when it joined, but rounding (matrix products of other shapes round differently:
    scores may differ in the last float digits; int8 sums are exact). This lets a server keep one running batch
    full (continuous batching).

    With shortlists, every `add` gives one (sorted target ids (V',) holding the special ids, and a (B, V') bias
    of 0 on each sentence's own pieces and -inf elsewhere); each sentence's output is restricted to its pieces
    and its scores are log-probabilities normalized over them. Either every `add` of a search has one or none.
    """

    def __init__(self, model: Seq2Seq, beam_size: int = _DEFAULT.beam_size, n_best: int = 1,
                 alpha: float = _DEFAULT.length_penalty, max_len_a: float = _DEFAULT.max_len_a,
                 max_len_b: int = _DEFAULT.max_len_b, min_len: int = 0, ban_unk: bool = False,
                 no_repeat_ngram: int = _DEFAULT.no_repeat_ngram, return_attention: bool = False):
        if not 1 <= n_best <= beam_size:
            raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
        model.eval()
        self.model, self.k, self.n_best, self.alpha = model, beam_size, n_best, alpha
        self.max_len_a, self.max_len_b, self.min_len = max_len_a, max_len_b, min_len
        self.ban_unk, self.no_repeat_ngram = ban_unk, no_repeat_ngram
        self.with_attention = return_attention and model.decoder.attention is not None
        # One entry per live sentence, in row-group order: its key, tokens so far, output limit, source length,
        # and source-length group. The sentences of a group are consecutive, the groups in order.
        self.keys: list[Hashable] = []
        self.ages: list[int] = []
        self.limits: list[int] = []
        self.src_lens: list[int] = []
        self.groups: list[int] = []
        self.finished: dict[Hashable, list[Hypothesis]] = {}
        self.dropped: set[Hashable] = set()
        self.slots = [MemorySlots() for _ in range(len(SOURCE_GROUPS) + 1)]  # the groups' memories
        self.state: State | None = None
        self.scores = self.tokens = self.attn = self.prev = self.vocab_ids = self.vocab_bias = None
        self.vocab: OutputVocab | None = None
        self.shortlisted: bool | None = None

    def __len__(self) -> int:
        """Sentences still decoding."""
        return len(self.keys)

    @torch.no_grad()
    def add(self, keys: list[Hashable], src: torch.Tensor, lens: torch.Tensor,
            shortlist: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Start decoding a padded (B, S) source batch, one key per sentence (unique among those decoding)."""
        if len(keys) != src.size(0) or len(set(keys)) != len(keys) or set(keys) & set(self.keys):
            raise ValueError("add needs one key per sentence, none of them already decoding")
        if self.shortlisted is not None and self.shortlisted != (shortlist is not None) and self.keys:
            raise ValueError("either every batch of a search has a shortlist or none has")
        if not keys:
            return
        k, n, device = self.k, src.size(0), src.device
        mem = self.model.encode(src, lens)
        # Everything is computed before anything changes, so that a failure leaves the running search as it was.
        src_lens = lens.tolist()
        groups = [bisect.bisect_left(SOURCE_GROUPS, m) for m in src_lens]
        memory_width = max(self._memory_width, max(src_lens))  # the parts' widths: padding beyond is cut
        state = self.model.init_state(mem).select(torch.arange(n, device=device).repeat_interleave(k))
        scores = torch.full((n, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first at the first step
        width = 0 if self.tokens is None else self.tokens.size(1)
        # Rows keep their tokens right-aligned: a sentence that joins later has padding where others have history.
        tokens = torch.full((n * k, width), PAD, dtype=torch.long, device=device)
        prev = torch.full((n * k,), BOS, dtype=torch.long, device=device)
        attn = torch.zeros((n * k, width, memory_width), device=device) if self.with_attention else None
        # Output limits count real pieces: the source's EOS is not part of its length.
        limits = [output_limit(m - 1, self.max_len_a, self.max_len_b) for m in src_lens]
        ids, bias = (None, None) if shortlist is None else shortlist
        if self.keys:
            if ids is not None:
                # Pieces not listed yet mean gathering and packing the output rows anew: then without those no
                # sentence lists any more. Otherwise the packed rows are kept as they are.
                fresh = not bool(torch.isin(ids, self.vocab_ids).all())
                keep = _listed(self.vocab_bias) if fresh else slice(None)
                ids, old, bias = _merge_vocab(self.vocab_ids[keep], self.vocab_bias[:, keep], ids, bias)
                bias = torch.cat([old, bias])
            state = State.cat([self.state, state])
            scores = torch.cat([self.scores, scores])
            tokens = torch.cat([self.tokens, tokens])
            prev = torch.cat([self.prev, prev])
            if attn is not None:
                attn = torch.cat([_pad_last(self.attn, memory_width), attn])
        # Each new sentence goes after the last of its group (a stable sort keeps the groups' order).
        order = sorted(range(len(self.keys) + n), key=(self.groups + groups).__getitem__)
        if order != list(range(len(order))):
            index = torch.tensor(order, dtype=torch.long, device=device)
            rows = _beam_rows(index, k)
            state, scores, tokens, prev = state.select(rows), scores[index], tokens[rows], prev[rows]
            attn = None if attn is None else attn[rows]
            bias = None if bias is None else bias[index]
        parts = []
        for group in sorted(set(groups)):
            members = [i for i, g in enumerate(groups) if g == group]
            width = max(src_lens[i] for i in members)
            if len(members) == n:
                parts.append((group, mem.cut(width)))
            else:
                parts.append((group, mem.select(torch.tensor(members, dtype=torch.long, device=device), width)))
        vocab = self._vocab_for(ids)
        commits = [self.slots[group].stage(part) for group, part in parts]  # all groups take their rows, or none
        for commit in commits:
            commit()
        self.state, self.scores, self.tokens, self.prev, self.attn = state, scores, tokens, prev, attn
        self.keys += keys
        self.ages += [0] * n
        self.limits += limits
        self.src_lens += src_lens
        self.groups += groups
        self._reorder(order)
        self.shortlisted = shortlist is not None
        self.vocab_bias, self.vocab_ids, self.vocab = bias, ids, vocab

    @property
    def _memory_width(self) -> int:
        """Source positions of the widest memory part (0 when none is live)."""
        return max((slots.width for slots in self.slots if slots.size), default=0)

    def _reorder(self, order: list[int]) -> None:
        """Put the per-sentence lists in this order (for each place, the position it had before)."""
        self.keys = [self.keys[i] for i in order]
        self.ages = [self.ages[i] for i in order]
        self.limits = [self.limits[i] for i in order]
        self.src_lens = [self.src_lens[i] for i in order]
        self.groups = [self.groups[i] for i in order]

    def drop(self, keys: list[Hashable]) -> None:
        """Stop decoding these sentences: they leave at the end of the next step, without results."""
        self.dropped.update(set(keys) & set(self.keys))

    def _vocab_for(self, ids: torch.Tensor | None) -> OutputVocab | None:
        """The output layer over these shortlisted ids (None: the whole vocabulary)."""
        if ids is not None and self.vocab_ids is not None and torch.equal(ids, self.vocab_ids):
            return self.vocab  # the output rows are gathered (and packed) only when the shortlist changes
        return None if ids is None else self.model.decoder.output_vocab(ids)

    @torch.no_grad()
    def step(self) -> list[tuple[Hashable, list[Hypothesis]]]:
        """Advance every live sentence by one token; the sentences that stopped, with their hypotheses."""
        if not self.keys:
            return []
        k, device, vocab = self.k, self.scores.device, self.vocab
        mem = SegmentedMemory([slots.memory for slots in self.slots if slots.size], self.vocab_bias)
        logp, alpha_t, state = self.model.step(self.prev, self.state, mem, vocab)
        history = self.tokens.size(1)
        logp[:, PAD] = float("-inf")
        logp[:, BOS] = float("-inf")
        if self.ban_unk:
            logp[:, UNK] = float("-inf")
        ages = self.ages
        if self.no_repeat_ngram > 0:
            row_ages = torch.tensor(ages, device=device).repeat_interleave(k)
            rows, banned = ngram_bans(self.tokens, row_ages, self.no_repeat_ngram)
            if vocab is not None:  # the banned ids' columns in the shortlist; ids outside it have none
                at = torch.searchsorted(vocab.ids, banned).clamp(max=vocab.ids.numel() - 1)
                listed = vocab.ids[at] == banned
                rows, banned = rows[listed], at[listed]
            logp[rows, banned] = float("-inf")
        short = [age < self.min_len and age < limit for age, limit in zip(ages, self.limits, strict=True)]
        if any(short):
            logp[torch.tensor(short, device=device).repeat_interleave(k), EOS] = float("-inf")
        at_limit = [age >= limit for age, limit in zip(ages, self.limits, strict=True)]
        if any(at_limit):
            forced = torch.tensor(at_limit, device=device).repeat_interleave(k)
            eos_logp = logp[forced, EOS].clone()
            logp[forced] = float("-inf")
            logp[forced, EOS] = eos_logp
        n = len(self.keys)
        top_scores, origin, token = best_candidates(self.scores, logp, n, 2 * k)
        if vocab is not None:
            token = vocab.ids[token]
        is_eos = (token == EOS) & torch.isfinite(top_scores)
        position = torch.arange(2 * k, device=device).expand(n, 2 * k)
        # Candidates ending in EOS among the top k finish; the first k others go on as live beams.
        finish_mask = is_eos & (position < k)
        live_pos = torch.where(is_eos, position + 2 * k, position).topk(k, dim=1, largest=False).indices
        flat_origin = (origin + torch.arange(n, device=device).unsqueeze(1) * k)
        if bool(finish_mask.any()):
            origins, totals = flat_origin.tolist(), top_scores.tolist()
            for i, j in finish_mask.nonzero().tolist():
                row, age, total = origins[i][j], ages[i], totals[i][j]
                hyp_attn = None
                if self.attn is not None:
                    hyp_attn = torch.cat([self.attn[row, history - age:], alpha_t[row].unsqueeze(0)])
                    hyp_attn = hyp_attn[:, : self.src_lens[i]].cpu()
                penalty = length_penalty(age + 1, self.alpha)  # the hypothesis's tokens and its EOS
                self.finished.setdefault(self.keys[i], []).append(
                    Hypothesis(self.tokens[row, history - age:].tolist(), total / penalty, total, hyp_attn))
        scores = top_scores.gather(1, live_pos)
        chosen = flat_origin.gather(1, live_pos)
        next_tokens = token.gather(1, live_pos)
        self.ages = [age + 1 for age in ages]
        done, order = self._retire(scores)
        if order is not None:
            index = torch.tensor(order, dtype=torch.long, device=device)
            scores, chosen, next_tokens = scores[index], chosen[index], next_tokens[index]
        rows = chosen.view(-1)
        self.scores, self.prev = scores, next_tokens.view(-1)
        self.state = state.select(rows)
        # Keep what the live sentences need: their own history columns and source positions.
        keep = self.tokens.size(1) + 1 - max(self.ages, default=0)
        self.tokens = torch.cat([self.tokens.index_select(0, rows), self.prev.unsqueeze(1)], dim=1)[:, keep:]
        if self.attn is not None:
            step_attn = alpha_t.index_select(0, rows).unsqueeze(1)
            self.attn = torch.cat([self.attn.index_select(0, rows), step_attn], dim=1)[:, keep:, :self._memory_width]
        return done

    def _retire(self, scores: torch.Tensor) -> tuple[list[tuple[Hashable, list[Hypothesis]]], list[int] | None]:
        """Remove the dropped sentences and those that are done: at their length limit, or no live beam can still
        win, or (the usual heuristic) beam_size finished hypotheses all beat the best live one as it stands. Returns
        the done ones with their hypotheses, and the new order of the sentences (None: unchanged)."""
        k, alpha = self.k, self.alpha
        best_live = scores.max(dim=1).values.tolist()
        leaving, done = [], []
        for i, key in enumerate(self.keys):
            age, limit = self.ages[i], self.limits[i]
            ranked = sorted((h.score for h in self.finished.get(key, ())), reverse=True)
            if key in self.dropped:
                self.dropped.discard(key)
                self.finished.pop(key, None)
            # The heuristic's live beam is normalized at its length now, without the EOS a finished one counts (so
            # it stops a little sooner): with lp(age + 1), one of the shipped model's 878 test verses came out
            # otherwise, BLEU 25.484 against 25.486.
            elif (age > limit
                    or len(ranked) >= self.n_best
                    and best_live[i] / length_penalty(limit + 1, alpha) <= ranked[self.n_best - 1]
                    or len(ranked) >= k and best_live[i] / length_penalty(age, alpha) <= ranked[k - 1]):
                hyps = sorted(self.finished.pop(key, []), key=lambda h: -h.score)
                done.append((key, hyps[:self.n_best]))
            else:
                continue
            leaving.append(i)
        if not leaving:
            return done, None
        gone = set(leaving)
        order, start = [], 0
        for slots in self.slots:  # each group's sentences leave its memory; the others move into their places
            members = range(start, start + slots.size)
            local = [i - start for i in members if i in gone]
            if local:
                width = max((self.src_lens[i] for i in members if i not in gone), default=1)
                order += [start + j for j in slots.remove(local, width)]
            else:
                order += members
            start = members.stop
        self._reorder(order)
        if self.vocab_ids is not None and order:
            self.vocab_bias = self.vocab_bias.index_select(
                0, torch.tensor(order, dtype=torch.long, device=self.vocab_bias.device))
            used = _listed(self.vocab_bias)
            # Pieces no sentence lists any more cost a column of the output matmul each, but gathering the output
            # rows anew costs more than many of those (packing 2,758 rows: 0.8 ms in fp32, 3.7 ms in int8, some
            # 25-50 steps of an eighth of them unused), and sentences joining drop them anyway: the batch's list
            # shrinks here once a quarter of it is unused.
            if 4 * int(used.sum()) <= 3 * used.numel():
                ids = self.vocab_ids[used]
                self.vocab = self._vocab_for(ids)
                self.vocab_bias, self.vocab_ids = self.vocab_bias[:, used], ids
        return done, order


def _beam_rows(index: torch.Tensor, k: int) -> torch.Tensor:
    """The k beam rows of each of these sentences, in order."""
    return (index.unsqueeze(1) * k + torch.arange(k, device=index.device)).view(-1)


def _listed(bias: torch.Tensor) -> torch.Tensor:
    """The columns of a shortlist bias (0 or -inf) that some sentence lists. (A column's maximum, not isfinite().any(),
    which took 190 us for 23 sentences x 2,800 pieces against 20, at every step that a sentence left.)"""
    return bias.amax(dim=0) > float("-inf")


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension to width."""
    return torch.nn.functional.pad(t, (0, width - t.size(-1)))


def beam_search(model: Seq2Seq, src: torch.Tensor, lens: torch.Tensor, beam_size: int = _DEFAULT.beam_size,
                n_best: int = 1, alpha: float = _DEFAULT.length_penalty, max_len_a: float = _DEFAULT.max_len_a,
                max_len_b: int = _DEFAULT.max_len_b, min_len: int = 0, ban_unk: bool = False,
                no_repeat_ngram: int = _DEFAULT.no_repeat_ngram, return_attention: bool = False,
                shortlist: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[list[Hypothesis]]:
    """Translate a padded batch; returns n_best hypotheses per sentence, best first (see BeamSearch).

    Attention, when asked for, is (len(tokens) + 1, source length with EOS) per hypothesis."""
    search = BeamSearch(model, beam_size, n_best, alpha, max_len_a, max_len_b, min_len, ban_unk, no_repeat_ngram,
                        return_attention)
    search.add(list(range(src.size(0))), src, lens, shortlist)
    results: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
    while len(search):
        for key, hyps in search.step():
            results[key] = hyps
    return results


def search_ids(model: Seq2Seq, ids: list[list[int]], batch_tokens: int, device: torch.device,
               shortlist: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
               **options: Any) -> list[list[Hypothesis]]:
    """Decode many id sequences in length-sorted batches of at most batch_tokens source tokens (padded, ends of
    sentence included; a longer sentence alone), the service's measure too; results come back in input order.

    shortlist, when given, maps each padded source batch to its shortlist; options are beam_search's."""
    results: list[list[Hypothesis]] = [[] for _ in ids]
    for group in token_batches([len(s) for s in ids], None, batch_tokens, max_sentences=len(ids) or 1):
        batch = collate([ids[i] for i in group], None, group)
        src = batch.src.to(device)
        hyps = beam_search(model, src, batch.src_lens, shortlist=None if shortlist is None else shortlist(src),
                           **options)
        for i, h in zip(group, hyps, strict=True):
            results[i] = h
    return results
