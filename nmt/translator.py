"""The Translator, the one path from text to text: split, tokenize, batch, beam search, detokenize, reassemble.

Inputs are split on newlines and into sentences (nmt.text.split_sentences); a sentence longer than the model's
max length (data.max_len pieces) is split after . ! ? ; or : and a part still too long into chunks at word
boundaries, so nothing is truncated. The pieces are translated as separate segments in length-sorted token-budget
batches and joined back with the original whitespace (chunks with a space).
"""

from __future__ import annotations

import functools
import heapq
import logging
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nmt.batching import collate, padded_tokens, token_batches
from nmt.checkpoint import STEP_DIR, load_checkpoint
from nmt.config import MAX_LENGTH_PENALTY, MAX_THREADS, STORED_PER_SOURCE, Config, from_dict, integers, load_config
from nmt.device import check_int8, pick_device
from nmt.errors import NMTError
from nmt.export import (
    CARD_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    is_model_dir,
    load_weights,
    read_card,
    read_safetensors,
    run_checkpoint,
    weights_digest,
)
from nmt.int8 import vnni
from nmt.model import Seq2Seq
from nmt.search import Hypothesis, output_limit, search_ids
from nmt.shortlist import SHORTLIST_FILE, Shortlist
from nmt.text import normalize_text, split_sentences
from nmt.tokenizer import EOS_PIECE, TOKENIZER_FILES, UNK, WORD_START, Tokenizer, check_trained_with

log = logging.getLogger(__name__)

SCORE_PART_BATCHES = 8  # full batches' worth of pairs score_parts scores before handing their results back
_LINE_BREAK = re.compile(r"(\s*\n\s*)")
_CLAUSE_END = re.compile(r"(?<=[.!?;:])(\s+)")
# Whitespace kept as it is around the translated lines, except the control characters among it (vertical tab,
# form feed, separators, next line), which would otherwise pass into the translation: spaces instead.
_CONTROL_SPACE = dict.fromkeys([0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x1F, 0x85], " ")


@dataclass
class Alternative:
    text: str
    score: float


@dataclass
class Translation:
    text: str
    score: float | None = None  # length-normalized log-probability, summed over sentences; None for empty input
    alternatives: list[Alternative] = field(default_factory=list)  # n-best, best first, distinct texts
    src_pieces: list[str] | None = None  # with return_alignment: source pieces, each sentence ending in </s>
    tgt_pieces: list[str] | None = None  # target pieces, each sentence ending in </s>
    alignment: list[list[float]] | None = None  # attention weights, one row per target piece (None: no attention)


@dataclass
class ScoreResult:
    logprob: float  # total log-probability of the candidate, its </s> included
    pieces: list[str]  # target pieces, </s> last
    token_logprobs: list[float]  # one per piece

    @property
    def mean(self) -> float:
        return self.logprob / len(self.pieces)


@dataclass
class ScoreJob:
    """A score call's pairs, tokenized (Translator.prepare_score)."""

    sources: list[list[int]]  # source ids per pair
    targets: list[list[int]]  # candidate ids per pair
    target_pieces: list[list[str]]

    def part(self, start: int, stop: int) -> ScoreJob:
        """The pairs start to stop (not included) as a job of their own."""
        return ScoreJob(self.sources[start:stop], self.targets[start:stop], self.target_pieces[start:stop])


@dataclass
class _Segment:
    ids: list[int]
    pieces: list[str]


@dataclass
class _Output:
    """One hypothesis for one segment, detokenized."""

    text: str
    score: float
    pieces: list[str]
    attention: torch.Tensor | None  # (len(pieces) + 1, len(source ids) + 1)


