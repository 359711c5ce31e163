"""Typed configuration: YAML sections -> dataclasses, with defaults, validation and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nmt.errors import NMTError
from nmt.files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    dir: str = "data/bible"  # prepared corpus: train/dev/test .src/.tgt files (see `nmt prepare`)
    src_lang: str = "es"
    tgt_lang: str = "en"
    max_len: int = 200  # training pairs with more subword pieces than this on either side are skipped


@dataclass
class TokenizerConfig:
    type: str = "unigram"  # SentencePiece model type: unigram or bpe
    vocab_size: int = 8000  # per language (or shared when joint)
    joint: bool = False  # one vocabulary for source and target
    character_coverage: float = 1.0  # share of the characters the vocabulary covers (0.98-1); rarer ones: <unk>
    sample_alpha: float = 0.0  # subword regularization during training (unigram: smoothing; bpe: dropout rate); 0 = off
    input_sentence_size: int = 2_000_000  # sentences SentencePiece samples to train on; 0 = all (else over 100)


@dataclass
class ModelConfig:
    cell: str = "lstm"  # lstm or gru
    emb_dim: int = 256  # source and target embedding size
    enc_hidden: int = 256  # per direction
    dec_hidden: int = 512
    attn_dim: int = 512  # hidden size of the additive attention MLP
    out_dim: int = 512  # readout layer between [s_i; c_i; emb(y_{i-1})] and the vocabulary
    layers: int = 1  # stacked layers in encoder and decoder (residual connections between them)
    dropout: float = 0.3
    attention: str = "bahdanau"  # bahdanau, or none for the RNNencdec baseline
    tie_embeddings: bool = False  # share target embedding and output weights (needs out_dim == emb_dim)


@dataclass
class TrainConfig:
    run_dir: str = "runs/base"  # checkpoints, tokenizers, metrics.jsonl
    seed: int = 1234
    threads: int = 0  # torch intra-op threads; 0 = torch default; at most MAX_THREADS (1024)
    device: str = "auto"  # auto, cpu, cuda
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    amp_cpu: bool = True  # bfloat16 autocast on CPUs with AVX512_BF16 or AMX (float32 on others)
    batch_tokens: int = 4096  # target tokens per batch
    max_sentences: int = 256  # cap on sentences per batch
    bucket_width: int = 4  # length bucket width for batching (source pieces)
    epochs: int = 30
    max_steps: int = 0  # stop after this many updates; 0 = no limit
    lr: float = 0.001
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])  # Adam's two decay rates, each in [0, 1)
    weight_decay: float = 0.0
    clip_norm: float = 5.0  # gradient-norm clipping; 0 = off
    label_smoothing: float = 0.1
    sampled_softmax: int = 0  # K > 0: softmax over each batch's target pieces + K drawn at random; 0 = whole vocab
    lr_decay: float = 0.5  # multiply lr by this when dev loss plateaus
    lr_patience: int = 2  # validations without dev-loss improvement tolerated: the next one such decays lr
    min_lr: float = 1.0e-5
    valid_every: int = 1000  # updates between validations; 0 = once per epoch
    valid_bleu: bool = True  # greedy-decode dev for BLEU at each validation
    valid_max_sentences: int = 0  # cap on dev sentences decoded for BLEU; 0 = all
    # stop at this many validations in a row without dev-BLEU improvement (dev loss without valid_bleu); 0 = off
    early_stop_patience: int = 8
    log_every: int = 50  # updates between metric lines
    accum_steps: int = 1  # batches whose gradients are summed before one update
    keep_checkpoints: int = 0  # weights saved at the last N validations, for `nmt export --average`; 0 = none


@dataclass
class DecodeConfig:
    beam_size: int = 5
    length_penalty: float = 1.0  # GNMT alpha, at most MAX_LENGTH_PENALTY; 0 = none
    max_len_a: float = 1.5  # output length limit: a * source_length + b pieces (a at most 10, b at most 1000)
    max_len_b: int = 10
    replace_unk: bool = True  # replace <unk> by the most-attended source piece
    no_repeat_ngram: int = 0  # ban any n-gram of this size from appearing twice in an output; 0 = off
    batch_tokens: int = 4000  # source tokens per translation batch (padded, ends of sentence included)
    gate_table_mb: int = 256  # precompute every target token's embedding gate term when the table fits; 0 = off
    packed_matmuls: bool = True  # CPU fp32 (int8 off): decoding's matmuls through oneDNN on prepacked weights
    # CPU with VNNI: decoding's matmuls in int8 through oneDNN (nmt/int8.py), each sentence's result independent of
    # its batch; the shipped model scores as in fp32 (README "int8"). Other CPUs (slower in int8) and CUDA: fp32.
    int8: bool = True
    shortlist: bool = True  # decode over a lexical shortlist when the model directory has one (nmt export)
    shortlist_frequent: int = 2000  # the shortlist: this many most frequent target pieces ...
    shortlist_per_source: int = 10  # ... plus this many co-occurring ones per source piece and word (at most
    # STORED_PER_SOURCE, as many as the shortlist file keeps)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "tokenizer.type": ("unigram", "bpe"),
    "model.cell": ("lstm", "gru"),
    "model.attention": ("bahdanau", "none"),
    "train.device": ("auto", "cpu", "cuda"),
}
_POSITIVE = {
    "tokenizer.vocab_size", "model.emb_dim", "model.enc_hidden", "model.dec_hidden", "model.attn_dim",
    "model.out_dim", "model.layers", "data.max_len", "train.batch_tokens", "train.max_sentences",
    "train.bucket_width", "train.epochs", "train.log_every", "train.accum_steps", "decode.beam_size",
    "decode.batch_tokens", "train.lr",
}
_NON_NEGATIVE = {
    "train.threads", "train.max_steps", "train.weight_decay", "train.clip_norm",
    "train.min_lr", "train.valid_every", "train.valid_max_sentences", "train.early_stop_patience",
    "train.lr_patience", "train.keep_checkpoints", "train.sampled_softmax", "tokenizer.sample_alpha", "train.seed",
    "decode.length_penalty", "decode.max_len_a", "decode.max_len_b", "decode.no_repeat_ngram",
    "decode.gate_table_mb", "decode.shortlist_frequent", "decode.shortlist_per_source",
    "tokenizer.input_sentence_size",
}
MAX_LENGTH_PENALTY = 10.0  # GNMT's alpha is 0.6-1; far past it, the longest hypothesis always wins
# [0, 1): a dropout or label smoothing of 1 leaves nothing to learn from, and torch's ReduceLROnPlateau refuses a
# factor of 1 (a learning rate that never falls: train.min_lr = train.lr).
_UNIT_INTERVAL = {"model.dropout", "train.label_smoothing", "train.lr_decay"}
# Upper bounds past which a value is a mistake: decoding to a*source+b pieces with a model that has not learnt to
# stop yet (early in training) would run for hours.
STORED_PER_SOURCE = 50  # target candidates a shortlist file keeps per source piece or word (nmt.shortlist)
MAX_THREADS = 1024  # torch threads: libgomp crashes the process (SIGSEGV) when asked for tens of thousands
_AT_MOST = {"decode.length_penalty": MAX_LENGTH_PENALTY, "decode.max_len_a": 10, "decode.max_len_b": 1000,
            "decode.shortlist_per_source": STORED_PER_SOURCE,
            "train.seed": 2**32 - 1,  # SentencePiece's sampling seed is an unsigned 32-bit number
            "train.threads": MAX_THREADS}
SENTENCEPIECE_MIN_SAMPLE = 101  # tokenizer.input_sentence_size: SentencePiece refuses 1 to 100
MIN_CHARACTER_COVERAGE = 0.98  # tokenizer.character_coverage: SentencePiece refuses less
SPECIAL_PIECES = 4  # every vocabulary's ids 0-3 (nmt.tokenizer: PAD, UNK, BOS, EOS)
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a float that YAML 1.1 may leave a string


def integers(low: int, high: int | None = None) -> str:
    """How an error names the integers a setting takes."""
    return f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one value against its declared type, converting int to float where a float is expected."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = _float(value)
        if number is not None:
            if not math.isfinite(number):
                raise NMTError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if value is None:
            raise NMTError(f"config key '{key}' has no value: give it one")
        raise NMTError(f"config key '{key}' must be of type str, got {value!r}: quote the value (YAML reads an "
                       "unquoted no, yes, on or off as a boolean, digits as a number, and `a: b` as a mapping)")
    elif hint is list or origin is list:
        if isinstance(value, list):
            return value
    elif origin in (typing.Union, types.UnionType):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise NMTError(f"config key '{key}' must be of type {name}, got {value!r}")


def _float(value: Any) -> float | None:
    """A YAML number (or a string YAML 1.1 leaves unread: 1e-4, nan, inf) as a float; None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(".inf", "inf").replace(".nan", "nan")
        if _DECIMAL.fullmatch(text) or text.lstrip("+-") in ("nan", "inf", "infinity"):
            return float(text)
    return None


