"""The model behind the API: one Translator, run by one worker thread, fed by the continuous-batching Batcher."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from nmt.batching import padded_tokens
from nmt.stream import TranslationStream
from nmt.translator import Job, ScoreJob, ScoreResult, Translation, Translator
from service.batcher import Batcher
from service.memory import trim_heap
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

_SCORE = "score"
INLINE_CHARS = 4000  # requests with more characters are tokenized on a thread, not on the event loop
TRIM_AFTER_IDLE_S = 1.0  # the heap's free pages go back to the system once the model has been idle this long


class TooLarge(Exception):
    """A request over a limit that only the tokenized texts show (413): the field and the limit, for people."""

    def __init__(self, field: str, message: str, limit: str):
        super().__init__(f"{field}: {message}")
        self.field, self.limit = field, limit


@dataclass(frozen=True)
class DecodeOptions:
    """A request's decoding options (requests with equal ones share a beam search)."""

    beam_size: int
    n_best: int
    length_penalty: float
    return_alignment: bool


class ModelWorker:
    """Loads the model in its worker thread, then translates (continuous batching) and scores there."""

    def __init__(self, settings: Settings, metrics: Metrics, translator: Translator | None = None):
        self.settings = settings
        self.metrics = metrics
        self.translator = translator
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: Batcher | None = None

    async def start(self) -> None:
        """Start the worker thread and load the model there (torch thread settings are per thread)."""
        s = self.settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmt-model")
        if self.translator is None:
            self.translator = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: Translator.load(s.model_dir, device=s.device, threads=s.threads or None,
                                                        int8=s.int8))
        loop = asyncio.get_running_loop()  # /v1/models shows the weights' digest: taken here, off the event loop
        await loop.run_in_executor(self._executor, lambda: self.translator.weights_sha256)
        self._batcher = Batcher(_Engine(self.translator, s.max_batch_tokens), self._executor,
                                max_requests=s.max_batch_requests,
                                max_queue=s.max_queue, max_wait_s=s.max_wait_ms / 1000,
                                observe=self.metrics.observe_step,
                                count_tokens=self.metrics.source_tokens.inc, on_idle=trim_heap,
                                idle_s=TRIM_AFTER_IDLE_S)
        self.metrics.queue_depth.set_function(lambda: self._batcher.depth if self._batcher else 0)
        self._batcher.start()
        self.metrics.model_loaded.set(1)

    async def close(self) -> None:
        """Finish queued work, then stop the worker thread."""
        if self._batcher is not None:
            await self._batcher.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.metrics.model_loaded.set(0)

    @property
    def ready(self) -> bool:
        return self.translator is not None and self._batcher is not None

    @property
    def model_id(self) -> str:
        return self.translator.name  # info["id"], without building info (and a copy of the config) per request

    @property
    def info(self) -> dict[str, Any]:
        info = dict(self.translator.info)
        info.pop("path", None)  # a server path is nobody's business
        return info

    def defaults(self) -> tuple[int, float]:
        """The model's default beam size and length penalty."""
        d = self.translator.cfg.decode
        return d.beam_size, d.length_penalty

    async def translate(self, texts: list[str], options: DecodeOptions) -> list[Translation]:
        if not texts:
            return []
        self._batcher.check_room()  # a full queue's 503 costs no tokenization (up to 0.1 s of CPU a request)
        # Tokenized here, once: the token count decides when the call may join the batch, and the model thread
        # decodes the prepared job as it is. Bad options raise NMTError here. A verse takes tens of microseconds,
        # but the largest requests take tens of milliseconds: those on a thread, so the event loop keeps serving.
        prepare = functools.partial(self.translator.prepare, texts, batch_tokens=self.settings.max_batch_tokens,
                                    **asdict(options))
        job = prepare() if sum(map(len, texts)) <= INLINE_CHARS else await asyncio.to_thread(prepare)
        limit = self.settings.max_alignment_cells
        if options.return_alignment and job.alignment_cells > limit:
            raise TooLarge("return_alignment", f"the attention matrices of these texts could hold up to "
                           f"{job.alignment_cells:,} weights, more than the limit of {limit:,}; send shorter or "
                           "fewer texts, or leave out return_alignment", f"at most {limit:,} weights")
        return await self._batcher.submit(options, job, job.source_tokens)

    async def score(self, source: str, candidates: list[str]) -> list[ScoreResult]:
        """Score candidates of a source; TooLarge when a text has more pieces than the model's max_len."""
        if not candidates:
            return []
        self._batcher.check_room()
        prepare = functools.partial(self.translator.prepare_score, [source] * len(candidates), candidates)
        inline = len(source) + sum(map(len, candidates)) <= INLINE_CHARS
        job = prepare() if inline else await asyncio.to_thread(prepare)
        # Translation splits long texts into sentences, scoring cannot, and forced decoding costs the product of
        # the two lengths: texts longer than the model was trained on (max_len pieces) are refused.
        limit = self.translator.max_len
        lengths = [("source", len(job.sources[0])), *((f"candidates[{i}]", len(ids))
                                                       for i, ids in enumerate(job.targets))]
        for name, pieces in lengths:
            if pieces > limit:
                raise TooLarge(name, f"{pieces} pieces, more than the {limit} this model scores",
                               f"at most {limit} pieces")
        # A batch's cost in source tokens, as a translation's (each candidate encodes the source).
        return await self._batcher.submit(_SCORE, job, padded_tokens(len(job.sources[0]), len(candidates)))