@dataclass
class Job:
    """A translate call with its options checked and its texts split into tokenized segments (Translator.prepare).

    Jobs with equal keys decode with the same search settings, so their segments can share one beam search."""

    plans: list[list[str | int]]  # per text: literal whitespace and segment indices
    segments: list[_Segment]
    search: dict[str, Any]  # BeamSearch settings
    shortlist_sizes: tuple[int, int] | None  # (frequent, per_source), or None for the whole vocabulary
    budget: int  # source tokens per batch
    replace_unk: bool
    return_alignment: bool
    n_best: int
    shortlist: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None  # padded batch -> lists

    @property
    def todo(self) -> list[int]:
        """The segments to decode (those with source pieces), in order."""
        return [i for i, s in enumerate(self.segments) if s.ids]

    @property
    def source_tokens(self) -> int:
        """Source pieces to decode, each segment's end of sentence included: what the call costs a batch."""
        return sum(len(s.ids) + 1 for s in self.segments if s.ids)

    @property
    def alignment_cells(self) -> int:
        """The most attention weights the texts' alignments can hold: per text, its source pieces (ends of sentence
        included) times the most target pieces its segments may decode to (BeamSearch's output limits)."""
        a, b = self.search["max_len_a"], self.search["max_len_b"]
        cells = 0
        for plan in self.plans:
            ids = [self.segments[p].ids for p in plan if isinstance(p, int) and self.segments[p].ids]
            cells += sum(len(i) + 1 for i in ids) * sum(output_limit(len(i), a, b) + 1 for i in ids)
        return cells

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.search.items())), self.shortlist_sizes

    def needs_attention(self, hyps: list[Hypothesis]) -> bool:
        """Whether a segment decoded without attention must be decoded again with it, to replace its <unk>s."""
        return self.replace_unk and not self.return_alignment and any(UNK in h.tokens for h in hyps)


def detokenize(pieces: list[str]) -> str:
    """SentencePiece pieces -> text, for pieces that may not be in the vocabulary (replaced unknowns)."""
    return "".join(pieces).replace(WORD_START, " ").strip()


def _interleaved(parts: list[str], segment: Callable[[str], list[str | int]]) -> list[str | int]:
    """The plan of text split into parts and the whitespace between them (alternately): each part's segments, and
    the whitespace kept, control spaces as plain ones."""
    plan: list[str | int] = []
    for k, part in enumerate(parts):
        # Sentences that were glued ("lloró.Dios", or a zero-width space between) get a space between their
        # translations: "wept.God" reads as one word.
        plan += [part.translate(_CONTROL_SPACE) if part.strip("\u200b") else " "] if k % 2 else segment(part)
    return plan


def _by_total_score(scores: list[list[float]]) -> Iterator[tuple[int, ...]]:
    """Choices of one item from each list (each sorted best first), as the index chosen in each, in the order of
    their summed scores, best first: a multi-sentence text's n best translations combine its sentences' that way."""
    def total(ranks: tuple[int, ...]) -> float:
        return sum(row[r] for row, r in zip(scores, ranks, strict=True))

    start = (0,) * len(scores)
    heap, seen = [(-total(start), start)], {start}
    while heap:
        _, ranks = heapq.heappop(heap)
        yield ranks
        for i, row in enumerate(scores):
            if ranks[i] + 1 < len(row):
                nxt = (*ranks[:i], ranks[i] + 1, *ranks[i + 1:])
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (-total(nxt), nxt))


def _source_piece(pieces: list[str], j: int) -> str:
    """Source piece j to copy into the output, joined with a bare word-start mark next to it: SentencePiece
    writes a word that begins with an unknown character as "▁" followed by that character."""
    if pieces[j] == WORD_START and j + 1 < len(pieces):
        return pieces[j] + pieces[j + 1]
    if j > 0 and pieces[j - 1] == WORD_START:
        return pieces[j - 1] + pieces[j]
    return pieces[j]


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or high is not None and value > high:
        raise NMTError(f"{name} must be {integers(low, high)}, got {value!r}")
    return value


