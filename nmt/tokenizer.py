"""SentencePiece subword tokenizers with fixed special ids (pad 0, unk 1, bos 2, eos 3)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm

from nmt.config import MIN_CHARACTER_COVERAGE, TokenizerConfig
from nmt.corpus import TRAIN_FILES, train_pairs_sha256
from nmt.errors import NMTError
from nmt.files import atomic_write, sha256_of, write_failure

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = 0, 1, 2, 3
PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"
WORD_START = "\u2581"  # SentencePiece's visible space, which begins every word's first piece
TOKENIZER_FILES = ("src.model", "tgt.model")  # a run's or exported model's source and target SentencePiece models
TOKENIZER_RECORD = "tokenizers.json"  # in a run directory: the digest of the training pairs its tokenizers learned
SENTENCEPIECE_MAX_BYTES = 4192  # longer lines are left out of tokenizer training (SentencePiece's default)
_SPACES = re.compile(" {2,}")


class Tokenizer:
    """One SentencePiece model: text <-> ids, with optional subword sampling for training."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise NMTError(f"SentencePiece model not found: {self.path}")
        self.path.open("rb").close()  # PermissionError as such: SentencePiece's would call it no model
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise NMTError(f"{self.path} is not a SentencePiece model ({exc})") from None
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD, UNK, BOS, EOS):
            raise NMTError(f"{self.path}: special ids must be pad=0 unk=1 bos=2 eos=3")

    def __len__(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, sample_alpha: float = 0.0) -> list[int]:
        if sample_alpha > 0:
            return self.sp.Encode(text, enable_sampling=True, alpha=sample_alpha, nbest_size=-1)
        return self.sp.Encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # SentencePiece encodes a list on a thread pool, whose start costs ~0.2 ms (3.6 ms the first time): more
        # than a hundred short texts take one by one, and a server request holds one to a few texts.
        if len(texts) < 100:
            return [self.sp.Encode(text) for text in texts]
        return self.sp.Encode(texts)

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.IdToPiece(i) for i in ids]

    def to_pieces(self, text: str) -> list[str]:
        return self.sp.EncodeAsPieces(text)

    def encode_with_pieces(self, text: str) -> tuple[list[int], list[str]]:
        """Ids and their surface pieces (an <unk>'s piece is the text it stands for)."""
        return self.sp.Encode(text), self.sp.EncodeAsPieces(text)

    def decode(self, ids: list[int]) -> str:
        # SentencePiece writes an <unk> as " ⁇ ", spaces included: a text began with a space, and a word beside
        # it was two spaces away.
        return _SPACES.sub(" ", self.sp.Decode([i for i in ids if i > EOS or i == UNK])).strip(" ")


def set_sampling_seed(seed: int) -> None:
    """Seed SentencePiece's sampler: its draws then repeat within this process, but not in another one
    (sentencepiece 0.2.3: the same seed in two processes gives other segmentations). Any int: SentencePiece takes
    an unsigned 32-bit seed, so it is taken modulo 2**32."""
    spm.set_random_generator_seed(seed % 2**32)


def spm_version() -> str:
    return getattr(spm, "__version__", "unknown")