class _Engine:
    """The Batcher's engine: translations through a TranslationStream, scoring (one forward pass) at once."""

    def __init__(self, translator: Translator, batch_tokens: int, clock: Callable[[], float] = time.perf_counter):
        self.translator, self.batch_tokens = translator, batch_tokens
        self.stream = TranslationStream(translator)
        self._scoring: dict[Hashable, _Scoring] = {}
        self._clock = clock
        self._owed = 0.0  # seconds of model time owed to the translations: what score batches took while they ran

    def add(self, handle: Hashable, key: DecodeOptions | str, work: Job | ScoreJob) -> None:
        if key == _SCORE:
            groups = self.translator.score_groups(work, self.batch_tokens)
            self._scoring[handle] = _Scoring(work, collections.deque(groups), [None] * len(work.sources))
        else:
            self.stream.add_job(handle, work)

    def cancel(self, handle: Hashable) -> None:
        self.stream.cancel(handle)
        self._scoring.pop(handle, None)

    def step(self) -> list[tuple[Hashable, Sequence[Any] | BaseException]]:
        """A decoding step of the translations, and batches of score calls up to the token budget (one at least),
        those with the fewest batches left first: a long score call neither holds up shorter score calls nor
        outlives its caller by more than a batch. Score batches and translations share the model's time: after
        score batches, the translations running (or arriving next) decode for as long as those took before more
        run, so that a score batch of a second delays a verse by about a second, not by one per decoding step (a
        verse waited 18 s behind 64 long candidates, and past its deadline behind two such callers)."""
        done: list[tuple[Hashable, Sequence[Any] | BaseException]] = []
        if self._scoring and (self._owed <= 0 or not len(self.stream)):
            start = self._clock()
            done += self._score_batches()
            took = self._clock() - start
            self._owed = self._owed + took if len(self.stream) else took
        start = self._clock()
        done += self.stream.step()
        self._owed = max(0.0, self._owed - (self._clock() - start))
        return done

    def _score_batches(self) -> list[tuple[Hashable, Sequence[Any] | BaseException]]:
        """Score batches up to the token budget (one at least); the score calls now done."""
        done: list[tuple[Hashable, Sequence[Any] | BaseException]] = []
        used = 0
        for handle, scoring in sorted(self._scoring.items(), key=lambda item: len(item[1].groups)):
            if scoring.groups:  # none: a call with nothing to score
                group = scoring.groups[0]
                cost = padded_tokens(max(len(scoring.job.targets[i]) for i in group), len(group))
                if used and used + cost > self.batch_tokens:
                    break
                used += cost
                scoring.groups.popleft()
                try:
                    for i, result in zip(group, self.translator.score_group(scoring.job, group), strict=True):
                        scoring.results[i] = result
                except Exception as exc:
                    del self._scoring[handle]
                    done.append((handle, exc))
                    continue
            if not scoring.groups:
                del self._scoring[handle]
                done.append((handle, scoring.results))
        return done

    def run_alone(self, key: DecodeOptions | str, work: Job | ScoreJob) -> Sequence[Any]:
        if key == _SCORE:
            return self.translator.run_score(work, batch_tokens=self.batch_tokens)
        return self.translator.run(work)

    def __len__(self) -> int:
        return len(self.stream) + len(self._scoring)

    @property
    def segments(self) -> int:
        return self.stream.segments + sum(len(s.job.sources) for s in self._scoring.values())


@dataclass
class _Scoring:
    """A score call in progress: its batches still to run, and the results so far."""

    job: ScoreJob
    groups: collections.deque[list[int]]
    results: list[ScoreResult | None]