def locate_model(path: Path) -> tuple[Path, Path, bool]:
    """Where a model path as Translator.load takes it leads: (the directory with its tokenizers, the weights file,
    whether it is an exported model directory); NMTError, before anything is loaded, when it leads nowhere."""
    if not path.exists():
        raise NMTError(f"model not found: {path}")
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if path.is_dir() and is_model_dir(path):
        return path, path / MODEL_FILE, True
    source = run_checkpoint(path) if path.is_dir() else path
    if not zipfile.is_zipfile(source):  # torch.save's format: anything else is not a checkpoint of ours
        raise NMTError(f"{source} is not a readable rnnsearch checkpoint (nor an exported model or run directory)")
    home = source.parent
    if home.name == STEP_DIR and not (home / "src.model").is_file():
        home = home.parent  # a kept step checkpoint (train.keep_checkpoints): the run's tokenizers are above it
    return home, source, False


def model_files(path: Path) -> list[Path]:
    """The files read_model reads for a model path (those present): the weights, tokenizers, and in an exported
    model directory its config, card and shortlist."""
    home, source, model_dir = locate_model(path)
    names = [*TOKENIZER_FILES, *((CONFIG_FILE, CARD_FILE, SHORTLIST_FILE) if model_dir else ())]
    return [source, *(home / name for name in names if (home / name).is_file())]


@dataclass
class ModelFiles:
    """What a model path holds, read and checked: its config, tokenizers, card and shortlist, and its weights in a
    float model on the CPU."""

    path: Path  # how a Translator names it: the model directory, or the run directory or checkpoint given
    source: Path  # the weights file
    cfg: Config
    model: Seq2Seq
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    card: dict[str, Any] | None
    shortlist: Shortlist | None
    step: int | None
    data_sha256: str | None  # the training pairs' digest (corpus.train_pairs_sha256), where the files record it
    weights_sha256: str | None  # the weights' digest (export.weights_digest), where the card's was checked


def read_model(path: Path, shortlist_wanted: bool = True) -> ModelFiles:
    """Read a run directory (best.pt, else last.pt), a .pt checkpoint in one, or an exported model directory (its
    shortlist unless not wanted: then it may be missing or broken); NMTError naming what is missing or broken."""
    home, source, model_dir = locate_model(path)
    card, shortlist, digest = None, None, None
    if model_dir:
        cfg = load_config(home / CONFIG_FILE)
        weights, card = read_safetensors(source), read_card(home)
        metrics = card.get("metrics")
        step = metrics.get("steps") if isinstance(metrics, dict) else None
        data_sha256 = card.get("data_sha256")
    else:
        state = load_checkpoint(source)
        missing = [key for key in ("config", "model", "vocab") if key not in state]
        if missing:
            raise NMTError(f"{source} is not a training checkpoint (no {missing[0]!r})")
        cfg, weights, step = from_dict(state["config"]), state["model"], state.get("position", {}).get("step")
        data_sha256 = state.get("data_sha256")
    src_tok, tgt_tok = (Tokenizer(home / name) for name in TOKENIZER_FILES)
    if not model_dir:
        check_trained_with(state, src_tok, tgt_tok, home, source)
    if shortlist_wanted and cfg.decode.shortlist and model_dir and (home / SHORTLIST_FILE).is_file():
        shortlist = Shortlist.load(home / SHORTLIST_FILE, len(src_tok), len(tgt_tok))
    model = Seq2Seq(cfg.model, len(src_tok), len(tgt_tok))
    load_weights(model, weights, source)
    if model_dir:
        digest = _checked_card_digest(weights, card, source)
    model = model.float().eval()
    return ModelFiles(home if model_dir else path, source, cfg, model, src_tok, tgt_tok, card, shortlist, step,
                      data_sha256 if isinstance(data_sha256, str) else None, digest)


def _checked_card_digest(weights: dict[str, torch.Tensor], card: dict[str, Any], source: Path) -> str | None:
    """The weights' digest, NMTError unless it is the one the card records (a file corrupted in place still loaded,
    and translated nothing but errors); None where the card records none."""
    expected = card.get("weights_sha256")
    if not isinstance(expected, str):  # a card from before it named them, or none
        return None
    actual = weights_digest(weights, False)  # as exported: tied copies are stored once
    if actual != expected:
        raise NMTError(f"{source} does not hold the weights its {CARD_FILE} describes (SHA-256 {actual[:12]}..., "
                       f"the card says {expected[:12]}...): the file is corrupted or was replaced; export the model "
                       "again")
    return actual


