"""Config loading: defaults, validation messages that name the key, overrides, and the CLI's exit status."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt.cli import main
from nmt.config import Config, from_dict, load_config, save_config
from nmt.errors import NMTError

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
KEYS = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory())]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_defaults_and_overrides() -> None:
    cfg = load_config(TINY, ["train.lr=1", "model.cell=gru", "train.adam_betas=[0.8, 0.9]", "data.dir=x y"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.cell == "gru" and cfg.train.adam_betas == [0.8, 0.9] and cfg.data.dir == "x y"
    assert load_config(None).model == Config().model


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["model.layers=2", "tokenizer.joint=true"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(("override", "key"), [
    ("model.cell=transformer", "model.cell"),
    ("model.attention=luong", "model.attention"),
    ("tokenizer.type=word", "tokenizer.type"),
    ("train.device=tpu", "train.device"),
    ("model.dropout=1.5", "model.dropout"),
    ("train.label_smoothing=-0.1", "train.label_smoothing"),
    ("train.label_smoothing=1", "train.label_smoothing"),  # uniform targets: trained on, nothing learnt
    ("model.dropout=1.0", "model.dropout"),
    ("train.lr_decay=1", "train.lr_decay"),  # torch's scheduler raised at the start of training
    ("train.lr=-0.001", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("tokenizer.character_coverage=0.97", "tokenizer.character_coverage"),
    ("train.batch_tokens=0", "train.batch_tokens"),
    ("model.layers=0", "model.layers"),
    ("train.accum_steps=0", "train.accum_steps"),
    ("model.tie_embeddings=true", "model.tie_embeddings"),
    ("train.adam_betas=[0.9]", "train.adam_betas"),
    ("train.adam_betas=[0.9,1.5]", "train.adam_betas"),
    ("train.adam_betas=[a,b]", "train.adam_betas"),
    ("decode.max_len_a=1e9", "decode.max_len_a"),
    ("decode.max_len_b=100000", "decode.max_len_b"),
    ("decode.length_penalty=11", "decode.length_penalty"),
    ("decode.shortlist_per_source=51", "decode.shortlist_per_source"),
    ("tokenizer.input_sentence_size=-5", "tokenizer.input_sentence_size"),
    ("tokenizer.input_sentence_size=100", "tokenizer.input_sentence_size"),
])
def test_bad_value_names_the_key(override: str, key: str) -> None:
    with pytest.raises(NMTError, match=f"'{key}'"):
        load_config(TINY, [override, "model.out_dim=48"])


def test_a_shortlist_of_no_target_piece_is_refused() -> None:
    empty = ["decode.shortlist_frequent=0", "decode.shortlist_per_source=0"]
    with pytest.raises(NMTError, match="'decode.shortlist_frequent' and 'decode.shortlist_per_source' are both 0"):
        load_config(TINY, empty)
    assert not load_config(TINY, [*empty, "decode.shortlist=false"]).decode.shortlist


@pytest.mark.parametrize(("override", "key", "type_name"), [
    ("model.emb_dim=big", "model.emb_dim", "int"),
    ("model.emb_dim=3.5", "model.emb_dim", "int"),
    ("model.emb_dim=true", "model.emb_dim", "int"),
    ("train.amp=1", "train.amp", "bool"),
    ("train.lr=fast", "train.lr", "float"),
    ("train.adam_betas=0.9", "train.adam_betas", "list"),
])
def test_wrong_type_names_the_key_and_type(override: str, key: str, type_name: str) -> None:
    with pytest.raises(NMTError, match=f"'{key}' must be of type {type_name}"):
        load_config(TINY, [override])


def test_a_text_key_takes_the_text_as_typed_after_set(tmp_path: Path) -> None:
    # YAML read Norwegian's code as false, a directory named 123 as a number and one with ": " as a mapping.
    cfg = load_config(TINY, ["data.tgt_lang=no", "data.src_lang=off", "data.dir=123", "train.run_dir=runs/my data: v1"])
    assert (cfg.data.tgt_lang, cfg.data.src_lang, cfg.data.dir, cfg.train.run_dir) == ("no", "off", "123",
                                                                                     "runs/my data: v1")
    assert load_config(TINY, ['data.tgt_lang="nb"']).data.tgt_lang == "nb"  # quoted whole: unquoted, as before
    # Nor is a text cut at what YAML takes for a comment, or refused for what it takes for syntax.
    cfg = load_config(TINY, ["train.run_dir=runs/exp #2", "data.dir=@corpora/a: b: c", "data.src_lang='es'"])
    assert (cfg.train.run_dir, cfg.data.dir, cfg.data.src_lang) == ("runs/exp #2", "@corpora/a: b: c", "es")
    quoted = load_config(TINY, ['data.dir="C:\\temp\\new"', 'train.run_dir="a"b"'])
    assert (quoted.data.dir, quoted.train.run_dir) == ("C:\\temp\\new", 'a"b')  # no YAML escapes: \t was a tab
    for empty in ("data.dir=", "data.dir= ", "train.run_dir=''", 'train.run_dir=""'):  # '' trained into the cwd
        with pytest.raises(NMTError, match=f"override '{re.escape(empty)}' needs a value"):
            load_config(TINY, [empty])
    (tmp_path / "c.yaml").write_text("data:\n  tgt_lang: no\n", encoding="utf-8")  # a file is read as YAML
    with pytest.raises(NMTError, match="'data.tgt_lang' must be of type str, got False: quote the value"):
        load_config(tmp_path / "c.yaml")
    assert load_config(None, ["data.tgt_lang=no"]).data.tgt_lang == "no"
    (tmp_path / "c.yaml").write_text("data:\n  dir:\n", encoding="utf-8")
    with pytest.raises(NMTError, match="config key 'data.dir' has no value: give it one"):
        load_config(tmp_path / "c.yaml")


def test_unknown_keys_and_sections() -> None:
    with pytest.raises(NMTError, match="unknown config key 'model.colour'"):
        load_config(TINY, ["model.colour=red"])
    with pytest.raises(NMTError, match="unknown config section 'optimizer'"):
        from_dict({"optimizer": {"lr": 1}})
    with pytest.raises(NMTError, match="section 'model' must be a mapping"):
        from_dict({"model": ["lstm"]})


def test_exponent_notation_is_a_float(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 (no dot before the exponent) as a string: `--set train.lr=1e-4` was refused.
    assert load_config(TINY, ["train.lr=1e-4", "train.min_lr=1E-6"]).train.lr == 1e-4
    (tmp_path / "c.yaml").write_text("train:\n  lr: 5e-4\n  min_lr: +2e-6\n", encoding="utf-8")
    assert (load_config(tmp_path / "c.yaml").train.lr, load_config(tmp_path / "c.yaml").train.min_lr) == (5e-4, 2e-6)
    for bad in ("1e", "fast"):
        with pytest.raises(NMTError, match="'train.lr' must be of type float"):
            load_config(TINY, [f"train.lr={bad}"])


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", ".inf", "-.Inf", "Infinity"])
def test_nan_and_infinity_are_refused_in_files_and_overrides(value: str, tmp_path: Path) -> None:
    # NaN slipped past every range check (all comparisons false) and failed later in a traceback, or not at all.
    with pytest.raises(NMTError, match="config key 'train.lr' must be a finite number, got"):
        load_config(TINY, [f"train.lr={value}"])
    (tmp_path / "c.yaml").write_text(f"train:\n  clip_norm: {value}\n", encoding="utf-8")
    with pytest.raises(NMTError, match="config key 'train.clip_norm' must be a finite number"):
        load_config(tmp_path / "c.yaml")


def test_adam_betas_are_read_as_numbers() -> None:
    assert load_config(TINY, ["train.adam_betas=[0, 9e-1]"]).train.adam_betas == [0.0, 0.9]


@pytest.mark.parametrize(("override", "message"), [
    ("model.cell", "must look like section.key=value"),
    ("cell=gru", "must look like section.key"),
    ("model.cell.kind=gru", "must look like section.key"),
    ("=gru", "must look like section.key"),
    ("train.lr=[0.1", "not valid YAML"),
    ("model.cell=[gru", "model.cell"),  # a text setting takes the text: no cell is called that
])
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(NMTError, match=message) as error:
        load_config(TINY, [override])
    assert "\n" not in str(error.value)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(NMTError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(NMTError, match="not valid YAML") as error:
        load_config(bad)
    assert "\n" not in str(error.value) and "at line 2, column 1" in str(error.value)  # one line, where
    bad.write_text("- a list\n")
    with pytest.raises(NMTError, match="must hold a mapping"):
        load_config(bad)
    bad.write_text("model:\n  cell: gru\n  dropout: 2\n")
    with pytest.raises(NMTError, match="'model.dropout'"):
        load_config(bad)
    with pytest.raises(NMTError, match=f"config file {tmp_path} is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("text, message", [
    # PyYAML keeps the last of a repeated key: a second train: section silently dropped the first one's settings.
    ("train:\n  lr: 0.1\n  seed: 3\nmodel:\n  emb_dim: 8\ntrain:\n  lr: 0.2\n",
     "key 'train' appears twice (first at line 1) at line 6, column 1"),
    ("model:\n  cell: gru\n  cell: lstm\n", "key 'cell' appears twice (first at line 2) at line 3, column 3"),
])
def test_a_key_given_twice_is_an_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(NMTError, match=re.escape(f"config file {path} is not valid YAML: {message}")):
        load_config(path)
    merged = tmp_path / "merge.yaml"  # what a merge key brings in may still be overridden
    merged.write_text("train:\n  <<: {lr: 0.1, seed: 3}\n  lr: 0.2\n")
    assert (load_config(merged).train.lr, load_config(merged).train.seed) == (0.2, 3)
    # A merge of a mapping that merges another, used before its own turn: flattened in place, it looked doubled.
    merged.write_text("x: &c {lr: 0.1, seed: 3}\ny:\n  t: &m {<<: *c, lr: 0.2}\ntrain: {<<: *m}\n")
    with pytest.raises(NMTError, match="unknown config section 'x'"):
        load_config(merged)


@pytest.mark.parametrize(("key", "text"), [("epochs", "010"), ("epochs", "-007"), ("epochs", "1:30"),
                                           ("epochs", "0_10"), ("lr", "1:30.5"), ("lr", "-0:30.0")])
def test_numbers_yaml_11_reads_as_others_are_refused(tmp_path: Path, key: str, text: str) -> None:
    # `epochs: 010` trained 8 epochs (YAML 1.1's octal), `1:30` was 90 and `lr: 1:30.5` 90.5 (base 60).
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  {key}: {text}\n")
    message = f"{text!r} is ambiguous: YAML 1.1 reads 010 as 8 (octal) and 1:30 as 90 (base 60); write the number"
    with pytest.raises(NMTError, match=re.escape(f"config file {path}, line 2, column {len(key) + 5}: {message}")):
        load_config(path)
    with pytest.raises(NMTError, match=re.escape(f"override 'train.{key}={text}': {message}")):
        load_config(None, [f"train.{key}={text}"])
    assert load_config(None, ["train.epochs=10", "train.max_steps=0", "train.batch_tokens=4_096"]).train.epochs == 10
    assert load_config(None, ["train.lr=0.5", "train.label_smoothing=0.10"]).train.lr == 0.5


def test_cli_reports_a_bad_value_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(TINY), "--set", "model.cell=transformer"]) == 2
    err = capsys.readouterr().err
    assert "model.cell" in err and "lstm, gru" in err and "Traceback" not in err
    assert main(["train", str(TINY), "--set", "train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(KEYS), value=st.one_of(st.text(max_size=12), st.integers(), st.floats(),
                                                    st.booleans(), st.lists(st.integers(), max_size=3)))
def test_any_override_gives_a_config_or_a_clear_error(key: str, value: object) -> None:
    """Whatever a user types after --set, they get a valid Config or an NMTError (never a traceback)."""
    try:
        load_config(TINY, [f"{key}={value}"])
    except NMTError as exc:
        assert str(exc)


def test_an_empty_config_file_is_said_to_set_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # It trained on every default, which showed only as "corpus file not found: data/bible/train.src".
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert load_config(empty) == from_dict({})
    assert f"config file {empty} is empty: every setting is the default (data.dir data/bible)" in caplog.text


def test_bpe_dropout_below_one() -> None:
    # tokenizer.sample_alpha=2 with BPE trained on single characters (every merge dropped), without a word.
    with pytest.raises(NMTError, match="'tokenizer.sample_alpha' is BPE's dropout rate: it must be below 1, got 1.0"):
        load_config(None, ["tokenizer.type=bpe", "tokenizer.sample_alpha=1"])
    assert load_config(None, ["tokenizer.type=bpe", "tokenizer.sample_alpha=0.1"]).tokenizer.sample_alpha == 0.1
    assert load_config(None, ["tokenizer.sample_alpha=2"]).tokenizer.sample_alpha == 2.0  # unigram's smoothing
