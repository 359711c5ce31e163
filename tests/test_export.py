"""Model directories: export, identical output after loading, fp16, tied weights, the card, bad files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nmt.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints
from nmt.cli import main
from nmt.config import load_config
from nmt.corpus import prepare_files
from nmt.errors import NMTError
from nmt.export import _sessions, export_model, read_safetensors
from nmt.model import Seq2Seq
from nmt.tokenizer import Tokenizer, train_sentencepiece
from nmt.train import train
from nmt.translator import Translator

ROOT = Path(__file__).resolve().parent.parent
LINES = ["a b c d", "p o n m l", "e f g h i j k", "", "k"]


def outputs(translator: Translator) -> list[tuple[str, float | None]]:
    return [(r.text, r.score) for r in translator.translate(LINES, n_best=2)]


def card(model_dir: Path) -> dict:
    return json.loads((model_dir / "card.json").read_text(encoding="utf-8"))


def test_export_then_load_gives_identical_output(tiny_run, tiny_model_dir):
    run, exported = Translator.load(tiny_run), Translator.load(tiny_model_dir)
    assert outputs(exported) == outputs(run)
    assert exported.score(LINES, LINES) == run.score(LINES, LINES)


def test_model_directory_contents_and_card(tiny_run, tiny_model_dir):
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == [
        "card.json", "config.yaml", "model.safetensors", "shortlist.safetensors", "src.model", "tgt.model"]
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "rnnsearch-model-1"
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys() if "embed" in k)
    card = json.loads((tiny_model_dir / "card.json").read_text(encoding="utf-8"))
    assert card["languages"] == {"src": "src", "tgt": "tgt"}
    assert card["parameters"] == Translator.load(tiny_model_dir).info["parameters"]
    assert card["metrics"]["best_dev_bleu"] > 90 and card["metrics"]["steps"] > 0
    assert card["metrics"]["dev"]["dev_bleu"] == card["metrics"]["best_dev_bleu"]
    assert card["dtype"] == "float32" and card["checkpoint"] == "best.pt"
    assert card["rnnsearch_version"]
    training = card["training"]  # the tiny run: one session of train() inside pytest
    assert training["sessions"] == 1 and 0 < training["wall_seconds"] < 600
    assert training["precisions"] == ["fp32"]  # configs/tiny.yaml turns bfloat16 off
    assert len(training["commands"]) == 1 and training["hardware"]
    assert card["architecture"]["cell"] == "lstm"


def test_fp16_export_is_half_the_size_and_translates_alike(tiny_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(["export", str(tiny_run), str(out), "--fp16", "--checkpoint", "last"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    size, full = (out / "model.safetensors").stat().st_size, (tiny_model_dir / "model.safetensors").stat().st_size
    assert size < 0.55 * full
    card = json.loads((out / "card.json").read_text(encoding="utf-8"))
    assert card["dtype"] == "float16" and card["checkpoint"] == "last.pt"
    half = Translator.load(out)
    assert next(half.model.parameters()).dtype == torch.float32  # computed in fp32 on CPU
    texts = [r.text for r in half.translate(LINES)]
    expected = [r.text for r in Translator.load(tiny_model_dir).translate(LINES)]
    assert sum(a == b for a, b in zip(texts, expected, strict=True)) >= len(LINES) - 1


def test_tied_embeddings_are_stored_once_and_tied_again(tiny_run, tmp_path):
    run = tmp_path / "tied_run"
    run.mkdir()
    for name in ("src.model", "tgt.model"):
        shutil.copy(tiny_run / name, run / name)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.tie_embeddings=true", f"train.run_dir={run}"])
    vocab = {"src": len(Tokenizer(run / "src.model")), "tgt": len(Tokenizer(run / "tgt.model"))}
    torch.manual_seed(0)
    model = Seq2Seq(cfg.model, vocab["src"], vocab["tgt"])
    save_checkpoint(run / "best.pt", {"config": cfg.to_dict(), "model": model.state_dict(), "vocab": vocab,
                                      "position": {"step": 7, "epoch": 1, "best_bleu": 1.5}})
    out = export_model(run, tmp_path / "tied")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "decoder.embed.weight" in keys and "decoder.out.weight" not in keys
    loaded = Translator.load(out)
    assert loaded.model.decoder.out.weight is loaded.model.decoder.embed.weight
    assert outputs(loaded) == outputs(Translator.load(run))
    card = json.loads((out / "card.json").read_text(encoding="utf-8"))
    assert card["metrics"]["steps"] == 7 and card["metrics"]["best_dev_bleu"] == 1.5


def test_export_is_atomic_and_refuses_to_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "m"
    export_model(tiny_run, out)
    (out / "eval").mkdir()  # what the export did not write survives --force
    (out / "eval" / "notes.txt").write_text("mine", encoding="utf-8")
    (out / "card.json").write_text("{}", encoding="utf-8")
    assert main(["export", str(tiny_run), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tiny_run), str(out), "--force"]) == 0
    assert (out / "eval" / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert card(out)["checkpoint"] == "best.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left behind
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_tokenizers_the_checkpoint_was_not_trained_with_are_refused_even_at_the_same_size(
        tiny_run, tiny_data, tmp_path, capsys):
    # A copied-in tgt.model of the same size (another corpus, another model type) would load and translate
    # garbage: export, loading the run and resuming it all refuse it.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = load_config(run / "config.yaml").tokenizer
    other_type = dataclasses.replace(cfg, type="bpe" if cfg.type != "bpe" else "unigram")
    train_sentencepiece([tiny_data / "train.tgt"], tmp_path / "other", other_type)
    assert len(Tokenizer(tmp_path / "other.model")) == len(Tokenizer(run / "tgt.model"))
    shutil.copyfile(tmp_path / "other.model", run / "tgt.model")
    refusal = (f"was trained with other vocabularies than {run}/src.model and tgt.model (replaced since?): put back "
               "the tokenizers it was trained with")
    assert main(["export", str(run), str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == f"nmt export: error: best.pt {refusal}"
    assert not (tmp_path / "m").exists()
    with pytest.raises(NMTError, match=re.escape(f"{run / 'best.pt'} {refusal}")):
        Translator.load(run)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(NMTError, match=re.escape(f"{run / 'last.pt'} {refusal}")):
        train(load_config(run / "config.yaml", [f"train.run_dir={run}", "train.epochs=13"]), resume=True)
    assert (run / "last.pt").read_bytes() == before
    shutil.copyfile(tiny_run / "tgt.model", run / "tgt.model")
    state = load_checkpoint(run / "best.pt")
    del state["tokenizers_sha256"]  # a checkpoint from before the digest was kept: checked by sizes
    save_checkpoint(run / "best.pt", state)
    assert outputs(Translator.load(run)) == outputs(Translator.load(tiny_run))


def test_a_full_disk_is_one_line_and_leaves_an_earlier_export_as_it_was(tiny_run, tmp_path, capsys, monkeypatch):
    out = export_model(tiny_run, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("nmt.export.save_file", full)
    assert main(["export", str(tiny_run), str(out), "--force"]) == 2
    assert capsys.readouterr().err.strip() == (f"nmt export: error: cannot write {out} (no space left on the "
                                                "device); nothing there was changed")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_force_replaces_only_an_earlier_export(tiny_run, tmp_path, capsys):
    # --force used to delete whatever was at OUTDIR: a file, a directory of notes, the run itself or its parent.
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "sub" / "keep.txt").write_text("mine", encoding="utf-8")
    victim = tmp_path / "victim.txt"
    victim.write_text("mine", encoding="utf-8")
    for target, message in [(victim, "not an exported model"), (notes, "not an exported model"),
                            (tiny_run, "being exported"), (tiny_run.parent, "being exported")]:
        before = sorted(p.relative_to(target) for p in target.rglob("*")) if target.is_dir() else None
        assert main(["export", str(tiny_run), str(target), "--force"]) == 2
        assert message in capsys.readouterr().err
        assert main(["export", str(tiny_run), str(target)]) == 2  # without --force: not advised to add it
        assert message in capsys.readouterr().err
        assert (sorted(p.relative_to(target) for p in target.rglob("*")) if target.is_dir() else None) == before
    assert victim.read_text(encoding="utf-8") == "mine"
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tiny_run), str(tmp_path / "empty"), "--force"]) == 0


def test_a_run_whose_corpus_was_prepared_again_is_not_exported_as_if_it_trained_on_it(tiny_run, tiny_data, tmp_path,
                                                                                     capsys):
    data, run = shutil.copytree(tiny_data, tmp_path / "data"), shutil.copytree(tiny_run, tmp_path / "run")
    state = load_checkpoint(run / "best.pt")
    state["config"]["data"]["dir"] = str(data)
    save_checkpoint(run / "best.pt", state)
    lines = (data / "train.tgt").read_text(encoding="utf-8").splitlines()
    (data / "train.tgt").write_text("\n".join(["x y", *lines[1:]]) + "\n", encoding="utf-8")
    assert main(["export", str(run), str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{data} (the run's data.dir) holds other training pairs than best.pt was trained on (prepared again?): "
        "name the corpus it trained on with --data DIR, or the corpus to take the shortlist from")
    assert not (tmp_path / "m").exists()
    assert main(["export", str(run), str(tmp_path / "m"), "--data", str(tiny_data)]) == 0


def test_the_card_names_the_corpus_files_without_their_paths(tiny_run, tiny_data, tmp_path, caplog):
    prepared = tmp_path / "prepared"
    prepare_files(prepared, tiny_data / "train.src", tiny_data / "train.tgt")  # holds out dev and test from them
    caplog.clear()
    export_model(tiny_run, tmp_path / "same", data=tiny_data)
    assert "other training pairs" not in caplog.text
    sources = card(export_model(tiny_run, tmp_path / "m", data=prepared))["data"]["sources"]
    assert f"{prepared} holds other training pairs than best.pt was trained on" in caplog.text
    assert [sources[k]["path"] for k in ("src", "tgt")] == ["train.src", "train.tgt"]
    assert len(sources["src"]["sha256"]) == 64
    assert json.loads((prepared / "corpus.json").read_text("utf-8"))["sources"]["src"]["path"] == str(
        (tiny_data / "train.src").resolve())  # the corpus's own record keeps where it came from


def test_force_through_a_link_or_beside_old_copies_keeps_everything_of_the_users(tiny_run, tmp_path, capsys,
                                                                                 monkeypatch):
    models = tmp_path / "models"
    v3 = export_model(tiny_run, models / "v3")
    (v3 / "NOTES.md").write_text("mine", encoding="utf-8")
    (models / "current").symlink_to("v3")
    (models / ".v3.old").mkdir()  # a name the replacement once used for the earlier export, now the user's
    (models / ".v3.old" / "precious").write_text("mine", encoding="utf-8")
    assert main(["export", str(tiny_run), str(models / "current"), "--force", "--checkpoint", "last"]) == 0
    assert (models / "current").is_symlink() and card(models / "current")["checkpoint"] == "last.pt"
    assert (v3 / "NOTES.md").read_text(encoding="utf-8") == "mine"
    assert (models / ".v3.old" / "precious").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in models.iterdir()) == [".v3.old", "current", "v3"]  # no .NAME.old.XXXX left
    (models / "dangling").symlink_to("v9")
    for force in ([], ["--force"]):
        assert main(["export", str(tiny_run), str(models / "dangling"), *force]) == 2
        assert "is a link that leads nowhere" in capsys.readouterr().err and not (models / "v9").exists()
    monkeypatch.chdir(v3)  # `nmt export RUN . --force` from inside the export
    assert main(["export", str(tiny_run), ".", "--force"]) == 2
    assert "is (or holds) the current directory" in capsys.readouterr().err
    assert (v3 / "NOTES.md").is_file() and card(v3)["checkpoint"] == "last.pt"


def test_a_hand_edited_card_does_not_stop_the_model_loading(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (model / "card.json").write_text(json.dumps({**card(model), "metrics": "see notes"}), encoding="utf-8")
    loaded = Translator.load(model)
    assert loaded.step is None and outputs(loaded) == outputs(Translator.load(tiny_model_dir))


def test_export_card_refuses_a_report_that_names_no_weights(tiny_run, tmp_path, caplog):
    report = tmp_path / "test.json"
    scores = {"bleu": {"score": 42.0, "signature": "nrefs:1"}}  # a report's, as nmt evaluate writes them
    for digest in (["ab"], "A" * 64, 7):  # edited by hand
        report.write_text(json.dumps({"metrics": scores, "model": "m", "weights_sha256": digest}))
        with pytest.raises(NMTError, match=r"its weights_sha256 is not a SHA-256 digest \(.*; edited\?\)"):
            export_model(tiny_run, tmp_path / "m0", report=report)
    report.write_text(json.dumps({"metrics": "oops", "model": "m", "weights_sha256": "a" * 64}), encoding="utf-8")
    with pytest.raises(NMTError, match="not an `nmt evaluate` report"):
        export_model(tiny_run, tmp_path / "m0", report=report)
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "test.json").write_text('{"n": 3, "metr', encoding="utf-8")  # cut short: not in the way
    assert card(export_model(run, tmp_path / "m0"))["evaluation"] is None
    assert "is not a readable JSON file" in caplog.text and "the card carries no test scores" in caplog.text
    report.write_text(json.dumps({"n": 3, "metrics": scores, "model": "m"}), encoding="utf-8")
    with pytest.raises(NMTError, match="does not say which weights it scored"):
        export_model(tiny_run, tmp_path / "m1", report=report)
    report.write_text(json.dumps({"n": 3, "metrics": scores, "hyp": "h"}), encoding="utf-8")
    with pytest.raises(NMTError, match="translations from a file"):
        export_model(tiny_run, tmp_path / "m2", report=report)
    report.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(NMTError, match="not an `nmt evaluate` report"):
        export_model(tiny_run, tmp_path / "m3", report=report)
    # Another export's card.json: its training metrics (steps, dev BLEU) went into the card as test scores.
    report.write_text(json.dumps({"metrics": {"steps": 2, "best_dev_bleu": 1.0, "dev": {"bleu": 1.0}},
                                  "weights_sha256": "a" * 64}), encoding="utf-8")
    with pytest.raises(NMTError, match="not an `nmt evaluate` report"):
        export_model(tiny_run, tmp_path / "m3", report=report)
    with pytest.raises(NMTError, match="evaluation report not found"):
        export_model(tiny_run, tmp_path / "m4", report=tmp_path / "missing.json")
    with pytest.raises(NMTError, match="is a directory, not an `nmt evaluate` report"):
        export_model(tiny_run, tmp_path / "m4", report=tmp_path)
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 5))


def test_the_card_credits_only_an_evaluation_of_the_weights_it_exports(tiny_run, tmp_path, caplog):
    run = shutil.copytree(tiny_run, tmp_path / "run")  # nmt evaluate writes into it
    assert main(["evaluate", str(run), "--split", "test"]) == 0
    report = json.loads((run / "eval" / "test.json").read_text(encoding="utf-8"))
    best = Translator.load(run)
    assert report["weights_sha256"] == best.weights_sha256 and report["step"] == best.step
    assert best.step == load_checkpoint(run / "best.pt")["position"]["step"]

    exported = card(export_model(run, tmp_path / "best"))  # RUN/eval/test.json scored these weights
    assert exported["evaluation"]["metrics"] == report["metrics"]
    assert exported["evaluation"]["src"] == "data/test.src"  # no local paths on a card: report["src"] is absolute
    assert exported["weights_sha256"] == report["weights_sha256"] == Translator.load(tmp_path / "best").weights_sha256
    half = card(export_model(run, tmp_path / "half", fp16=True))  # the same weights, stored in fp16
    assert half["evaluation"]["metrics"] == report["metrics"]
    assert half["weights_sha256"] != report["weights_sha256"]
    assert half["weights_sha256"] == Translator.load(tmp_path / "half").weights_sha256

    caplog.clear()
    averaged = card(export_model(run, tmp_path / "avg", average=2))  # other weights: not credited
    assert averaged["evaluation"] is None
    assert "scored other weights" in caplog.text and "no test scores" in caplog.text
    # It said "(float32, step 270): those of RUN at step 270", as if the same weights: an average is named as such.
    stale = (rf"scored other weights than this export's \(float32, average of step-\d+\.pt, step-\d+\.pt\): those "
             rf"of {run} at step {best.step}\.")
    with pytest.raises(NMTError, match=stale):
        export_model(run, tmp_path / "avg2", average=2, report=run / "eval" / "test.json")
    assert main(["evaluate", str(tmp_path / "avg"), "--split", "test"]) == 0
    again = card(export_model(run, tmp_path / "avg2", average=2, report=tmp_path / "avg" / "eval" / "test.json"))
    assert again["evaluation"]["weights_sha256"] == averaged["weights_sha256"]

    assert main(["evaluate", str(run / "last.pt"), "--split", "test"]) == 0  # to RUN/eval/last/, which export reads
    last = card(export_model(run, tmp_path / "last", checkpoint="last"))
    assert last["evaluation"]["weights_sha256"] == last["weights_sha256"]
    # int8 decodes the same weights (quantized as they load): its report is credited, and says it was int8.
    for int8 in (True, False):
        report = tmp_path / f"int8-{int8}.json"
        assert main(["evaluate", str(run), "--split", "test", "--int8" if int8 else "--no-int8", "--report",
                     str(report)]) == 0
        scored = card(export_model(run, tmp_path / f"int8-{int8}", report=report))["evaluation"]
        assert (scored["int8"], scored["decode"]["int8"]) == (int8, int8)


def test_export_averages_the_last_kept_step_checkpoints(tiny_run, tmp_path, capsys):
    kept = step_checkpoints(tiny_run)
    steps = [load_checkpoint(p)["position"]["step"] for p in kept]
    assert len(kept) == 3 and steps == sorted(steps) and steps[-1] == load_checkpoint(tiny_run / "last.pt")[
        "position"]["step"]  # the oldest validations were pruned, the newest kept
    assert main(["export", str(tiny_run), str(tmp_path / "avg"), "--average", "2"]) == 0
    weights = read_safetensors(tmp_path / "avg" / "model.safetensors")
    a, b = (load_checkpoint(p)["model"] for p in kept[-2:])
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
    assert not torch.equal(weights["encoder.rnns.0.weight_hh_l0"], b["encoder.rnns.0.weight_hh_l0"])
    card = json.loads((tmp_path / "avg" / "card.json").read_text("utf-8"))
    assert card["checkpoint"] == f"average of {kept[-2].name}, {kept[-1].name}"
    assert card["metrics"]["steps"] == steps[-1]
    # Update steps[-1]'s dev scores were given as the average's, which nothing measured.
    assert card["metrics"]["averaged_steps"] == steps[-2:] and "dev" not in card["metrics"]
    Translator.load(tmp_path / "avg").translate(LINES)
    source = tmp_path / "s.txt"
    source.write_text("a b c\n", encoding="utf-8")
    assert main(["evaluate", str(tmp_path / "avg"), "--src", str(source), "--ref", str(source)]) == 0
    report = json.loads((tmp_path / "avg" / "eval" / "s.json").read_text("utf-8"))
    assert report["averaged_steps"] == steps[-2:] and report["model_path"] == str((tmp_path / "avg").resolve())
    capsys.readouterr()

    assert main(["export", str(tiny_run), str(tmp_path / "four"), "--average", "4"]) == 2
    assert "holds 3 kept step checkpoints; train with train.keep_checkpoints >= 4" in capsys.readouterr().err
    for n in ("-1", "0"):  # 0 exported best.pt without a word
        with pytest.raises(SystemExit) as refused:  # by the argument parser
            main(["export", str(tiny_run), str(tmp_path / "neg"), "--average", n])
        assert refused.value.code == 2
        assert f"argument --average: must be an integer >= 1, got {n}" in capsys.readouterr().err
    assert main(["export", str(tiny_run / "best.pt"), str(tmp_path / "file")]) == 2  # said "run directory not found"
    assert "best.pt is a file: give the run directory that holds it" in capsys.readouterr().err
    assert main(["export", str(tiny_run), str(tmp_path / "both"), "--average", "2", "--checkpoint", "last"]) == 2
    assert "not --checkpoint: give one of them" in capsys.readouterr().err  # --checkpoint was ignored
    assert not (tmp_path / "four").exists() and not (tmp_path / "neg").exists()

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_run, foreign)
    original = load_checkpoint(step_checkpoints(foreign)[0])

    def changed(key: str, value: object, message: str) -> None:
        save_checkpoint(step_checkpoints(foreign)[0], {**original, key: value})
        assert main(["export", str(foreign), str(tmp_path / "f"), "--average", "3"]) == 2
        assert message in capsys.readouterr().err

    weights = dict(original["model"])
    changed("model", {k: v for k, v in weights.items() if k != "decoder.readout.bias"}, "they hold different models")
    # A tensor of another size was a RuntimeError out of the sum.
    weights["decoder.readout.bias"] = torch.zeros(weights["decoder.readout.bias"].numel() + 1)
    changed("model", weights, "they hold different models")
    changed("tokenizers_sha256", "0" * 64, "they were trained with other tokenizers (of different runs)")
    changed("data_sha256", "0" * 64, "they were trained on other pairs (of different runs)")


def test_export_sets_decoding_defaults_and_nothing_else(tiny_run, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["export", str(tiny_run), str(out), "--set", "decode.length_penalty=0.6",
                 "--set", "decode.no_repeat_ngram=3"]) == 0
    decode = load_config(out / "config.yaml").decode
    assert (decode.length_penalty, decode.no_repeat_ngram, decode.beam_size) == (0.6, 3, 5)
    assert Translator.load(out).cfg.decode.length_penalty == 0.6
    for item, message in [("train.lr=1", "only decode.* settings can change here"),
                          ("decode.beam=3", "unknown config key 'decode.beam'"),
                          ("decode.beam_size=0", "decode.beam_size")]:
        assert main(["export", str(tiny_run), str(tmp_path / "bad"), "--set", item]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable safetensors file"),
    ("garbage", "not a readable safetensors file"),
    ("foreign", "not an rnnsearch model"),
    ("wrong_keys", "does not hold this model's weights"),
    ("wrong_shape", "does not fit its config"),
    ("no_config", "config file not found"),
    ("bad_card", "card.json is not valid JSON"),
    # It loaded, said it was ready, and every translation was a 500.
    ("flipped", "does not hold the weights its card.json describes"),
])
def test_damaged_model_directories_are_clear_errors(model_copy, damage, message, capsys):
    weights = model_copy / "model.safetensors"
    meta = {"format": "rnnsearch-model-1"}
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "foreign":
        save_file({"w": torch.zeros(2)}, str(weights))
    elif damage == "wrong_keys":
        save_file({"w": torch.zeros(2)}, str(weights), metadata=meta)
    elif damage == "wrong_shape":
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["decoder.out.bias"] = torch.zeros(3)
        save_file(tensors, str(weights), metadata=meta)
    elif damage == "flipped":
        data = bytearray(weights.read_bytes())
        data[-2000:-1000] = b"\xff" * 1000
        weights.write_bytes(bytes(data))
    elif damage == "no_config":
        (model_copy / "config.yaml").unlink()
    else:
        (model_copy / "card.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(NMTError, match=message):
        Translator.load(model_copy)
    assert main(["evaluate", str(model_copy), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_file_this_user_cannot_read_is_named_in_one_line(model_copy, monkeypatch, capsys):
    # A model volume of another user (umask 077, a container's uid 1000) was a traceback.
    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path / "card.json"))

    monkeypatch.setattr("nmt.translator.read_card", unreadable)
    assert main(["evaluate", str(model_copy), "--split", "test"]) == 2
    assert capsys.readouterr().err.strip() == (f"nmt evaluate: error: {model_copy / 'card.json'}: permission denied "
                                               f"(this process runs as uid {os.getuid()})")


class Payload:
    """Unpickling this would run code (creating a file): weights-only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_unpickles_code(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "rnnsearch-checkpoint-1", "config": Payload(marker)}, run / "best.pt")
    with pytest.raises(NMTError, match="not a readable rnnsearch checkpoint"):
        Translator.load(run)
    with pytest.raises(NMTError, match="not a readable rnnsearch checkpoint"):
        export_model(run, tmp_path / "out")
    assert not marker.exists()