class Translator:
    """A loaded model with its tokenizers and decoding defaults.

    prepare and finish touch no model state and may run on any thread; translate, run and score use the model
    under a lock, one call at a time."""

    def __init__(self, model: Seq2Seq, cfg: Config, src_tok: Tokenizer, tgt_tok: Tokenizer,
                 device: torch.device, path: Path, card: dict[str, Any] | None = None, int8: bool = False,
                 shortlist: Shortlist | None = None,
                 weights_sha256: str | None = None, step: int | None = None, data_sha256: str | None = None):
        self.model, self.cfg, self.src_tok, self.tgt_tok = model.eval(), cfg, src_tok, tgt_tok
        self.device, self.path, self.card, self.int8 = device, path, card, int8
        self.shortlist = shortlist  # None: the model has none, or decode.shortlist is off
        self._weights_sha256, self.step = weights_sha256, step  # which weights: for evaluation reports and cards
        self.data_sha256 = data_sha256  # which training pairs, where known: a test split must hold none of them
        self.max_len = cfg.data.max_len
        self.num_parameters = model.num_parameters()
        self.lock = threading.RLock()  # reentrant: a TranslationStream holds it around whole steps

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", threads: int | None = None,
             int8: bool | None = None, shortlist: bool = True) -> Translator:
        """Load a run directory (best.pt, else last.pt), a .pt checkpoint in one, or an exported model directory
        (without its shortlist when shortlist is false: every call decodes over the whole vocabulary). int8: int8
        matmuls, refused off the CPU; None: the config's decode.int8, on the CPU."""
        path = Path(path)
        if threads is not None:
            torch.set_num_threads(_check_int("threads", threads, 1, MAX_THREADS))
        dev = pick_device(device)
        if int8:
            check_int8(dev)
        files = read_model(path, shortlist)
        model, cfg, shortlist = files.model, files.cfg, files.shortlist
        asked = int8
        if int8 is None:
            wanted = cfg.decode.int8 and dev.type == "cpu"
            int8 = wanted and vnni()
            if wanted and not int8:
                log.info("decode.int8: this CPU has no VNNI, where int8 decodes slower than fp32: decoding in fp32")
        model = model.to(dev)
        model.decoder.cache_embedding_gates(cfg.decode.gate_table_mb)
        if int8 and not model.decoder.can_int8():  # a speed option, never needed for correct output
            log.log(logging.WARNING if asked else logging.INFO, "int8 matmuls cannot decode this model here (no "
                    "oneDNN int8 matmul in torch %s, or non-finite weights); decoding in fp32", torch.__version__)
            int8 = False
        # int8 always goes through oneDNN; decode.packed_matmuls is the fp32 choice.
        packed = (cfg.decode.packed_matmuls or int8) and model.decoder.pack_weights(int8)
        quantized = model.decoder.packs_int8
        log.info("loaded %s (%s -> %s) on %s%s%s%s", files.source, cfg.data.src_lang, cfg.data.tgt_lang, dev,
                 ", int8" if quantized else "", ", oneDNN matmuls" if packed else "",
                 ", with a vocabulary shortlist" if shortlist else "")
        return cls(model, cfg, files.src_tok, files.tgt_tok, dev, files.path, files.card, quantized, shortlist,
                   files.weights_sha256, files.step, files.data_sha256)

    @functools.cached_property
    def name(self) -> str:
        """The model card's name, else the model or run directory's (with the checkpoint's file name when loaded
        from one: run/best.pt); once, as the service names the model in every answer."""
        if (self.card or {}).get("name"):
            return self.card["name"]
        if not self.path.is_file():
            return self.path.name
        folder = self.path.parent
        if folder.name == STEP_DIR:  # a kept step checkpoint: RUN/checkpoints/step-N.pt
            return f"{folder.parent.name}/{STEP_DIR}/{self.path.name}"
        return f"{folder.name}/{self.path.name}"

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights as loaded (nmt.export.weights_digest), taken when first asked for: reports and
        /v1/models need it, translating does not."""
        if self._weights_sha256 is None:
            self._weights_sha256 = weights_digest(self.model.state_dict(), self.cfg.model.tie_embeddings)
        return self._weights_sha256

    @property
    def decode_defaults(self) -> dict[str, Any]:
        """The config's decode section, its shortlist, packed_matmuls and int8 saying whether they are in use (a
        run directory has no shortlist; int8 is always packed, and off the CPU never used)."""
        return {**self.cfg.to_dict()["decode"], "shortlist": self.shortlist is not None,
                "packed_matmuls": self.model.decoder.packs_matmuls, "int8": self.int8}

    @property
    def info(self) -> dict[str, Any]:
        name = self.name
        return {"name": name, "id": name, "path": str(self.path), "src_lang": self.cfg.data.src_lang,
                "tgt_lang": self.cfg.data.tgt_lang, "parameters": self.num_parameters, "int8": self.int8,
                "device": str(self.device), "max_len": self.max_len, "decode": self.decode_defaults,
                "shortlist": self.shortlist is not None, "weights_sha256": self.weights_sha256, "step": self.step,
                "card": self.card}

    # ------------------------------------------------------------------------------------------------------
    # Translation
    # ------------------------------------------------------------------------------------------------------

    def translate(self, texts: list[str], **options: Any) -> list[Translation]:
        """Translate each text; options as for prepare, unset ones from the config's decode section."""
        return self.run(self.prepare(texts, **options))

    def run(self, job: Job) -> list[Translation]:
        """Translate a prepared call, start to end, on its own."""
        return self.finish(job, self.search(job))

    def search(self, job: Job) -> list[list[Hypothesis]]:
        """The hypotheses of a prepared call's segments to decode (job.todo, in order), best first; a segment whose
        every score overflowed (diverged weights) has none."""
        with self.lock:
            ids = [job.segments[i].ids for i in job.todo]
            hyps = search_ids(self.model, ids, job.budget, self.device, return_attention=job.return_alignment,
                              shortlist=job.shortlist, **job.search)
            # Attention is only needed where an <unk> came out: decode those again with it (the same search).
            redo = [j for j, hs in enumerate(hyps) if job.needs_attention(hs)]
            if redo:
                again = search_ids(self.model, [ids[j] for j in redo], job.budget, self.device,
                                   return_attention=True, shortlist=job.shortlist, **job.search)
                for j, hs in zip(redo, again, strict=True):
                    hyps[j] = hs
            return hyps

    def prepare(self, texts: list[str], beam_size: int | None = None, n_best: int = 1,
                length_penalty: float | None = None, return_alignment: bool = False,
                batch_tokens: int | None = None, replace_unk: bool | None = None, ban_unk: bool = False,
                no_repeat_ngram: int | None = None, min_len: int = 1,
                max_len: int | None = None, shortlist: bool = True, shortlist_frequent: int | None = None,
                shortlist_per_source: int | None = None) -> Job:
        """A translate call's checked options and tokenized segments, ready for beam search.

        max_len, when given, caps every output at that many pieces instead of the config's a * source + b;
        min_len bans the end of sentence before that many pieces (1: a text never translates to nothing, as in
        fairseq). Whitespace-only texts come back as they are (a form feed or other control space as a space), and
        those of only control or invisible characters as "".
        beam_size defaults to the config's, widened to n_best when that asks for more.
        shortlist=False decodes over the whole target vocabulary even when the model has a shortlist; the two
        sizes change its lists (see nmt/shortlist.py).
        """
        d = self.cfg.decode
        n_best = _check_int("n_best", n_best, 1)
        beam = _check_int("beam_size", max(d.beam_size, n_best) if beam_size is None else beam_size, 1)
        if not 1 <= n_best <= beam:
            raise NMTError(f"n_best must be between 1 and the beam size ({beam}), got {n_best}")
        alpha = d.length_penalty if length_penalty is None else length_penalty
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= MAX_LENGTH_PENALTY:
            raise NMTError(f"length_penalty must be a number between 0 and {MAX_LENGTH_PENALTY:g}, got {alpha!r}")
        search = {
            "beam_size": beam, "alpha": float(alpha), "ban_unk": bool(ban_unk),
            "no_repeat_ngram": _check_int("no_repeat_ngram",
                                          d.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram, 0),
            "min_len": _check_int("min_len", min_len, 0),
            "max_len_a": d.max_len_a if max_len is None else 0.0,
            "max_len_b": d.max_len_b if max_len is None else _check_int("max_len", max_len, 1),
            # n-best texts must be distinct, and two token sequences can detokenize alike: keep the whole beam.
            "n_best": beam if n_best > 1 else 1,
        }
        lists = self._shortlist_sizes(shortlist, shortlist_frequent, shortlist_per_source)
        budget = _check_int("batch_tokens", d.batch_tokens if batch_tokens is None else batch_tokens, 1)
        # Replacing <unk>s copies the source piece attended most: a model without attention has none to copy.
        can_replace = self.model.decoder.attention is not None
        replace = can_replace and (d.replace_unk if replace_unk is None else bool(replace_unk))
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise NMTError("texts must be a list of strings")
        segments: list[_Segment] = []
        plans = [self._plan(text, segments) for text in texts]
        return Job(plans, segments, search, lists, budget, replace, bool(return_alignment), n_best,
                   None if lists is None else functools.partial(self.shortlist.for_batch, frequent=lists[0],
                                                                per_source=lists[1]))

    def finish(self, job: Job, hyps: list[list[Hypothesis]]) -> list[Translation]:
        """The translations of a prepared job from the hypotheses of its segments to decode (job.todo, in order)."""
        outputs: list[list[_Output]] = [[_Output("", 0.0, [], None)] for _ in job.segments]
        for i, hs in zip(job.todo, hyps, strict=True):
            if not hs:  # every piece the search could choose was banned, ending included
                source = detokenize(job.segments[i].pieces)
                raise NMTError(f"no translation of {source!r} meets the decoding options (ban_unk, min_len, "
                               "no_repeat_ngram, the shortlist): loosen them")
            distinct: dict[str, _Output] = {}
            for h in hs:
                out = self._output(job.segments[i], h, job.replace_unk)
                distinct.setdefault(out.text, out)
            outputs[i] = list(distinct.values())[:job.n_best]
        return [self._assemble(plan, job.segments, outputs, job.n_best, job.return_alignment) for plan in job.plans]

    def _shortlist_sizes(self, use: bool, frequent: int | None, per_source: int | None) -> tuple[int, int] | None:
        """The checked (frequent, per_source) sizes of each sentence's shortlist, or None for the whole vocabulary."""
        d = self.cfg.decode
        frequent = _check_int("shortlist_frequent", d.shortlist_frequent if frequent is None else frequent, 0)
        per_source = _check_int("shortlist_per_source", d.shortlist_per_source if per_source is None else per_source, 0)
        if per_source > STORED_PER_SOURCE:
            raise NMTError(f"shortlist_per_source must be at most {STORED_PER_SOURCE}, got {per_source}")
        if not use or self.shortlist is None:
            return None
        if frequent == per_source == 0:
            raise NMTError("shortlist_frequent and shortlist_per_source are both 0: the shortlist would hold no target "
                           "piece; give one of them above 0, or decode without the shortlist")
        return frequent, per_source

    def _plan(self, text: str, segments: list[_Segment]) -> list[str | int]:
        """The text as literal whitespace (str) and segments to translate (their index in segments)."""
        plan: list[str | int] = []
        for k, part in enumerate(_LINE_BREAK.split(text)):
            if k % 2:
                plan.append(part.translate(_CONTROL_SPACE))
                continue
            line = part.strip()
            start = len(part) - len(part.lstrip())
            if start:
                plan.append(part[:start].translate(_CONTROL_SPACE))
            if line:
                plan += self._split_line(line, segments)
                if len(part) > start + len(line):
                    plan.append(part[start + len(line):].translate(_CONTROL_SPACE))
        return plan

    def _split_line(self, line: str, segments: list[_Segment]) -> list[str | int]:
        """A line as segments, one per sentence; each segment's text is normalized as training corpora are
        (nmt.text: no control or invisible characters), and one left empty decodes to nothing."""
        return _interleaved(split_sentences(line), lambda sentence: self._split_sentence(sentence, segments))

    def _split_sentence(self, sentence: str, segments: list[_Segment]) -> list[str | int]:
        """A sentence as one segment, or split after . ! ? ; or : (then at word starts) when over max_len pieces."""
        ids, pieces = self._encode(sentence)
        if len(ids) <= self.max_len:
            return self._chunks(ids, pieces, segments)
        return _interleaved(_CLAUSE_END.split(sentence), lambda part: self._chunks(*self._encode(part), segments))

    def _encode(self, text: str) -> tuple[list[int], list[str]]:
        return self.src_tok.encode_with_pieces(normalize_text(text))

    def _chunks(self, ids: list[int], pieces: list[str], segments: list[_Segment]) -> list[str | int]:
        """One segment for a sentence's ids and pieces, or several of at most max_len pieces cut before word
        starts."""
        plan: list[str | int] = []
        start = 0
        while len(ids) - start > self.max_len:
            end = start + self.max_len
            cut = max((i for i in range(start + 1, end + 1) if pieces[i].startswith(WORD_START)), default=end)
            segments.append(_Segment(ids[start:cut], pieces[start:cut]))
            plan += [len(segments) - 1, " "]
            start = cut
        segments.append(_Segment(ids[start:], pieces[start:]))
        return [*plan, len(segments) - 1]

    def _output(self, segment: _Segment, hyp: Hypothesis, replace_unk: bool) -> _Output:
        pieces = self.tgt_tok.pieces(hyp.tokens)
        if replace_unk and hyp.attention is not None and UNK in hyp.tokens:
            source_attention = hyp.attention[:, : len(segment.ids)]  # the source's </s> is no word to copy
            for t, token in enumerate(hyp.tokens):
                if token == UNK:
                    pieces[t] = _source_piece(segment.pieces, int(source_attention[t].argmax()))
            text = detokenize(pieces)
        else:
            text = self.tgt_tok.decode(hyp.tokens)
        return _Output(text, hyp.score, pieces, hyp.attention)

    def _assemble(self, plan: list[str | int], segments: list[_Segment], outputs: list[list[_Output]],
                  n_best: int, return_alignment: bool) -> Translation:
        used = [p for p in plan if isinstance(p, int) and segments[p].ids]
        if not used:  # nothing to translate: its whitespace as sent (none for only characters the tokenizer drops)
            empty = [] if return_alignment else None
            return Translation("".join(p for p in plan if isinstance(p, str)), None, [], empty, empty, empty)
        alternatives: dict[str, float] = {}
        for ranks in _by_total_score([[out.score for out in outputs[i]] for i in used]):
            chosen = dict(zip(used, ranks, strict=True))
            text = "".join(p if isinstance(p, str) else outputs[p][chosen.get(p, 0)].text for p in plan)
            alternatives.setdefault(text, sum(outputs[i][r].score for i, r in chosen.items()))
            if len(alternatives) == n_best:
                break
        alts = [Alternative(t, s) for t, s in alternatives.items()]
        result = Translation(alts[0].text, alts[0].score, alts)
        if return_alignment:
            best = [(segments[i], outputs[i][0]) for i in used]
            result.src_pieces = [p for seg, _ in best for p in [*seg.pieces, EOS_PIECE]]
            result.tgt_pieces = [p for _, out in best for p in [*out.pieces, EOS_PIECE]]
            if all(out.attention is not None for _, out in best):
                blocks = [out.attention for _, out in best]
                result.alignment = torch.block_diag(*blocks).tolist()
        return result

    # ------------------------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------------------------

    def score(self, sources: list[str], candidates: list[str], batch_tokens: int | None = None) -> list[ScoreResult]:
        """Log-probability of each candidate translation of its source, by forced decoding (teacher forcing)."""
        return self.run_score(self.prepare_score(sources, candidates), batch_tokens)

    def prepare_score(self, sources: list[str], candidates: list[str]) -> ScoreJob:
        """A score call's pairs checked and tokenized (cleaned as translation's texts are), ready for run_score; it
        touches no model state, so it may run on any thread."""
        for name, value in (("sources", sources), ("candidates", candidates)):
            if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
                raise NMTError(f"{name} must be a list of strings")
        if len(sources) != len(candidates):
            raise NMTError(f"{len(sources)} sources but {len(candidates)} candidates: they must pair up")
        src_ids = {s: self._encode(s)[0] for s in set(sources)}  # a request scores many candidates of one source
        targets = [self.tgt_tok.encode_with_pieces(normalize_text(t)) for t in candidates]
        return ScoreJob([src_ids[s] for s in sources], [ids for ids, _ in targets], [p for _, p in targets])

    def run_score(self, job: ScoreJob, batch_tokens: int | None = None) -> list[ScoreResult]:
        """Score a prepared call, start to end, in token-budget batches."""
        results: list[ScoreResult] = [ScoreResult(0.0, [], []) for _ in job.sources]
        for group in self.score_groups(job, batch_tokens):
            for i, result in zip(group, self.score_group(job, group), strict=True):
                results[i] = result
        return results

    def score_parts(self, job: ScoreJob, batch_tokens: int | None = None) -> Iterator[list[ScoreResult]]:
        """A prepared call's results in order, a part at a time (for printing as they come): each part pairs enough
        for SCORE_PART_BATCHES batches of the budget, so that the batches inside it stay full and sorted by length."""
        budget = self._score_budget(batch_tokens)
        start = tokens = 0
        for i, target in enumerate(job.targets):
            tokens += padded_tokens(len(target), 1)  # as the budget counts them
            if tokens >= SCORE_PART_BATCHES * budget or i == len(job.sources) - 1:
                yield self.run_score(job.part(start, i + 1), budget)
                start, tokens = i + 1, 0

    def _score_budget(self, batch_tokens: int | None) -> int:
        return _check_int("batch_tokens", self.cfg.decode.batch_tokens if batch_tokens is None else batch_tokens, 1)

    def score_groups(self, job: ScoreJob, batch_tokens: int | None = None) -> list[list[int]]:
        """A prepared call's pairs in token-budget batches (their indices), for score_group one at a time."""
        return token_batches([len(s) for s in job.sources], [len(t) for t in job.targets],
                             self._score_budget(batch_tokens), max(len(job.sources), 1))

    @torch.no_grad()
    def score_group(self, job: ScoreJob, group: list[int]) -> list[ScoreResult]:
        """Score these pairs of a prepared call in one forced-decoding batch, under the model lock."""
        src, tgt = job.sources, job.targets
        with self.lock:
            model = self.model.eval()
            batch = collate([src[i] for i in group], [tgt[i] for i in group], group).to(self.device)
            mem = model.encode(batch.src, batch.src_lens)
            readout = model.decoder(batch.tgt_in, model.init_state(mem), mem)
            logprobs = torch.log_softmax(model.decoder.vocab_logits(readout).float(), dim=-1)
            picked = logprobs.gather(2, batch.tgt_out.unsqueeze(2)).squeeze(2).cpu()
        results = []
        for row, i in enumerate(group):
            values = picked[row, : len(tgt[i]) + 1].tolist()
            results.append(ScoreResult(sum(values), [*job.target_pieces[i], EOS_PIECE], values))
        return results
