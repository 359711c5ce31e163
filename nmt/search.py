"""Batched beam search (greedy is beam size 1): B sentences x K beams advance as one tensor batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nmt.batching import collate, token_batches
from nmt.model import Seq2Seq
from nmt.tokenizer import BOS, EOS, PAD, UNK


@dataclass
class Hypothesis:
    tokens: list[int]  # target ids, without BOS/EOS
    score: float  # log-probability divided by the length penalty: what hypotheses are ranked by
    logprob: float  # total log-probability, EOS included
    attention: torch.Tensor | None = None  # (len(tokens) + 1, S) weights per output token (EOS last)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha; 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha if alpha else 1.0


def _positions(ids: torch.Tensor, tokens: list[int]) -> list[int]:
    """Where the tokens that are in the sorted ids stand in them."""
    if not tokens:
        return []
    wanted = torch.tensor(tokens, dtype=ids.dtype, device=ids.device)
    at = torch.searchsorted(ids, wanted).clamp(max=ids.numel() - 1)
    return at[ids[at] == wanted].tolist()


def _banned_by_ngrams(history: list[list[int]], n: int) -> list[list[int]]:
    """For each row, the tokens that would repeat an n-gram the row already holds."""
    banned = []
    for row in history:
        if len(row) < n:
            banned.append([])
            continue
        prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
        banned.append([row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix])
    return banned


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, lens: torch.Tensor, beam_size: int = 5, n_best: int = 1,
                alpha: float = 0.0, max_len_a: float = 1.5, max_len_b: int = 10, min_len: int = 0,
                ban_unk: bool = False, no_repeat_ngram: int = 0, return_attention: bool = False,
                shortlist: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[list[Hypothesis]]:
    """Translate a padded batch; returns n_best hypotheses per sentence, best first.

    Outputs hold at most max_len_a * source_length + max_len_b tokens (EOS not counted; at least 1) and,
    below that limit, at least min_len. A sentence stops once n_best finished hypotheses are out of reach of
    every live beam (log-probabilities only fall, so a live beam's best final score is bounded), or once
    beam_size finished ones all score above the best live beam as it stands (so beam size 1 is greedy
    decoding). Finished sentences leave the batch. Nothing about one sentence depends on the others in its
    batch, except in a dynamically quantized (int8) model, whose activation scales are taken over the batch.
    Attention, when asked for, is (len(tokens) + 1, source length with EOS) per hypothesis.

    A shortlist (sorted target ids (V',) holding the special ids, and a (B, V') bias of 0 on each sentence's
    own pieces and -inf elsewhere) restricts each sentence's output to its pieces; scores are then
    log-probabilities normalized over those pieces.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size ({beam_size}), got {n_best}")
    model.eval()
    device = src.device
    batch, k = src.size(0), beam_size
    mem = model.encode(src, lens)
    vocab = None
    if shortlist is not None:
        vocab = model.decoder.output_vocab(shortlist[0])
        mem.vocab_bias = shortlist[1]
    src_lens = lens.tolist()
    # Output limits count real pieces: the source's EOS is not part of its length.
    limits = [max(1, int(max_len_a * (n - 1) + max_len_b)) for n in src_lens]
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    mem = mem.select(rows)
    state = model.init_state(mem)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first at step 0
    tokens = torch.full((batch * k, 0), BOS, dtype=torch.long, device=device)
    with_attention = return_attention and model.decoder.attention is not None
    attn = torch.zeros((batch * k, 0, src.size(1)), device=device) if with_attention else None
    prev = torch.full((batch * k,), BOS, dtype=torch.long, device=device)
    alive = list(range(batch))  # original sentence index of each row group still decoding
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    step = 0
    while alive:
        logp, alpha_t, state = model.step(prev, state, mem, vocab)
        width = logp.size(1)
        logp[:, PAD] = float("-inf")
        logp[:, BOS] = float("-inf")
        if ban_unk:
            logp[:, UNK] = float("-inf")
        if no_repeat_ngram > 0:
            for row, banned in enumerate(_banned_by_ngrams(tokens.tolist(), no_repeat_ngram)):
                logp[row, banned if vocab is None else _positions(vocab.ids, banned)] = float("-inf")
        if step < min_len:
            short = torch.tensor([step < limits[s] for s in alive], device=device).repeat_interleave(k)
            logp[short, EOS] = float("-inf")
        at_limit = [step >= limits[s] for s in alive]
        if any(at_limit):
            forced = torch.tensor(at_limit, device=device).repeat_interleave(k)
            eos_logp = logp[forced, EOS].clone()
            logp[forced] = float("-inf")
            logp[forced, EOS] = eos_logp
        n = len(alive)
        cand = (scores.view(-1, 1) + logp).view(n, k * width)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        origin, token = top_idx // width, top_idx % width
        if vocab is not None:
            token = vocab.ids[token]
        is_eos = (token == EOS) & torch.isfinite(top_scores)
        position = torch.arange(2 * k, device=device).expand(n, 2 * k)
        # Candidates ending in EOS among the top k finish; the first k others go on as live beams.
        finish_mask = is_eos & (position < k)
        live_pos = torch.where(is_eos, position + 2 * k, position).topk(k, dim=1, largest=False).indices
        flat_origin = (origin + torch.arange(n, device=device).unsqueeze(1) * k)
        if bool(finish_mask.any()):
            penalty = length_penalty(step + 1, alpha)  # the hypothesis's tokens and its EOS
            origins, totals = flat_origin.tolist(), top_scores.tolist()
            for i, j in finish_mask.nonzero().tolist():
                row, sent, total = origins[i][j], alive[i], totals[i][j]
                hyp_attn = None
                if attn is not None:
                    hyp_attn = torch.cat([attn[row], alpha_t[row].unsqueeze(0)])[:, : src_lens[sent]].cpu()
                finished[sent].append(Hypothesis(tokens[row].tolist(), total / penalty, total, hyp_attn))
        scores = top_scores.gather(1, live_pos)
        chosen = flat_origin.gather(1, live_pos).view(-1)
        next_tokens = token.gather(1, live_pos).view(-1)
        tokens = torch.cat([tokens.index_select(0, chosen), next_tokens.unsqueeze(1)], dim=1)
        if attn is not None:
            attn = torch.cat([attn.index_select(0, chosen), alpha_t.index_select(0, chosen).unsqueeze(1)], dim=1)
        state = state.select(chosen)
        prev = next_tokens
        step += 1
        # Which sentences are done: at their length limit, or no live beam can still win, or (the usual
        # heuristic) beam_size finished hypotheses all beat the best live one as it stands.
        best_live = scores.max(dim=1).values.tolist()
        keep = []
        for i, sent in enumerate(alive):
            if step > limits[sent]:
                continue
            ranked = sorted((h.score for h in finished[sent]), reverse=True)
            if len(ranked) >= n_best and best_live[i] / length_penalty(limits[sent] + 1, alpha) <= ranked[n_best - 1]:
                continue
            if len(ranked) >= k and best_live[i] / length_penalty(step, alpha) <= ranked[k - 1]:
                continue
            keep.append(i)
        if len(keep) < n:
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            alive = [alive[i] for i in keep]
            scores = scores.index_select(0, idx)
            row_idx = (idx.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            mem, state = mem.select(row_idx), state.select(row_idx)
            tokens, prev = tokens.index_select(0, row_idx), prev.index_select(0, row_idx)
            if attn is not None:
                attn = attn.index_select(0, row_idx)
    results = []
    for hyps in finished:
        hyps.sort(key=lambda h: -h.score)
        results.append(hyps[:n_best])
    return results


def greedy_search(model: Seq2Seq, src: torch.Tensor, lens: torch.Tensor, **kwargs) -> list[list[Hypothesis]]:
    """Greedy decoding: beam search with one beam, through the same code."""
    return beam_search(model, src, lens, beam_size=1, n_best=1, **kwargs)


def search_ids(model: Seq2Seq, ids: list[list[int]], batch_tokens: int, device: torch.device,
               beam_size: int = 5,
               shortlist: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
               **kwargs) -> list[list[Hypothesis]]:
    """Decode many id sequences in length-sorted token-budget batches; results come back in input order.

    shortlist, when given, maps each padded source batch to its shortlist (see beam_search)."""
    results: list[list[Hypothesis]] = [[] for _ in ids]
    lengths = [len(s) + 1 for s in ids]
    budget = max(batch_tokens // max(beam_size, 1), max(lengths, default=1))
    for group in token_batches(lengths, None, budget, max_sentences=len(ids) or 1):
        batch = collate([ids[i] for i in group], None, group)
        src = batch.src.to(device)
        hyps = beam_search(model, src, batch.src_lens, beam_size=beam_size,
                           shortlist=None if shortlist is None else shortlist(src), **kwargs)
        for i, h in zip(group, hyps, strict=True):
            results[i] = h
    return results