def train_sentencepiece(texts: list[Path], prefix: Path, cfg: TokenizerConfig) -> Path:
    """Train a SentencePiece model on the given text files; writes PREFIX.model atomically."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_unwinds(), tempfile.TemporaryDirectory(dir=prefix.parent, prefix=".sentencepiece-") as tmp:
        tmp_prefix = Path(tmp) / prefix.name  # the directory is hidden: not part of a run
        # SentencePiece splits its input at commas: the texts are read through links named without any.
        inputs = [Path(tmp) / f"input-{i}" for i in range(len(texts))]
        for link, text in zip(inputs, texts, strict=True):
            link.symlink_to(text.resolve())
        out = prefix.with_suffix(".model")
        try:
            _train_in_child({
                "input": ",".join(link.name for link in inputs),
                "model_prefix": tmp_prefix.name,  # the child runs in tmp, which may be a relative path
                "model_type": cfg.type,
                "vocab_size": cfg.vocab_size,
                "character_coverage": cfg.character_coverage,
                "input_sentence_size": cfg.input_sentence_size,
                "max_sentence_length": SENTENCEPIECE_MAX_BYTES,
                "shuffle_input_sentence": True,
                "pad_id": PAD, "unk_id": UNK, "bos_id": BOS, "eos_id": EOS,
                "pad_piece": PAD_PIECE, "unk_piece": UNK_PIECE, "bos_piece": BOS_PIECE, "eos_piece": EOS_PIECE,
                "hard_vocab_limit": False,
                "num_threads": os.cpu_count() or 1,
                "minloglevel": 2,
            }, cwd=Path(tmp))
        except (RuntimeError, ValueError) as exc:  # ValueError: an option it cannot parse
            raise NMTError(_training_error(str(exc), texts, cfg, out)) from None
        written = tmp_prefix.with_suffix(".model")
        try:  # SentencePiece does not check its writes: on a full disk it leaves a model cut short
            size = spm.SentencePieceProcessor(model_file=str(written)).get_piece_size()
        except (OSError, RuntimeError) as exc:
            raise NMTError(f"cannot write {out} ({write_failure(out, exc)})") from None
        os.replace(written, out)
    # hard_vocab_limit=False: a small corpus yields fewer pieces than asked for
    short = f" of the {cfg.vocab_size} asked for: the corpus has no more" if size < cfg.vocab_size else ""
    log.info("trained SentencePiece %s (%s, vocab %d%s)", out, cfg.type, size, short)
    return out


# SentencePiece's trainer runs in a child process: its C++ loop does not return to Python until it has finished
# (half a minute for a million lines), so in this process Ctrl-C waited for it. The child ends at Ctrl-C (the
# terminal signals the whole process group), unless this process ignores it, and with this process however it ends
# (PR_SET_PDEATHSIG). `python -c` puts the working directory first on sys.path: a sentencepiece.py or json.py there
# would be imported instead; the child takes it off before it imports anything but the built-in sys.
_TRAINER = """
import sys
if not getattr(sys.flags, "safe_path", False):
    del sys.path[0]
import ctypes, json, os, signal
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
import sentencepiece as spm
try:
    spm.SentencePieceTrainer.Train(**json.loads(sys.stdin.read()))
except (RuntimeError, ValueError) as exc:
    sys.stdout.write(str(exc))
    sys.exit(1)
"""


def _train_in_child(options: dict[str, Any], cwd: Path) -> None:
    """SentencePieceTrainer.Train(**options) in a child process working in cwd; RuntimeError with its message when
    it fails."""
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        out, err = proc.communicate(json.dumps(options))
    finally:  # interrupted: the trainer must not go on writing into a directory that is being removed
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode < 0:
        raise RuntimeError(f"the trainer process was ended by signal {-proc.returncode}"
                           + (" (out of memory?)" if proc.returncode == -signal.SIGKILL else ""))
    if proc.returncode:
        raise RuntimeError(out.strip() or err.strip() or f"the trainer process exited with status {proc.returncode}")


class _Terminated(BaseException):
    """SIGTERM, raised so that the code it stops unwinds."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Within: SIGTERM (where nothing else handles it) unwinds like Ctrl-C, so temporary files go, then ends the
    process by that signal as before."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        # Still here: the process is a container's PID 1, which the kernel does not end by a signal it does not
        # handle. It ends with the status a shell gives a process ended by SIGTERM.
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _training_error(message: str, texts: list[Path], cfg: TokenizerConfig, out: Path) -> str:
    """SentencePiece's failure in the config's terms (it names its own flags and source lines)."""
    message = message.strip()
    check = re.match(r"\w+: \S+\(\d+\) \[(.*?)\](?: |$)", message)  # "INTERNAL: file.cc(638) [check] why"
    if check:
        if "Write" in check[1]:  # a failed write of its .vocab: a full disk, as a rule
            return f"cannot write {out} ({write_failure(out, RuntimeError(message))})"
        message = message[check.end():] or check[1]
    too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        lower = (f", or lower tokenizer.character_coverage (now {cfg.character_coverage}, at least "
                 f"{MIN_CHARACTER_COVERAGE}) to leave out rare characters"
                 if cfg.character_coverage > MIN_CHARACTER_COVERAGE else "")
        return (f"tokenizer.vocab_size {too_small[1]} is too small for the {too_small[2]} characters and special "
                f"pieces of {', '.join(map(str, texts))}: raise tokenizer.vocab_size{lower}")
    if "!sentences_.empty()" in message:  # it skips empty lines and those over its max_sentence_length
        return (f"SentencePiece found no line to train on in {', '.join(map(str, texts))}: every line is empty or "
                f"longer than {SENTENCEPIECE_MAX_BYTES} bytes")
    return f"SentencePiece training failed on {', '.join(map(str, texts))}: {message}"