def test_a_resume_that_trained_nothing_is_no_session_of_the_card():
    # `nmt train --resume` on a run at its train.max_steps logs a session that starts and ends at the same step: the
    # card listed its command and counted it.
    records = [{"type": "session", "event": "start", "step": 0, "time": 0.0, "command": "nmt train c.yaml"},
               {"type": "train", "step": 300, "time": 60.0},
               {"type": "session", "event": "end", "step": 300, "time": 70.0},
               {"type": "session", "event": "start", "step": 300, "time": 100.0,
                "command": "nmt train c.yaml --resume"},
               {"type": "session", "event": "end", "step": 300, "time": 103.0}]
    assert _sessions(records) == {"commands": ["nmt train c.yaml"], "hardware": [], "precisions": [], "sessions": 1,
                                  "wall_seconds": 70, "wall_hours": 0.02}
    # One that validated (what a stop had left undone) or trained did work, and counts.
    validated = [*records[:4], {"type": "valid", "step": 300, "time": 110.0}, {**records[4], "time": 111.0}]
    assert _sessions(validated)["sessions"] == 2
    # So does one interrupted at the step it began (a stop abandoned the validation it owed: minutes spent), and one
    # whose records name no step.
    interrupted = [*records[:4], {**records[4], "reason": "interrupted", "time": 700.0}]
    assert (_sessions(interrupted)["sessions"], _sessions(interrupted)["wall_seconds"]) == (2, 670)
    stepless = [{k: v for k, v in r.items() if k != "step"} for r in records]
    assert _sessions(stepless)["sessions"] == 2


def test_the_cards_training_commands_are_in_the_order_they_ran():
    # They were sorted: a run resumed with --set train.lr=0.001, then 0.0005, read as the reverse recipe.
    records = [{"type": "session", "event": "start", "time": t, "command": c, "hardware": "cpu"}
               for t, c in ((1, "nmt train c.yaml"), (2, "nmt train c.yaml --resume --set train.lr=0.001"),
                            (3, "nmt train c.yaml --resume --set train.lr=0.0005"),
                            (4, "nmt train c.yaml --resume --set train.lr=0.001"))]
    assert _sessions(records)["commands"] == ["nmt train c.yaml", "nmt train c.yaml --resume --set train.lr=0.001",
                                              "nmt train c.yaml --resume --set train.lr=0.0005"]