def _check_ranges(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            key = f"{section.name}.{f.name}"
            value = getattr(obj, f.name)
            if key in _CHOICES and value not in _CHOICES[key]:
                raise NMTError(f"config key '{key}' must be one of {', '.join(_CHOICES[key])}, got {value!r}")
            if key in _POSITIVE and value <= 0:
                raise NMTError(f"config key '{key}' must be > 0, got {value!r}")
            if key in _NON_NEGATIVE and value < 0:
                raise NMTError(f"config key '{key}' must be >= 0, got {value!r}")
            if key in _UNIT_INTERVAL and not 0.0 <= value < 1.0:
                keep = " (to keep the learning rate, set train.min_lr to train.lr)" if key == "train.lr_decay" else ""
                raise NMTError(f"config key '{key}' must be at least 0 and below 1, got {value!r}{keep}")
            if key in _AT_MOST and value > _AT_MOST[key]:
                raise NMTError(f"config key '{key}' must be at most {_AT_MOST[key]}, got {value!r}")
    if cfg.tokenizer.type == "bpe" and cfg.tokenizer.sample_alpha >= 1.0:  # every merge dropped: characters only
        raise NMTError(f"config key 'tokenizer.sample_alpha' is BPE's dropout rate: it must be below 1, got "
                       f"{cfg.tokenizer.sample_alpha!r}")
    if not MIN_CHARACTER_COVERAGE <= cfg.tokenizer.character_coverage <= 1.0:
        raise NMTError(f"config key 'tokenizer.character_coverage' must be between {MIN_CHARACTER_COVERAGE} and 1 "
                       f"(SentencePiece's range), got {cfg.tokenizer.character_coverage!r}")
    if 0 < cfg.tokenizer.input_sentence_size < SENTENCEPIECE_MIN_SAMPLE:
        raise NMTError(f"config key 'tokenizer.input_sentence_size' must be 0 (every sentence) or at least "
                       f"{SENTENCEPIECE_MIN_SAMPLE} (SentencePiece's range), got {cfg.tokenizer.input_sentence_size}")
    if cfg.tokenizer.vocab_size <= SPECIAL_PIECES:
        raise NMTError(f"config key 'tokenizer.vocab_size' must be more than the {SPECIAL_PIECES} special pieces "
                       f"(padding, unknown, start and end of sentence), got {cfg.tokenizer.vocab_size}")
    if cfg.decode.shortlist and cfg.decode.shortlist_frequent == cfg.decode.shortlist_per_source == 0:
        raise NMTError("config keys 'decode.shortlist_frequent' and 'decode.shortlist_per_source' are both 0: the "
                       "shortlist would hold no target piece (decode.shortlist=false: the whole vocabulary)")
    if cfg.model.tie_embeddings and cfg.model.out_dim != cfg.model.emb_dim:
        raise NMTError("config key 'model.tie_embeddings' needs model.out_dim == model.emb_dim")
    betas = [_float(b) for b in cfg.train.adam_betas]
    if len(betas) != 2 or not all(b is not None and 0.0 <= b < 1.0 for b in betas):
        raise NMTError(f"config key 'train.adam_betas' must be a list of two numbers in [0, 1), "
                       f"got {cfg.train.adam_betas!r}")
    cfg.train.adam_betas = betas


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from nested dicts; unknown keys and wrong types raise NMTError naming the key."""
    if not isinstance(raw, dict):
        raise NMTError("config must be a mapping of sections (data, tokenizer, model, train, decode)")
    cfg = Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name, values in raw.items():
        if name not in sections:
            raise NMTError(f"unknown config section '{name}' (known: {', '.join(sections)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise NMTError(f"config section '{name}' must be a mapping")
        obj = getattr(cfg, name)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise NMTError(f"unknown config key '{name}.{key}' (known: {', '.join(hints)})")
            setattr(obj, key, _coerce(f"{name}.{key}", value, hints[key]))
    _check_ranges(cfg)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the last silently, so a
    second `train:` section dropped every setting of the first. Checked on the document as written, before merge
    keys (<<) bring in entries that a mapping may override."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, set())
        return super().construct_document(node)


class _AmbiguousNumber(yaml.constructor.ConstructorError):
    """A number YAML 1.1 reads as another than it shows: valid YAML, but not what the writer meant."""


def _refuse_ambiguous(node: yaml.ScalarNode) -> None:
    text = node.value.replace("_", "")
    if re.fullmatch(r"[-+]?0[0-9]+", text) or ":" in text:
        raise _AmbiguousNumber(
            None, None, f"{node.value!r} is ambiguous: YAML 1.1 reads 010 as 8 (octal) and 1:30 as 90 (base 60); "
                        "write the number without leading zeros or colons", node.start_mark)


def _plain_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.1's int, refusing the forms that read as other numbers than they show."""
    _refuse_ambiguous(node)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _plain_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    """YAML 1.1's float, refusing base 60 (1:30.5 is 90.5)."""
    _refuse_ambiguous(node)
    return yaml.SafeLoader.construct_yaml_float(loader, node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _plain_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _plain_float)


def _check_unique_keys(node: yaml.Node, checked: set[int]) -> None:
    if id(node) in checked:  # an alias of a node already checked
        return
    checked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key.value!r} appears twice (first at line {first[key.tag, key.value] + 1})",
                        key.start_mark)
                first[key.tag, key.value] = key.start_mark.line
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        for child in node.value:
            for part in child if isinstance(child, tuple) else (child,):
                _check_unique_keys(part, checked)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary Python objects


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `section.key=value` from the command line: the value as YAML, but a text setting's as typed (YAML read
    `data.tgt_lang=no`, Norwegian, as false, `data.dir=123` as a number, and cut `runs/exp #2` at its comment),
    without the quotes of a value quoted whole, and not empty."""
    if "=" not in item:
        raise NMTError(f"override '{item}' must look like section.key=value")
    key, _, text = item.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise NMTError(f"override key '{key}' must look like section.key (e.g. train.lr)")
    if _declared(*path) is str:
        value = text.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]  # as typed inside: no YAML escapes (C:\temp\new kept its backslashes)
        if not value:
            raise NMTError(f"override '{item}' needs a value")
        return path, value
    try:
        value = _load_yaml(text)
    except _AmbiguousNumber as exc:
        raise NMTError(f"override '{item}': {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise NMTError(f"override '{item}': value is not valid YAML: {_yaml_problem(exc)}") from None
    return path, value


def _yaml_problem(exc: Exception) -> str:
    """A YAML parser's complaint in one line."""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    return "; ".join(part for part in parts if part) or " ".join(str(exc).split())


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file (or start from defaults when path is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise NMTError(f"config file {path} is a directory")
        if not path.is_file():
            raise NMTError(f"config file not found: {path}")
        try:
            raw = _load_yaml(path.read_text(encoding="utf-8"))
        except _AmbiguousNumber as exc:
            at = exc.problem_mark
            raise NMTError(f"config file {path}, line {at.line + 1}, column {at.column + 1}: {exc.problem}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise NMTError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}{where}") from None
        if raw is None:  # said, or an empty file showed only as a missing data/bible corpus
            log.warning("config file %s is empty: every setting is the default (data.dir %s)", path, DataConfig().dir)
            raw = {}
        if not isinstance(raw, dict):
            raise NMTError(f"config file {path} must hold a mapping of sections")
    return from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A copy of raw config dicts with `section.key=value` overrides set (only in `sections`, when given)."""
    if not isinstance(raw, dict):
        raise NMTError("config must be a mapping of sections (data, tokenizer, model, train, decode)")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        (section, key), value = parse_override(item)
        if sections is not None and section not in sections:
            raise NMTError(f"override '{item}': only {', '.join(s + '.*' for s in sections)} settings can change here")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise NMTError(f"config section '{section}' must be a mapping")
        raw[section][key] = value
    return raw


def _declared(section: str, key: str) -> Any:
    """The declared type of a config key (None for an unknown one: from_dict names it)."""
    obj = getattr(Config(), section, None)
    if obj is None or not dataclasses.is_dataclass(obj):
        return None
    return typing.get_type_hints(type(obj)).get(key)


def save_config(cfg: Config, path: str | Path) -> None:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