def ensure_tokenizers(data_dir: Path, run_dir: Path, cfg: TokenizerConfig,
                      data_sha256: str | None = None) -> tuple[Tokenizer, Tokenizer]:
    """Load the run's src.model/tgt.model, training them on the corpus's train split if the run has none.

    data_sha256: the train split's digest (corpus.train_pairs_sha256) where the caller has it already; hashing a
    large corpus again takes seconds."""
    src_path, tgt_path = (run_dir / name for name in TOKENIZER_FILES)
    record = run_dir / TOKENIZER_RECORD
    if src_path.is_file() and tgt_path.is_file():
        _check_trained_on(record, data_dir, data_sha256)
        return Tokenizer(src_path), Tokenizer(tgt_path)
    src_text, tgt_text = (data_dir / name for name in TRAIN_FILES)
    for f in (src_text, tgt_text):
        if not f.is_file():
            raise NMTError(f"training text not found: {f} (run `nmt prepare` first)")
    if cfg.joint:
        train_sentencepiece([src_text, tgt_text], src_path.with_suffix(""), cfg)
        atomic_write(tgt_path, lambda tmp: shutil.copyfile(src_path, tmp))
    else:
        train_sentencepiece([src_text], src_path.with_suffix(""), cfg)
        train_sentencepiece([tgt_text], tgt_path.with_suffix(""), cfg)
    digest = data_sha256 or train_pairs_sha256(data_dir)
    text = json.dumps({"data_dir": str(data_dir), "train_pairs_sha256": digest}) + "\n"
    atomic_write(record, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Tokenizer(src_path), Tokenizer(tgt_path)


def _check_trained_on(record: Path, data_dir: Path, data_sha256: str | None) -> None:
    """NMTError when the run's tokenizers were trained on other training pairs than data_dir's: a first attempt
    on another corpus (or before the corpus was prepared again) left them, and pieces they never saw would all be
    <unk>, with a dev perplexity that looks excellent. Tokenizers without a record (put there by hand) pass."""
    try:
        trained = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(trained, dict) or trained.get("train_pairs_sha256") is None:
        return
    if trained["train_pairs_sha256"] == (data_sha256 or train_pairs_sha256(data_dir)):
        return
    raise NMTError(f"the tokenizers in {record.parent} were trained on other training pairs than those in "
                   f"{data_dir} (on {trained.get('data_dir')}, or before it was prepared again): "
                   "`nmt tokenizer CONFIG --force` trains them again on this corpus (before the first checkpoint), "
                   "or choose another train.run_dir")


def tokenizers_sha256(home: Path) -> str:
    """SHA-256 of a run's src.model and tgt.model: which vocabularies its checkpoints were trained with."""
    return sha256_of(*(home / name for name in TOKENIZER_FILES))


def check_trained_with(state: dict[str, Any], src: Tokenizer, tgt: Tokenizer, home: Path, source: Path) -> None:
    """NMTError unless the checkpoint `state`, read from `source`, was trained with home's tokenizers: by their
    digest, or by their sizes alone in checkpoints from before the digest was kept."""
    digest = state.get("tokenizers_sha256")
    same = (digest == tokenizers_sha256(home) if digest is not None
            else state.get("vocab") == {"src": len(src), "tgt": len(tgt)})
    if not same:
        raise NMTError(f"{source} was trained with other vocabularies than {home}/src.model and tgt.model "
                       "(replaced since?): put back the tokenizers it was trained with")
