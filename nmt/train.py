"""The training loop: token-budget batches, Adam, clipping, validation, checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import logging
import math
import os
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sacrebleu.metrics import BLEU
from torch.nn.parallel import DistributedDataParallel

from nmt.batching import ParallelData
from nmt.checkpoint import load_checkpoint, save_checkpoint, step_checkpoint_path, step_checkpoints
from nmt.config import Config, load_config, save_config
from nmt.corpus import CORPUS_JSON, UNNAMED_LANGUAGES, load_split, train_pairs_sha256
from nmt.device import cpu_has_bf16, hardware, out_of_memory, pick_device
from nmt.errors import NMTError
from nmt.evaluate import default_tokenizer
from nmt.export import is_model_dir
from nmt.files import make_dir
from nmt.model import Seq2Seq
from nmt.progress import Progress
from nmt.run_dir import check_run_dir_holds_only_a_run, lock_if_used, lock_run_dir
from nmt.run_log import METRICS_FILE, append_record
from nmt.tokenizer import (
    Tokenizer,
    check_trained_with,
    ensure_tokenizers,
    set_sampling_seed,
    spm_version,
    tokenizers_sha256,
)
from nmt.translator import Translator

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands; saved in checkpoints so --resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next batch within this epoch's shard
    best_bleu: float = -1.0
    best_loss: float = math.inf
    bad_validations: int = 0  # validations in a row without improvement (early stopping)
    last_valid_step: int = -1
    validation_due: bool = False  # a stop abandoned this step's validation: the resumed run does it first

    @property
    def epoch_number(self) -> int:
        """The 1-based epoch of the last update (epoch counts finished epochs; batch is 0 at an epoch's end)."""
        return self.epoch + (1 if self.batch else 0)


class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 when run alone), and the collectives training uses."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            # The timeout must outlast rank 0 training tokenizers or validating while the others wait; a rank
            # that dies is caught sooner: its peers' collectives fail and torchrun stops the job.
            try:
                seconds = float(os.environ.get("NMT_DIST_TIMEOUT", "1800"))
            except ValueError:
                raise NMTError("NMT_DIST_TIMEOUT must be a number of seconds") from None
            cuda = device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds),
                                    device_id=device if cuda else None)
        if not self.main:
            # Only rank 0 reports; the others would repeat every line N times.
            logging.getLogger("nmt").setLevel(logging.WARNING)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sums(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sums([float(flag)])[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on rank 0 (an empty list elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out or []

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Abandoned(BaseException):
    """SIGINT/SIGTERM during work that a resumed run does again (see StopSignal.abandoning)."""


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each update, so it can save and exit; a second
    SIGINT stops at once, without saving (`kept` says what is kept then)."""

    def __init__(self, kept: Callable[[], str] = str) -> None:
        self.requested = False
        self.signum = 0  # the first signal received
        self.kept = kept
        self.previous: dict[int, Any] = {}
        self.abandon: str | None = None  # what is under way, to raise Abandoned at the first signal instead

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            log.warning("stopping without saving: %s", self.kept())
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if self.abandon:
            log.warning("received signal %d: leaving the %s under way (a resumed run does it first), saving a "
                        "checkpoint and stopping (Ctrl-C again stops at once, without saving)", signum, self.abandon)
            self.abandon = None
            raise Abandoned
        log.warning("received signal %d: saving a checkpoint after this update and stopping (Ctrl-C again stops "
                    "at once, without saving)", signum)

    @contextlib.contextmanager
    def abandoning(self, what: str) -> Iterator[None]:
        """Within: a signal raises Abandoned, so that long work a resumed run does again (a validation on a large dev
        set, an epoch's resegmentation) does not hold the stop up; one received before raises it at once."""
        if self.requested:
            raise Abandoned
        self.abandon = what
        try:
            yield
        finally:
            self.abandon = None

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# Settings that fix the weights' shapes or the vocabularies: a run cannot continue, nor reuse its tokenizers,
# under others.
FIXED_KEYS = {
    "model": ("cell", "emb_dim", "enc_hidden", "dec_hidden", "attn_dim", "out_dim", "layers", "attention",
              "tie_embeddings"),
    "tokenizer": ("type", "vocab_size", "joint", "character_coverage"),
}


def config_changes(saved: dict[str, Any], cfg: Config, sections: tuple[str, ...] = ("model", "tokenizer")) -> list[str]:
    """The fixed settings of cfg that differ from a saved config, as 'section.key (old -> new)'."""
    now = cfg.to_dict()
    changes = []
    for section in sections:
        for key in FIXED_KEYS[section]:
            old = saved.get(section, {}).get(key, now[section][key])
            if old != now[section][key]:
                changes.append(f"{section}.{key} ({old!r} -> {now[section][key]!r})")
    return changes


def command_line() -> str:
    """How this process was started, for the run's record (torchrun shows as its rank count)."""
    world = os.environ.get("WORLD_SIZE")
    prefix = f"torchrun ({world} processes): " if world else ""
    threads = os.environ.get("OMP_NUM_THREADS")
    argv = ["nmt", *sys.argv[1:]] if Path(sys.argv[0]).name in ("nmt", "__main__.py") else sys.argv
    return prefix + (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(argv)


def encode_pairs(src_tok: Tokenizer, tgt_tok: Tokenizer, src: list[str], tgt: list[str],
                 max_len: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Encode a parallel corpus; drops pairs empty on a side or longer than max_len pieces."""
    return keep_pairs(src_tok.encode_batch(src), tgt_tok.encode_batch(tgt), max_len)


def keep_pairs(src: list[list[int]], tgt: list[list[int]],
               max_len: int) -> tuple[list[list[int]], list[list[int]], int]:
    """The encoded pairs with 1 to max_len pieces on both sides, and how many others were dropped."""
    keep = [i for i in range(len(src)) if 0 < len(src[i]) <= max_len and 0 < len(tgt[i]) <= max_len]
    return [src[i] for i in keep], [tgt[i] for i in keep], len(src) - len(keep)


def perplexity(nll: float) -> float:
    """exp(nll), capped where it would overflow (a diverging run's first validations)."""
    return math.exp(min(nll, 50.0))


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def label_languages(cfg: Config) -> str:
    """Take data.src_lang and data.tgt_lang from the corpus's corpus.json (written by `nmt prepare`) where it names
    them: the model card and the service report these labels, and the config's defaults say es -> en. Says where
    the labels came from."""
    from_config = "from the config's data.src_lang and data.tgt_lang"
    try:
        corpus = json.loads((Path(cfg.data.dir) / CORPUS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return from_config
    named = (corpus.get("src_lang"), corpus.get("tgt_lang")) if isinstance(corpus, dict) else (None, None)
    if not all(isinstance(lang, str) and lang for lang in named):
        return from_config
    configured = (cfg.data.src_lang, cfg.data.tgt_lang)
    filled = tuple(own if lang == none else lang
                   for lang, none, own in zip(named, UNNAMED_LANGUAGES, configured, strict=True))
    if filled != named:  # prepare's placeholders for a language not given
        log.warning("%s/%s does not name both languages: the model is labelled %s -> %s, the config's data.src_lang "
                    "or data.tgt_lang standing in (they also choose the dev BLEU tokenizer); set those if that is "
                    "wrong", cfg.data.dir, CORPUS_JSON, *filled)
    if filled != configured:
        log.info("languages %s -> %s from %s/%s (the config said %s -> %s)", *filled, cfg.data.dir, CORPUS_JSON,
                 cfg.data.src_lang, cfg.data.tgt_lang)
        cfg.data.src_lang, cfg.data.tgt_lang = filled
    if filled != named:
        return f"from {cfg.data.dir}/{CORPUS_JSON} and the config, which names what the corpus does not"
    return f"as {cfg.data.dir}/{CORPUS_JSON} names them"


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run."""

    def __init__(self, cfg: Config, resume: bool = False):
        self._lock: Any = None  # see lock_run_dir
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.release()
            raise

    def close(self) -> None:
        """Leave the torchrun job and let go of the run directory."""
        # DistributedDataParallel keeps the process group alive: left for the interpreter's exit, gloo's threads
        # are torn down after it and about one job in ten ended in "terminate called without an active exception".
        self.net = self.model
        gc.collect()
        self.ranks.close()
        self.release()

    def release(self) -> None:
        """Let go of the run directory (another `nmt train` may use it then)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _setup(self, cfg: Config, resume: bool) -> None:
        self._languages_from = label_languages(cfg)
        self.cfg = cfg
        tc = cfg.train
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        self.device = pick_device(tc.device, "config key 'train.device'")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.ranks = Ranks(self.device)
        self.run_dir = Path(tc.run_dir)
        self.last_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        checkpoint = self._check_run_dir(resume)
        self.ranks.barrier()  # every rank has looked at the run directory before rank 0 writes in it
        random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        data_dir = Path(cfg.data.dir)
        digest = self._check_resumed_data(checkpoint, data_dir) if checkpoint is not None else None
        train_src, train_tgt = load_split(data_dir, "train")
        self.data_sha256 = digest or train_pairs_sha256(data_dir)  # the files are there: load_split read them
        self.dev_src, self.dev_tgt = load_split(data_dir, "dev")
        if self.ranks.main:
            make_dir(self.run_dir)
            self._lock = self._lock or lock_run_dir(self.run_dir)
            save_config(cfg, self.run_dir / "config.yaml")  # for `nmt train RUN/config.yaml --resume`
            ensure_tokenizers(data_dir, self.run_dir, cfg.tokenizer, self.data_sha256)
        self.ranks.barrier()
        if not (self.run_dir / "src.model").is_file():
            raise NMTError(f"rank {self.ranks.rank} cannot see {self.run_dir}/src.model written by rank 0: "
                           "for training on several machines, train.run_dir must be on a filesystem they share")
        self.src_tok, self.tgt_tok = ensure_tokenizers(data_dir, self.run_dir, cfg.tokenizer, self.data_sha256)
        self.tokenizers_sha256 = tokenizers_sha256(self.run_dir)
        self.train_text = (train_src, train_tgt)
        src_ids, tgt_ids, dropped = encode_pairs(self.src_tok, self.tgt_tok, train_src, train_tgt, cfg.data.max_len)
        if not src_ids:
            raise NMTError(f"no training pairs left in {data_dir} after dropping those over "
                           f"data.max_len={cfg.data.max_len} pieces")
        log.info("train pairs: %d (%d dropped: empty or over %d pieces)", len(src_ids), dropped, cfg.data.max_len)
        self.data = ParallelData(src_ids, tgt_ids, tc.batch_tokens, tc.max_sentences, tc.bucket_width)
        dev_s, dev_t, dev_empty = encode_pairs(self.src_tok, self.tgt_tok, self.dev_src, self.dev_tgt, 10**9)
        if not dev_s:  # dev loss would divide by no tokens, at the first validation
            raise NMTError(f"the dev split in {data_dir} has no pair with text on both sides: dev loss needs some")
        if dev_empty:
            log.warning("%d of %d dev pairs are empty on one side: dev loss leaves them out, dev BLEU scores them",
                        dev_empty, len(self.dev_src))
        self.dev_data = ParallelData(dev_s, dev_t, tc.batch_tokens, tc.max_sentences, tc.bucket_width)
        try:
            self.model = Seq2Seq(cfg.model, len(self.src_tok), len(self.tgt_tok)).to(self.device)
        except (RuntimeError, MemoryError) as exc:
            if (reason := out_of_memory(exc)) is None:
                raise
            raise NMTError(f"cannot build the model that the config's model section describes on {self.device} "
                           f"({reason}): choose smaller sizes") from None
        if cfg.decode.packed_matmuls:  # validation decodes like an exported model; training keeps torch's layers
            self.model.decoder.pack_weights()
        self.translator = Translator(self.model, cfg, self.src_tok, self.tgt_tok, self.device, self.run_dir)
        self.bleu = BLEU(tokenize=default_tokenizer(cfg.data.tgt_lang))  # as `nmt evaluate` scores the language
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                                          weight_decay=tc.weight_decay)
        # threshold 0: any lower dev loss is an improvement, as for early stopping and best.pt (torch's default
        # counted one of less than 1e-4 as none, and decayed the rate at a validation that improved).
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=tc.lr_decay, patience=tc.lr_patience, min_lr=tc.min_lr, threshold=0.0)
        self.pos = Position()
        if checkpoint is not None:
            self._restore(checkpoint)
        self._saved_step = self.pos.step if checkpoint is not None else -1  # the step last.pt holds
        self.net = self.model
        if self.ranks.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        # Without bfloat16 instructions autocast emulates bfloat16 and trains slower than float32.
        bf16_cpu = self.device.type == "cpu" and cpu_has_bf16()
        self.amp = (tc.amp and self.device.type == "cuda") or (tc.amp_cpu and bf16_cpu)
        if tc.amp_cpu and self.device.type == "cpu" and not bf16_cpu:
            log.info("train.amp_cpu: this CPU has no bfloat16 instructions (AVX512_BF16, AMX); training in float32")

    def _check_run_dir(self, resume: bool) -> dict[str, Any] | None:
        """Refuse to overwrite a run or to continue one under an incompatible config; the checkpoint to resume."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NMTError(f"train.run_dir {self.run_dir} is a file, not a directory")
        if is_model_dir(self.run_dir):
            raise NMTError(f"train.run_dir {self.run_dir} is an exported model directory: choose another one")
        if self.ranks.main:
            self._lock = lock_if_used(self.run_dir)
        if not resume:
            if self.last_path.is_file():
                raise NMTError(f"{self.run_dir} already holds a run; use --resume to continue it or choose another "
                               "train.run_dir")
            # A new run beside them would mix its kept checkpoints with these (pruning, `nmt export --average`).
            earlier = [p for p in (self.best_path, *step_checkpoints(self.run_dir)) if p.is_file()]
            if earlier:
                raise NMTError(f"{self.run_dir} holds checkpoints of an earlier run but no last.pt "
                               f"({', '.join(str(p.relative_to(self.run_dir)) for p in earlier[:3])}"
                               f"{' ...' if len(earlier) > 3 else ''}): delete them to start a new run there, or "
                               "choose another train.run_dir")
            check_run_dir_holds_only_a_run(self.run_dir)
            saved = self.run_dir / "config.yaml"
            if (self.run_dir / "src.model").is_file() and saved.is_file():
                changes = config_changes(load_config(saved).to_dict(), self.cfg, ("tokenizer",))
                if changes:
                    raise NMTError(f"{self.run_dir} holds tokenizers trained with other settings "
                                   f"({'; '.join(changes)}): delete its src.model and tgt.model or choose another "
                                   "train.run_dir")
            return None
        if not self.last_path.is_file():
            where = "" if self.run_dir.is_absolute() else f", relative to the current directory {Path.cwd()}"
            raise NMTError(f"--resume: no checkpoint at {self.last_path} (train.run_dir{where}; a run's own settings "
                           "are in RUN/config.yaml: `nmt train RUN/config.yaml --resume`)")
        state = load_checkpoint(self.last_path)  # on CPU: RNG states must stay there; load_state_dict moves the rest
        changes = config_changes(state.get("config", {}), self.cfg)
        if changes:
            raise NMTError(f"cannot resume {self.run_dir} with this config: {'; '.join(changes)}. The model and "
                           "tokenizer settings must stay as the run began (train.* and decode.* may change)")
        return state

    def _check_resumed_data(self, state: dict[str, Any], data_dir: Path) -> str | None:
        """A resumed run must read the training pairs it began with (data.dir may name them elsewhere); their
        digest, when the files are there."""
        # The data.dir of the session that saved the checkpoint: a resume may have read the same pairs elsewhere.
        last = state.get("config", {}).get("data", {}).get("dir")
        where = "" if last is None or Path(last).is_absolute() else " (relative to where training ran)"
        hint = f"resume with --set data.dir={last}{where}, or with `nmt train {self.run_dir}/config.yaml --resume`"
        if last is not None and last != str(data_dir) and not (data_dir / "train.src").is_file():
            raise NMTError(f"cannot resume {self.run_dir}: no {data_dir}/train.src; the run last trained on data.dir "
                           f"{last!r}: {hint}")
        digest = train_pairs_sha256(data_dir)
        if digest is None or state.get("data_sha256", digest) == digest:
            # Other pairs are the first thing to say: new labels, if any, most likely came with them.
            self._check_resumed_languages(state.get("config", {}).get("data", {}))
            return digest  # None: load_split says which file is missing
        if last is not None and Path(last).resolve() == data_dir.resolve():
            raise NMTError(f"cannot resume {self.run_dir}: the training pairs in {data_dir} are not those it began "
                           "with (prepared again?): put back the corpus it began with, or train a new run")
        raise NMTError(f"cannot resume {self.run_dir}: {data_dir}/train.* are not the pairs it began with, last "
                       f"read from data.dir {last!r}: {hint}")

    def _check_resumed_languages(self, saved: dict[str, Any]) -> None:
        """A resumed run may be labelled with other languages (a corpus prepared again with the right ones), but
        not scored otherwise: the target language chooses the dev BLEU tokenizer, and best.pt is picked by those
        scores."""
        data = self.cfg.data
        before, now = (saved.get("src_lang"), saved.get("tgt_lang")), (data.src_lang, data.tgt_lang)
        if None in before or before == now:
            return
        where = self._languages_from
        scoring = default_tokenizer(before[1]), default_tokenizer(now[1])
        if scoring[0] != scoring[1]:
            raise NMTError(f"cannot resume {self.run_dir}: it trained {before[0]} -> {before[1]}, now {now[0]} -> "
                           f"{now[1]} ({where}), and dev BLEU would be tokenized otherwise ({scoring[1]} instead of "
                           f"{scoring[0]}): prepare the corpus with the run's languages, or train a new run")
        log.warning("%s trained %s -> %s and is labelled %s -> %s from now on (%s)", self.run_dir, *before, *now,
                    where)

    def _restore(self, state: dict[str, Any]) -> None:
        check_trained_with(state, self.src_tok, self.tgt_tok, self.run_dir, self.last_path)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise NMTError(f"{self.last_path} does not fit the configured model: {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved_config = state.get("config", {})
        saved = saved_config.get("train", {})
        self._apply_schedule_changes(saved)
        now_config = self.cfg.to_dict()
        # Every section's: data.max_len, say, changes which pairs train (and how an export splits long input).
        changed = [f"{section}.{key}: {old!r} -> {now[key]!r}" for section, now in now_config.items()
                   if isinstance(now, dict) and isinstance(saved_config.get(section), dict)
                   for key, old in saved_config[section].items() if key in now and now[key] != old]
        if changed:
            # A resumed run continues exactly only with the same settings; say which ones this session changes.
            log.info("resuming with settings that differ from the checkpoint's: %s", ", ".join(changed))
        self.pos = Position(**state["position"])
        if saved.get("lr", self.cfg.train.lr) != self.cfg.train.lr:
            self.pos.bad_validations = 0  # a restarted learning rate starts early stopping's count again too
        # One RNG state per rank; checkpoints from before distributed training hold a single one.
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        set_rng_state(rngs[self.ranks.rank % len(rngs)], self.device)
        world = state.get("world", 1)
        if world != self.ranks.world:
            # pos.batch indexes this rank's shard; keep the number of batches the whole job has consumed.
            self.pos.batch = self.pos.batch * world // self.ranks.world
            log.warning("the run was trained on %d processes and resumes on %d: it continues from about the same "
                        "place in the epoch, but not bit for bit", world, self.ranks.world)
        self._refit_position(saved_config)
        log.info("resumed from %s at step %d: next is epoch %d, batch %d", self.last_path, self.pos.step,
                 self.pos.epoch + 1, self.pos.batch + 1)

    def _refit_position(self, saved_config: dict[str, Any]) -> None:
        """With other batching settings (or another data.max_len) than the checkpoint's, the epoch's batches are not
        those its position counts (a larger train.batch_tokens: batch 25 of a 32-batch epoch lay past the end of an
        8-batch one, and the rest of the epoch was skipped): go on from the same fraction of the epoch instead, with
        a warning."""
        tc, saved = self.cfg.train, saved_config.get("train", {})
        old = {k: saved.get(k, getattr(tc, k)) for k in ("batch_tokens", "max_sentences", "bucket_width", "seed")}
        old_max_len = saved_config.get("data", {}).get("max_len", self.cfg.data.max_len)
        changed = [f"train.{k}" for k, value in old.items() if value != getattr(tc, k)]
        changed += ["data.max_len"] if old_max_len != self.cfg.data.max_len else []
        if not changed or not self.pos.batch:
            return
        src, tgt = self.data.src, self.data.tgt
        if old_max_len != self.cfg.data.max_len:  # the pairs the position counted
            src, tgt, _ = encode_pairs(self.src_tok, self.tgt_tok, *self.train_text, old_max_len)
        then = ParallelData(src, tgt, old["batch_tokens"], old["max_sentences"], old["bucket_width"])
        before = len(then.epoch_batches(old["seed"], self.pos.epoch, self.ranks.rank, self.ranks.world))
        now = len(self.data.epoch_batches(tc.seed, self.pos.epoch, self.ranks.rank, self.ranks.world))
        batch = min(now, self.pos.batch * now // max(before, 1))
        self.pos.batch = batch - batch % tc.accum_steps
        log.warning("the run resumes with other batching settings (%s): it goes on %d%% into epoch %d as before, "
                    "but not bit for bit", ", ".join(changed), round(100 * self.pos.batch / max(now, 1)),
                    self.pos.epoch_number)

    def _apply_schedule_changes(self, saved: dict[str, Any]) -> None:
        """On --resume, train.lr, the optimizer's and the decay settings of the config win over those saved in the
        checkpoint (whose optimizer state brought back its betas and weight decay, while the new ones were logged
        and saved as if they applied)."""
        tc = self.cfg.train
        for group in self.optimizer.param_groups:
            group["betas"], group["weight_decay"] = tuple(tc.adam_betas), tc.weight_decay
        self.scheduler.threshold = 0.0  # as set up: checkpoints from before kept torch's 1e-4
        if saved.get("lr", tc.lr) != tc.lr:
            was = self.optimizer.param_groups[0]["lr"]
            for group in self.optimizer.param_groups:
                group["lr"] = tc.lr
            self.scheduler.num_bad_epochs = 0
            log.info("learning rate set to train.lr=%g (the run was at %g)", tc.lr, was)
        self.scheduler.factor, self.scheduler.patience = tc.lr_decay, tc.lr_patience
        self.scheduler.min_lrs = [tc.min_lr] * len(self.optimizer.param_groups)

    def _state(self, full: bool, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        state = {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                 "vocab": {"src": len(self.src_tok), "tgt": len(self.tgt_tok)},
                 "position": self.pos.__dict__.copy(), "world": self.ranks.world, "data_sha256": self.data_sha256,
                 "tokenizers_sha256": self.tokenizers_sha256}
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), rng=rngs)
        return state

    def save(self, best: bool = False, keep: bool = False) -> None:
        """Write last.pt (best.pt, and a kept step checkpoint) on rank 0; every rank must call it, as it gathers
        their RNG states."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):  # the same on every rank
            raise self._diverged(self.pos.step)
        rngs = self.ranks.gather(rng_state(self.device))
        if not self.ranks.main:
            return
        save_checkpoint(self.last_path, self._state(True, rngs))
        self._saved_step = self.pos.step
        if best:
            save_checkpoint(self.best_path, self._state(False, rngs))
        if keep and self.cfg.train.keep_checkpoints:
            save_checkpoint(step_checkpoint_path(self.run_dir, self.pos.step), self._state(False, rngs))
            for old in step_checkpoints(self.run_dir)[:-self.cfg.train.keep_checkpoints]:
                old.unlink()

    def _log(self, record: dict[str, Any]) -> None:
        if self.ranks.main:
            append_record(self.run_dir / METRICS_FILE, record)

    def _log_train(self, window: list[float], seconds: float, echo: bool) -> None:
        """A metrics line from all ranks' (loss, nll, tokens) sums since the last one; with `echo` (no progress bar:
        output to a file, as under nohup) also a log line, so that a log shows training going on."""
        loss, nll, tokens = window
        record = {"type": "train", "step": self.pos.step, "epoch": self.pos.epoch_number, "loss": loss / tokens,
                  "nll": nll / tokens, "ppl": perplexity(nll / tokens),
                  "lr": self.optimizer.param_groups[0]["lr"], "tok_s": tokens / max(seconds, 1e-9),
                  "time": time.time()}
        self._log(record)
        if echo and self.ranks.main:
            log.info("step %d  epoch %d  loss %.3f  ppl %.2f  lr %g  %.0f tok/s", record["step"], record["epoch"],
                     record["loss"], record["ppl"], record["lr"], record["tok_s"])

    def update(self, batches: list[list[int]]) -> tuple[float, float, int]:
        """One optimizer update over accumulated batches; returns (loss sum, nll sum, target tokens)."""
        tc = self.cfg.train
        self.net.train()
        parts = [self.data.batch(b) for b in batches]
        local_tokens = sum(p.ntokens for p in parts)
        # Normalize by the tokens of the whole update on all ranks, so N ranks x B/N equals 1 x B.
        total_tokens = self.ranks.sums([local_tokens])[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = nll_sum = 0.0
        for i, part in enumerate(parts):
            part = part.to(self.device)
            sync = i == len(parts) - 1 or self.ranks.world == 1
            ctx = self.net.no_sync() if not sync else contextlib.nullcontext()
            with ctx, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss, nll = self.net(part.src, part.src_lens, part.tgt_in, part.tgt_out, tc.label_smoothing,
                                     tc.sampled_softmax)
                (loss * (self.ranks.world / total_tokens)).backward()
            loss_sum += float(loss.detach())
            nll_sum += float(nll)
        if self.ranks.any(not math.isfinite(loss_sum)):
            raise self._diverged(self.pos.step + 1)
        if tc.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_norm)
        self.optimizer.step()
        return loss_sum, nll_sum, local_tokens

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dev loss and perplexity (teacher forced) and dev BLEU (greedy), on rank 0."""
        self.model.eval()
        nll_sum, tokens = 0.0, 0
        # On CPU the exported model decodes in float32, so dev loss is measured as it will run.
        amp = self.amp and self.device.type == "cuda"
        for b in self.dev_data.epoch_batches(seed=0, epoch=0):
            batch = self.dev_data.batch(b).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                _, nll = self.model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out)
            nll_sum += float(nll)
            tokens += batch.ntokens
        if not math.isfinite(nll_sum):  # weights of 1e30 are finite yet overflow: save() would keep them
            raise self._diverged(self.pos.step)
        result = {"dev_loss": nll_sum / tokens, "dev_ppl": perplexity(nll_sum / tokens)}
        if self.cfg.train.valid_bleu:
            limit = self.cfg.train.valid_max_sentences or len(self.dev_src)
            src, refs = self.dev_src[:limit], self.dev_tgt[:limit]
            # Translated as `nmt evaluate RUN --split dev --beam 1` would: the same BLEU for the same weights.
            job = self.translator.prepare(src, beam_size=1)
            hyps = self.translator.search(job)
            if not all(hyps):  # a sentence without a hypothesis: every score overflowed to inf or nan
                raise self._diverged(self.pos.step)
            out = [t.text for t in self.translator.finish(job, hyps)]
            result["dev_bleu"] = self.bleu.corpus_score(out, [refs]).score
        return result

    def run(self) -> dict[str, Any]:
        tc = self.cfg.train
        per_epoch = -(-len(self.data.epoch_batches(tc.seed, 0, self.ranks.rank, self.ranks.world)) // tc.accum_steps)
        if per_epoch == 0:
            raise NMTError("the training data gives fewer batches than there are ranks")
        total = tc.max_steps or per_epoch * tc.epochs
        reason = "finished"
        if tc.max_steps and self.pos.step >= tc.max_steps:  # a resumed run that had reached it: not one more update
            log.info("the run is at step %d, train.max_steps=%d: nothing to train (raise train.max_steps to go on)",
                     self.pos.step, tc.max_steps)
            reason = "max steps"
        elif self.pos.epoch >= tc.epochs:  # likewise for a run that trained all its epochs
            log.info("the run has trained its %d epochs (train.epochs): nothing to train (raise train.epochs to go "
                     "on)", tc.epochs)
        elif tc.early_stop_patience and self.pos.bad_validations >= tc.early_stop_patience:
            # Otherwise a resumed run that had stopped early trained one more validation interval, to stop again.
            log.info("the run stopped early at step %d, after %d validations in a row without improvement "
                     "(train.early_stop_patience=%d): nothing to train (raise train.early_stop_patience, or restart "
                     "the learning rate with --set train.lr=..., to go on)", self.pos.step, self.pos.bad_validations,
                     tc.early_stop_patience)
            reason = "early stopping"
        if self.cfg.tokenizer.sample_alpha > 0 and self.ranks.main:
            log.warning("tokenizer.sample_alpha=%g: SentencePiece draws the sampled segmentations with a generator "
                        "that does not repeat from one process to the next whatever its seed (sentencepiece %s), so "
                        "this run is not repeatable bit for bit, nor a resume exact", self.cfg.tokenizer.sample_alpha,
                        spm_version())
        bar = Progress(total, "step", enabled=None if self.ranks.main else False, start=self.pos.step)
        with StopSignal(self._kept) as stop, bar as progress:
            # Logged once SIGINT/SIGTERM are caught: from this line on, a stop saves a checkpoint.
            self._log({"type": "session", "event": "start", "step": self.pos.step, **hardware(self.device),
                       "threads": torch.get_num_threads(), "ranks": self.ranks.world, "command": command_line(),
                       "precision": "bf16" if self.amp else "fp32", "time": time.time()})
            try:
                if self.pos.validation_due and self._validate_and_save(stop):  # the one a stop left undone
                    reason = "early stopping"
                if reason == "finished":
                    reason = self._train_epochs(stop, progress)
                if reason != "interrupted" and self.pos.last_valid_step != self.pos.step:
                    self._validate_and_save(stop)
            except Abandoned:
                reason = "interrupted"
            if reason == "interrupted":
                self.save()
            # Still under StopSignal: a second Ctrl-C from here on says what last.pt keeps, as before the save.
            self._log({"type": "session", "event": "end", "step": self.pos.step, "reason": reason,
                       "time": time.time()})
            self.ranks.barrier()
        return {"step": self.pos.step, "best_bleu": self.pos.best_bleu, "reason": reason, "signal": stop.signum,
                "main": self.ranks.main}

    def _train_epochs(self, stop: StopSignal, progress: Progress) -> str:
        """Update, validating on schedule, until the run must stop; why it stopped ("finished": its epochs)."""
        tc = self.cfg.train
        window, window_start = [0.0, 0.0, 0.0], time.monotonic()  # loss, nll, tokens since the last log line
        while self.pos.epoch < tc.epochs:
            if self.cfg.tokenizer.sample_alpha > 0:
                with self._abandonable(stop, "resegmentation of the training text"):  # seconds on a large corpus
                    self._resample(self.pos.epoch)
            batches = self.data.epoch_batches(tc.seed, self.pos.epoch, self.ranks.rank, self.ranks.world)
            while self.pos.batch < len(batches):
                # The epoch's last update may sum fewer batches (its loss is per token): they were left out.
                group = batches[self.pos.batch: self.pos.batch + tc.accum_steps]
                loss, nll, ntok = self.update(group)
                self.pos.batch += len(group)
                self.pos.step += 1
                window = [window[0] + loss, window[1] + nll, window[2] + ntok]
                now = time.monotonic()
                progress.update(self.pos.step, epoch=self.pos.epoch + 1, loss=loss / max(ntok, 1),
                                tok_s=round(window[2] * self.ranks.world / max(now - window_start, 1e-9)))
                if self.pos.step % tc.log_every == 0:
                    self._log_train(self.ranks.sums(window), now - window_start, echo=not progress.enabled)
                    window, window_start = [0.0, 0.0, 0.0], now
                reason = "finished"
                if tc.valid_every and self.pos.step % tc.valid_every == 0:
                    started = time.monotonic()
                    if self._validate_and_save(stop):
                        reason = "early stopping"
                    window_start += time.monotonic() - started  # tokens/s of training: without the validation's
                if reason == "finished" and tc.max_steps and self.pos.step >= tc.max_steps:
                    reason = "max steps"
                if self.ranks.any(stop.requested):
                    reason = "interrupted"
                if reason != "finished":
                    return reason
            self.pos.epoch += 1
            self.pos.batch = 0
            # A run stopped by max_steps at the end of an epoch validated then; resuming must not again.
            if not tc.valid_every and self.pos.last_valid_step != self.pos.step and self._validate_and_save(stop):
                return "early stopping"
        return "finished"

    def _diverged(self, step: int) -> NMTError:
        """The error that stops a run whose loss, weights or decoding scores overflowed (not saving them)."""
        lr = f"train.lr (now {self.optimizer.param_groups[0]['lr']:g})"
        advice = (f"resume (--resume) with a lower {lr}" if self._saved_step >= 0 and self.last_path.is_file()
                  else f"start again with a lower {lr}")
        return NMTError(f"training diverged at step {step}: the loss, the weights or the decoder's scores are no "
                        f"longer finite numbers; {self._kept()}; {advice}")

    def _kept(self) -> str:
        """What a stop without saving keeps."""
        if self._saved_step < 0 or not self.last_path.is_file():
            return "no checkpoint of this run yet"
        if self._saved_step == self.pos.step:
            return f"{self.last_path} keeps the weights of step {self._saved_step}, the last update"
        return f"{self.last_path} keeps the weights of step {self._saved_step}; later updates are lost"

    def _abandonable(self, stop: StopSignal, what: str) -> contextlib.AbstractContextManager[None]:
        """stop.abandoning(what) in a process alone; the ranks of a job stop together, after an update."""
        return stop.abandoning(what) if self.ranks.world == 1 else contextlib.nullcontext()

    def _validate_and_save(self, stop: StopSignal) -> bool:
        """Validate, adjust the learning rate, save last (and best); True when early stopping says stop. A signal
        to rank 0 (which validates while the other ranks of a job wait for its results) abandons the validation:
        Abandoned on every rank, with nothing changed but pos.validation_due."""
        tc = self.cfg.train
        improved = False
        if self.ranks.main:
            try:
                with stop.abandoning("validation"):
                    metrics = self.validate()
            except Abandoned:
                self.pos.validation_due = True  # the other ranks learn of it from the position sent below
            else:
                improved = self._record_validation(metrics)
        self._broadcast_position()
        if self.pos.validation_due:  # rank 0 left it
            raise Abandoned
        self.save(best=improved, keep=True)
        return bool(tc.early_stop_patience) and self.pos.bad_validations >= tc.early_stop_patience

    def _record_validation(self, metrics: dict[str, float]) -> bool:
        """Rank 0: the learning-rate schedule, early stopping's count and the best scores take a validation's
        metrics, which are logged; whether it improved on the best."""
        self.scheduler.step(metrics["dev_loss"])
        key = metrics.get("dev_bleu", -metrics["dev_loss"])
        best = self.pos.best_bleu if "dev_bleu" in metrics else -self.pos.best_loss
        improved = key > best
        if improved:
            self.pos.bad_validations = 0
        else:
            self.pos.bad_validations += 1
        self.pos.best_loss = min(self.pos.best_loss, metrics["dev_loss"])
        if "dev_bleu" in metrics:
            self.pos.best_bleu = max(self.pos.best_bleu, metrics["dev_bleu"])
        self._log({"type": "valid", "step": self.pos.step, "epoch": self.pos.epoch_number, **metrics,
                   "lr": self.optimizer.param_groups[0]["lr"], "time": time.time()})
        log.info("step %d: %s", self.pos.step, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        self.pos.last_valid_step, self.pos.validation_due = self.pos.step, False
        return improved

    def _broadcast_position(self) -> None:
        """Rank 0 validates; the others take its learning rate and early-stopping state."""
        if self.ranks.world == 1:
            return
        box = [(self.pos.__dict__, self.scheduler.state_dict(), self.optimizer.param_groups[0]["lr"])]
        dist.broadcast_object_list(box, src=0)
        pos, sched, lr = box[0]
        self.pos = Position(**pos)
        self.scheduler.load_state_dict(sched)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _resample(self, epoch: int) -> None:
        """Subword regularization: a fresh seeded segmentation of the training text for each epoch."""
        set_sampling_seed(self.cfg.train.seed + epoch)
        alpha = self.cfg.tokenizer.sample_alpha
        src, tgt = self.train_text
        s = [self.src_tok.encode(x, alpha) for x in src]
        t = [self.tgt_tok.encode(x, alpha) for x in tgt]
        self.data.src, self.data.tgt, _ = keep_pairs(s, t, self.cfg.data.max_len)


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the run described by cfg; returns the final step, best dev BLEU, why it stopped (and the
    signal that stopped it, else 0) and whether this process is rank 0 (always, outside torchrun)."""
    trainer = Trainer(cfg, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
