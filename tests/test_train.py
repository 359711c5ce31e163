"""Training: a tiny model learns a task, exact resume, SIGTERM, run-directory safety, metrics and plots."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import nmt.device
import nmt.onednn
import nmt.run_dir
import nmt.train
import nmt.translator
from nmt.checkpoint import load_checkpoint, step_checkpoint_path
from nmt.cli import main
from nmt.config import Config, from_dict, load_config
from nmt.errors import NMTError
from nmt.export import _sessions
from nmt.model import Seq2Seq
from nmt.run_log import append_record, current, read_records, this_run
from nmt.search import search_ids
from nmt.tokenizer import Tokenizer
from nmt.train import Trainer, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# Dropout and label smoothing on, so an exact resume must also restore the RNG; a few batches per epoch, so the
# runs below cross epoch boundaries; validation every 4 updates without BLEU, to stay fast.
RESUME_SETTINGS = ["model.dropout=0.2", "train.label_smoothing=0.1", "train.valid_every=4", "train.valid_bleu=false",
                   "train.log_every=1", "train.epochs=1000"]
TOTAL_STEPS = 40


def small_corpus(out: Path, n_train: int = 300, seed: int = 0) -> Path:
    """A reverse-the-letters corpus small enough for a few batches per epoch."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", 30)):
        src = [" ".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9))) for _ in range(n)]
        (out / f"{split}.src").write_text("".join(s + "\n" for s in src), encoding="utf-8")
        (out / f"{split}.tgt").write_text("".join(" ".join(reversed(s.split())) + "\n" for s in src),
                                          encoding="utf-8")
    return out


def tiny_config(data: Path, run_dir: Path, *overrides: str) -> Config:
    return load_config(TINY, [f"data.dir={data}", f"train.run_dir={run_dir}", *overrides])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_run(corpus: Path) -> Path:
    """An uninterrupted run of TOTAL_STEPS updates that the resumed runs must match bit for bit."""
    run_dir = corpus.parent / "reference"
    result = train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, f"train.max_steps={TOTAL_STEPS}"))
    assert result == {"step": TOTAL_STEPS, "best_bleu": -1.0, "reason": "max steps", "signal": 0,
                      "main": True}
    return run_dir


def exact_match(run_dir: Path, data: Path) -> float:
    """Fraction of test sentences the run's best checkpoint translates exactly (greedy)."""
    state = load_checkpoint(run_dir / "best.pt")
    cfg = from_dict(state["config"])
    src_tok, tgt_tok = Tokenizer(run_dir / "src.model"), Tokenizer(run_dir / "tgt.model")
    model = Seq2Seq(cfg.model, len(src_tok), len(tgt_tok))
    model.load_state_dict(state["model"])
    src = (data / "test.src").read_text(encoding="utf-8").splitlines()
    refs = (data / "test.tgt").read_text(encoding="utf-8").splitlines()
    hyps = search_ids(model, src_tok.encode_batch(src), 2000, torch.device("cpu"), beam_size=1)
    return sum(tgt_tok.decode(h[0].tokens) == r for h, r in zip(hyps, refs, strict=True)) / len(refs)


def test_tiny_model_learns_to_reverse(tiny_run: Path, tiny_data: Path) -> None:
    assert exact_match(tiny_run, tiny_data) >= 0.95


def test_a_sampled_softmax_also_learns_to_reverse(tiny_data: Path, tmp_path: Path) -> None:
    # 17 of the 37 target pieces are targets in every batch, 4 of the other 20 are drawn: decoding over the
    # whole vocabulary must not pick pieces that training saw only now and then.
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_data, run_dir, "train.sampled_softmax=4", "train.epochs=12"))
    assert exact_match(run_dir, tiny_data) >= 0.95


def test_metrics_lines(tiny_run: Path) -> None:
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if r["type"] == "train"]
    valid = [r for r in records if r["type"] == "valid"]
    assert [r["epoch"] for r in valid] == list(range(1, 13))  # valid_every 0: once after each epoch
    assert all(a["step"] < b["step"] for a, b in zip(valid, valid[1:], strict=False))
    assert {"loss", "nll", "ppl", "lr", "tok_s", "epoch"} <= train_lines[0].keys()
    assert {"dev_loss", "dev_ppl", "dev_bleu", "lr"} <= valid[0].keys()
    assert valid[-1]["dev_bleu"] > 90 and valid[-1]["dev_loss"] < train_lines[0]["nll"]
    best = load_checkpoint(tiny_run / "best.pt")
    assert "optimizer" not in best and "optimizer" in load_checkpoint(tiny_run / "last.pt")


@pytest.mark.parametrize("extra", [(), ("train.sampled_softmax=4",), ("train.amp_cpu=true",)],
                         ids=["exact", "sampled-softmax", "bf16"])
def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(corpus: Path, reference_run: Path,
                                                                   tmp_path: Path, extra: tuple[str, ...],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nmt.device, "cpu_flags", lambda: {"avx512_bf16"})  # bfloat16 even where the CPU lacks it
    settings = [*RESUME_SETTINGS, *extra]
    if extra:  # the sampled softmax draws from the RNG that the checkpoint must restore
        reference_run = tmp_path / "reference"
        train(tiny_config(corpus, reference_run, *settings, f"train.max_steps={TOTAL_STEPS}"))
    run_dir = tmp_path / "run"
    first = train(tiny_config(corpus, run_dir, *settings, "train.max_steps=8"))
    assert first["step"] == 8 and first["reason"] == "max steps"
    second = train(tiny_config(corpus, run_dir, *settings, f"train.max_steps={TOTAL_STEPS}"), resume=True)
    assert second["step"] == TOTAL_STEPS
    assert_same_weights(weights(run_dir), weights(reference_run))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"valid"' in line]
    assert steps == list(range(4, TOTAL_STEPS + 1, 4))  # resuming did not validate step 8 again


@pytest.mark.parametrize("during", ["validate", "update"])
def test_a_signal_during_or_before_validation_leaves_it_for_the_resumed_run(
        during: str, corpus: Path, reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Ctrl-C waited for the validation under way, or due after the update, to end (minutes on a large dev set).
    method = getattr(Trainer, during)
    signal_at = 8 if during == "validate" else 7  # the update of step 8 runs at pos.step 7

    def interrupted(self: Trainer, *args: Any) -> Any:
        if self.pos.step == signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        return method(self, *args)

    monkeypatch.setattr(Trainer, during, interrupted)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        first = train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, f"train.max_steps={TOTAL_STEPS}"))
    assert (first["step"], first["reason"], first["signal"]) == (8, "interrupted", signal.SIGINT)
    message = "leaving the validation under way" if during == "validate" else "saving a checkpoint after this update"
    assert message in caplog.text
    assert torch.load(run_dir / "last.pt", weights_only=False)["position"]["validation_due"]
    monkeypatch.setattr(Trainer, during, method)
    second = train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, f"train.max_steps={TOTAL_STEPS}"), resume=True)
    assert second["step"] == TOTAL_STEPS
    assert_same_weights(weights(run_dir), weights(reference_run))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"valid"' in line]
    assert steps == list(range(4, TOTAL_STEPS + 1, 4))  # step 8's validation once, on resuming


def test_validation_with_packed_matmuls_measures_what_torch_layers_do(corpus: Path, reference_run: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    available, calls = nmt.onednn.packable(torch.zeros(1, 1)), []
    original = nmt.onednn.PackedLinear.__call__
    monkeypatch.setattr(nmt.onednn.PackedLinear, "__call__", lambda self, x: calls.append(packed) or original(self, x))
    results = []
    for packed in ("true", "false"):
        run_dir = tmp_path / packed
        run_dir.mkdir()
        for name in ("last.pt", "src.model", "tgt.model", "src.vocab", "tgt.vocab"):
            if (reference_run / name).exists():
                (run_dir / name).write_bytes((reference_run / name).read_bytes())
        cfg = tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.valid_bleu=true",
                          f"decode.packed_matmuls={packed}")
        results.append(Trainer(cfg, resume=True).validate())
    (packed_result, plain_result) = results
    assert set(calls) == ({"true"} if available else set())
    assert packed_result["dev_bleu"] == plain_result["dev_bleu"]
    assert packed_result["dev_loss"] == pytest.approx(plain_result["dev_loss"], rel=1e-5)


def test_resume_takes_a_new_learning_rate_and_decay_settings_from_the_config(corpus: Path, tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.max_steps=4"))
    with caplog.at_level(logging.INFO, logger="nmt.train"):
        trainer = Trainer(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.max_steps=8", "train.lr=0.0007",
                                      "train.lr_patience=5", "train.min_lr=0.0001"), resume=True)
    assert "differ from the checkpoint's: train.max_steps: 4 -> 8, train.lr: 0.005 -> 0.0007" in caplog.text
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.0007]
    assert trainer.scheduler.patience == 5 and trainer.scheduler.min_lrs == [0.0001]
    trainer.run()
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
           if '"train"' in line]
    assert lrs[:4] == [0.005] * 4 and lrs[4:] == [0.0007] * 4


def test_a_diverging_run_stops_in_one_line_and_keeps_its_last_finite_checkpoint(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={run_dir}",
            *(x for s in RESUME_SETTINGS for x in ("--set", s))]
    assert main([*args, "--set", "train.max_steps=4"]) == 0
    kept = weights(run_dir)
    update = Trainer.update

    def poisoned(self: Trainer, batches: list[list[int]]) -> tuple[float, float, int]:
        if self.pos.step == 5:  # the weights overflow in update 6, as a far too high learning rate makes them
            next(self.model.parameters()).data.fill_(float("inf"))
        return update(self, batches)

    monkeypatch.setattr(Trainer, "update", poisoned)
    assert main([*args, "--set", "train.max_steps=8", "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "nmt train: error: training diverged at step 6: the loss, the weights or the decoder's scores are no longer "
        f"finite numbers; {run_dir / 'last.pt'} keeps the weights of step 4; later updates are lost; resume "
        "(--resume) with a lower train.lr (now 0.005)")
    assert_same_weights(weights(run_dir), kept)


def test_a_dev_loss_that_overflows_stops_the_run(corpus: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    forward = Seq2Seq.forward

    def overflowing(self: Seq2Seq, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        loss, nll = forward(self, *args, **kwargs)
        return loss, nll if self.training else nll * float("inf")  # finite weights, overflowing in evaluation

    monkeypatch.setattr(Seq2Seq, "forward", overflowing)
    with pytest.raises(NMTError, match="training diverged at step 2: .* no checkpoint of this run yet; start again"):
        train(tiny_config(corpus, tmp_path / "run", "train.max_steps=2", "train.valid_every=2"))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_validation_whose_decoding_overflows_stops_the_run(corpus: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Weights of 1e30 stay finite, yet greedy decoding's scores overflow, and the search keeps no hypothesis.
    monkeypatch.setattr(nmt.translator, "search_ids", lambda model, ids, *a, **kw: [[] for _ in ids])
    with pytest.raises(NMTError, match="training diverged at step 2: .* no checkpoint of this run yet; start again"):
        train(tiny_config(corpus, tmp_path / "run", "train.max_steps=2", "train.valid_every=2"))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_validation_bleu_is_what_evaluate_gives_at_beam_1(tiny_run: Path, tiny_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Dev BLEU picks best.pt and stops the run early: it must score the translations `nmt evaluate` would give
    # (in fp32, as training computes). It cut dev sources at data.max_len pieces, where the Translator translates a
    # long line in parts.
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    src, tgt = (data / "dev.src").read_text().splitlines(), (data / "dev.tgt").read_text().splitlines()
    long_line = " ".join(src[:12])
    assert len(long_line.split()) > load_config(TINY).data.max_len
    (data / "dev.src").write_text("\n".join([long_line, *src[12:]]) + "\n")
    (data / "dev.tgt").write_text("\n".join([" ".join(reversed(long_line.split())), *tgt[12:]]) + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("src.model", "tgt.model"):
        shutil.copy(tiny_run / name, run_dir / name)
    trainer = Trainer(tiny_config(data, run_dir, "train.valid_bleu=true"))
    try:
        trainer.model.load_state_dict(load_checkpoint(tiny_run / "best.pt")["model"])
        dev_bleu = trainer.validate()["dev_bleu"]
    finally:
        trainer.close()
    report = tmp_path / "dev.json"
    assert main(["evaluate", str(tiny_run / "best.pt"), "--split", "dev", "--data", str(data), "--beam", "1",
                 "--no-int8", "--report", str(report)]) == 0
    capsys.readouterr()
    assert 20 < dev_bleu == json.loads(report.read_text())["metrics"]["bleu"]["score"]


def test_cpu_bfloat16_autocast_trains_where_the_cpu_has_bfloat16(corpus: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(nmt.device, "cpu_flags", lambda: {"avx2"})
    with caplog.at_level(logging.INFO, logger="nmt.train"):
        plain = Trainer(tiny_config(corpus, tmp_path / "plain", *RESUME_SETTINGS, "train.amp_cpu=true"))
    assert not plain.amp and "no bfloat16 instructions" in caplog.text  # float32 where bfloat16 is emulated
    monkeypatch.setattr(nmt.device, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    trainer = Trainer(tiny_config(corpus, tmp_path / "run", *RESUME_SETTINGS, "train.amp_cpu=true"))
    assert trainer.amp
    seen: list[torch.dtype] = []
    trainer.model.decoder.hidden_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    batch = trainer.data.epoch_batches(1, 0)[0]
    losses = [trainer.update([batch])[0] for _ in range(6)]
    assert seen[0] == torch.bfloat16 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32
    seen.clear()
    original = nmt.onednn.PackedLinear.__call__  # validation decodes through the packed matmuls where it can

    def packed(self: nmt.onednn.PackedLinear, x: torch.Tensor) -> torch.Tensor:
        out = original(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(nmt.onednn.PackedLinear, "__call__", packed)
    trainer.validate()
    assert seen and set(seen) == {torch.float32}  # dev numbers measure the float32 model that gets exported


def test_sigterm_saves_a_checkpoint_and_exits_as_stopped(corpus: Path, reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "nmt", "train", str(TINY)]
    for item in (f"data.dir={corpus}", f"train.run_dir={run_dir}", *RESUME_SETTINGS):
        command += ["--set", item]
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.stat().st_size > 0):
            assert proc.poll() is None, f"training ended before the signal: {err.read_text()}"
            assert time.monotonic() < deadline, "no metrics line within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, err.read_text()  # saved, but not finished
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped: interrupted" in out.read_text()
    assert "received signal 15" in err.read_text() and "Traceback" not in err.read_text()
    state = load_checkpoint(run_dir / "last.pt")
    stopped_at = state["position"]["step"]
    assert 1 <= stopped_at < TOTAL_STEPS
    # What a second Ctrl-C of the resumed run would say last.pt keeps: the step saved, not the last validation's.
    resumed = Trainer(tiny_config(corpus, run_dir, *RESUME_SETTINGS), resume=True)
    try:
        kept = f"{run_dir / 'last.pt'} keeps the weights of step {stopped_at}"
        assert resumed._kept() == f"{kept}, the last update"  # nothing trained since
        resumed.pos.step += 1
        assert resumed._kept() == f"{kept}; later updates are lost"
    finally:
        resumed.close()
    # The checkpoint is good for more than loading: resuming it lands exactly where an uninterrupted run does.
    result = train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, f"train.max_steps={TOTAL_STEPS}"), resume=True)
    assert result["step"] == TOTAL_STEPS
    assert_same_weights(weights(run_dir), weights(reference_run))


def test_a_run_directory_holding_a_run_needs_resume(corpus: Path, reference_run: Path, tmp_path: Path) -> None:
    with pytest.raises(NMTError, match="already holds a run; use --resume"):
        train(tiny_config(corpus, reference_run, *RESUME_SETTINGS))
    # With last.pt deleted, a new run began there beside the old best.pt and kept checkpoints, which pruning and
    # `nmt export --average` then mixed with its own.
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "last.pt").unlink()
    for step in (4, 8, 12):
        kept = step_checkpoint_path(run_dir, step)
        kept.parent.mkdir(exist_ok=True)
        shutil.copy(run_dir / "best.pt", kept)
    with pytest.raises(NMTError, match=r"holds checkpoints of an earlier run but no last.pt \(best.pt, "
                                       r"checkpoints/step-00000004.pt, checkpoints/step-00000008.pt \.\.\.\): "
                                       "delete them"):
        train(tiny_config(corpus, run_dir, *RESUME_SETTINGS))


def test_a_run_in_progress_is_named_before_what_its_directory_holds(corpus: Path, reference_run: Path,
                                                                    tmp_path: Path) -> None:
    # A second `nmt train` was told to --resume (a last.pt there), or that there was no checkpoint (before the
    # first), while the first was still training there.
    starting = tmp_path / "starting"
    starting.mkdir()
    for run_dir, resume in ((reference_run, False), (starting, True)):
        held = nmt.run_dir.lock_run_dir(run_dir)
        try:
            with pytest.raises(NMTError, match="another `nmt train` or `nmt tokenizer` is working in"):
                train(tiny_config(corpus, run_dir, *RESUME_SETTINGS), resume=resume)
        finally:
            held.close()
    with pytest.raises(NMTError, match="already holds a run; use --resume"):  # once it has stopped
        train(tiny_config(corpus, reference_run, *RESUME_SETTINGS))


def test_a_checkpoint_that_cannot_be_written_stops_training_in_one_line(corpus: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def full(state: object, path: str) -> None:  # what torch.save raises on a full disk
        Path(path).write_bytes(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 93568 vs 93456")

    monkeypatch.setattr("nmt.checkpoint.torch.save", full)
    monkeypatch.setattr("nmt.files.shutil.disk_usage", lambda path: SimpleNamespace(free=4096))
    run_dir = tmp_path / "run"
    args = ["train", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={run_dir}",
            "--set", "train.max_steps=2", "--set", "train.valid_bleu=false"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"nmt train: error: cannot write {run_dir / 'last.pt'} (no space left on the device)")
    assert not [p for p in run_dir.iterdir() if p.suffix in (".pt", ".tmp")]  # nor a half-written temporary file


def test_resume_needs_a_checkpoint(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(NMTError, match="--resume: no checkpoint at"):
        train(tiny_config(corpus, tmp_path / "empty"), resume=True)


def test_without_a_terminal_the_log_shows_training_going_on(corpus: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nmt.train")  # pytest's stderr is no terminal: no progress bar
    train(tiny_config(corpus, tmp_path / "run", *RESUME_SETTINGS, "train.max_steps=2"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ") and "  epoch " in
             r.getMessage()]  # not the validations' "step N: dev_loss ..." lines
    assert [line.split("  ")[:2] for line in lines] == [["step 1", "epoch 1"], ["step 2", "epoch 1"]]
    assert all(" tok/s" in line and "loss " in line for line in lines)


def test_resuming_a_run_at_max_steps_trains_nothing(corpus: Path, reference_run: Path, tmp_path: Path) -> None:
    run_dir = shutil.copytree(reference_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run_dir.glob("*.pt")}
    result = train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, f"train.max_steps={TOTAL_STEPS}"), resume=True)
    assert (result["step"], result["reason"]) == (TOTAL_STEPS, "max steps")  # it trained one more update
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.pt")} == before


def test_resume_reads_the_pairs_the_run_began_with(corpus: Path, tmp_path: Path) -> None:
    mine, run_dir = shutil.copytree(corpus, tmp_path / "mine"), tmp_path / "run"
    train(tiny_config(mine, run_dir, *RESUME_SETTINGS, "train.max_steps=2"))
    before = (run_dir / "last.pt").read_bytes()

    def resume(data: Path) -> dict:
        return train(tiny_config(data, run_dir, *RESUME_SETTINGS, "train.max_steps=3"), resume=True)

    other = small_corpus(tmp_path / "other", seed=1)  # same size and alphabet, so the vocabularies fit
    hint = f"resume with --set data.dir={mine}, or with `nmt train {run_dir}/config.yaml --resume`"
    with pytest.raises(NMTError, match=re.escape(f"{other}/train.* are not the pairs it began with, last read from "
                                                 f"data.dir '{mine}': {hint}")):
        resume(other)
    with pytest.raises(NMTError, match=re.escape(f"no {tmp_path / 'gone'}/train.src; the run last trained on data.dir "
                                                 f"'{mine}': {hint}")):
        resume(tmp_path / "gone")  # `--resume` without the first command's --set data.dir
    lines = (mine / "train.tgt").read_text(encoding="utf-8").splitlines()
    (mine / "train.tgt").write_text("\n".join(["x y", *lines[1:]]) + "\n", encoding="utf-8")
    with pytest.raises(NMTError, match=re.escape(f"the training pairs in {mine} are not those it began with (pre")):
        resume(mine)  # prepared again in place
    assert (run_dir / "last.pt").read_bytes() == before
    (mine / "train.tgt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    moved = shutil.copytree(mine, tmp_path / "moved")  # the same corpus elsewhere is no other data
    assert resume(moved)["step"] == 3
    assert load_config(run_dir / "config.yaml").data.dir == str(moved)  # what `RUN/config.yaml --resume` reads
    assert train(load_config(run_dir / "config.yaml", ["train.max_steps=4"]), resume=True)["step"] == 4
    # Resumed from `moved` since, the run names that corpus, not `mine`, where it began.
    last = f"are not the pairs it began with, last read from data.dir '{moved}'"
    with pytest.raises(NMTError, match=re.escape(last)):
        resume(other)


def test_a_resume_says_which_epoch_and_batch_come_next(corpus: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nmt.train")
    run_dir = tmp_path / "run"
    settings = [s for s in RESUME_SETTINGS if not s.startswith("train.epochs=")]
    done = train(tiny_config(corpus, run_dir, *settings, "train.epochs=1"))
    caplog.clear()
    train(tiny_config(corpus, run_dir, *settings, "train.epochs=2", f"train.max_steps={done['step'] + 2}"),
          resume=True)
    assert f"resumed from {run_dir}/last.pt at step {done['step']}: next is epoch 2, batch 1" in caplog.text
    caplog.clear()
    train(tiny_config(corpus, run_dir, *settings, "train.epochs=2"), resume=True)
    assert f"at step {done['step'] + 2}: next is epoch 2, batch 3" in caplog.text


def test_a_resumed_run_keeps_how_it_scores_dev_bleu_but_may_be_relabelled(corpus: Path, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.max_steps=2", "data.src_lang=de",
                      "data.tgt_lang=en"))
    before = (run_dir / "last.pt").read_bytes()

    def resume(src: str, tgt: str, steps: int) -> dict:
        return train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, f"train.max_steps={steps}",
                                 f"data.src_lang={src}", f"data.tgt_lang={tgt}"), resume=True)

    with pytest.raises(NMTError, match=re.escape(
            "it trained de -> en, now de -> zh (from the config's data.src_lang and data.tgt_lang), and dev BLEU "
            "would be tokenized otherwise (zh instead of 13a)")):
        resume("de", "zh", 3)
    assert (run_dir / "last.pt").read_bytes() == before
    caplog.clear()
    assert resume("nl", "en-GB", 3)["step"] == 3  # labels corrected: scored as before
    assert f"{run_dir} trained de -> en and is labelled nl -> en-GB from now on" in caplog.text


def test_a_copied_run_resumes_itself_not_the_run_its_config_names(corpus: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # `nmt train RUN2/config.yaml --resume` trained and wrote RUN, exit 0: the copy's config names RUN.
    run, copy = tmp_path / "run", tmp_path / "copy"
    train(tiny_config(corpus, run, *RESUME_SETTINGS, "train.max_steps=2"))
    shutil.copytree(run, copy)
    before = (run / "last.pt").read_bytes()
    args = ["train", str(copy / "config.yaml"), "--resume", "--set", "train.max_steps=3"]
    assert main(args) == 2
    assert (f"{copy}/config.yaml lies in the run {copy}, but names train.run_dir {run} (where the run began, or "
            f"relative to another directory): resume {copy} with --set train.run_dir={copy}") in capsys.readouterr().err
    assert main([*args, "--set", f"train.run_dir={copy}"]) == 0
    assert (run / "last.pt").read_bytes() == before and load_checkpoint(copy / "last.pt")["position"]["step"] == 3


def test_a_resume_on_other_pairs_says_so_before_their_languages(tmp_path: Path) -> None:
    # A corpus prepared again for another pair of languages was refused for its languages, as if only they changed.
    data, run_dir = small_corpus(tmp_path / "data"), tmp_path / "run"
    train(tiny_config(data, run_dir, *RESUME_SETTINGS, "train.max_steps=2"))
    small_corpus(data, seed=1)
    (data / "corpus.json").write_text('{"src_lang": "de", "tgt_lang": "zh"}', encoding="utf-8")
    with pytest.raises(NMTError, match=re.escape(f"the training pairs in {data} are not those it began with")):
        train(tiny_config(data, run_dir, *RESUME_SETTINGS, "train.max_steps=3"), resume=True)
    small_corpus(data)
    with pytest.raises(NMTError, match=re.escape(f"now de -> zh (as {data}/corpus.json names them)")):
        train(tiny_config(data, run_dir, *RESUME_SETTINGS, "train.max_steps=3"), resume=True)


@pytest.mark.parametrize(("override", "key"), [("model.cell=gru", "model.cell"),
                                               ("model.dec_hidden=32", "model.dec_hidden"),
                                               ("tokenizer.vocab_size=50", "tokenizer.vocab_size")])
def test_resume_with_an_incompatible_config_is_refused(corpus: Path, reference_run: Path, override: str,
                                                       key: str) -> None:
    before = (reference_run / "last.pt").read_bytes()
    cfg = tiny_config(corpus, reference_run, *RESUME_SETTINGS, override, f"train.max_steps={TOTAL_STEPS + 4}")
    with pytest.raises(NMTError, match=f"cannot resume .*{key} "):
        train(cfg, resume=True)
    assert (reference_run / "last.pt").read_bytes() == before


def test_stale_tokenizers_are_not_reused_silently(corpus: Path, reference_run: Path, tmp_path: Path) -> None:
    """A run that stopped before its first checkpoint left tokenizers trained under other settings."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("src.model", "tgt.model", "config.yaml"):
        (run_dir / name).write_bytes((reference_run / name).read_bytes())
    with pytest.raises(NMTError, match=r"tokenizers trained with other settings \(tokenizer.vocab_size \(40 -> 60\)"):
        train(tiny_config(corpus, run_dir, "tokenizer.vocab_size=60"))


def test_tokenizers_of_another_corpus_are_not_reused_silently(corpus: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A first attempt on one corpus stopped before its first checkpoint; data.dir fixed, training went on with the
    other corpus's tokenizers (every unseen piece <unk>, an excellent-looking dev perplexity)."""
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    with open(other / "train.src", "a", encoding="utf-8") as f:
        f.write("una línea más\n")
    with open(other / "train.tgt", "a", encoding="utf-8") as f:
        f.write("one more line\n")
    run_dir = tmp_path / "run"
    args = ["tokenizer", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={run_dir}"]
    assert main(args) == 0
    with pytest.raises(NMTError, match=f"trained on other training pairs than those in {other}"):
        train(tiny_config(other, run_dir, "train.max_steps=1"))
    assert main(["tokenizer", str(TINY), "--set", f"data.dir={other}", "--set", f"train.run_dir={run_dir}",
                 "--force"]) == 0
    capsys.readouterr()
    train(tiny_config(other, run_dir, "train.max_steps=1"))
    assert (run_dir / "last.pt").is_file()


def test_cli_train_error_exits_2(corpus: Path, reference_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={reference_run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_model_too_large_for_memory_is_one_line(corpus: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # A traceback from torch.empty before ("you tried to allocate 8000000000000 bytes").
    assert main(["train", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={tmp_path / 'run'}",
                 "--set", "model.emb_dim=1000000000000", "--set", "model.out_dim=1000000000000"]) == 2
    err = capsys.readouterr().err
    assert "cannot build the model that the config's model section describes on cpu (" in err
    assert err.rstrip().endswith("): choose smaller sizes") and "Traceback" not in err


def test_only_allocation_failures_are_called_sizes_too_large(corpus: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Every RuntimeError building the model was "choose smaller sizes", hiding a bug's own message.
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(nmt.train.Seq2Seq, "__init__", broken)
    with pytest.raises(RuntimeError, match="^a bug$"):
        train(tiny_config(corpus, tmp_path / "run"))


@pytest.mark.parametrize("seed", ["-5", str(2**32)])
def test_a_seed_that_sentencepiece_cannot_take_is_refused_by_the_config(seed: str) -> None:
    with pytest.raises(NMTError, match="config key 'train.seed' must be"):
        load_config(TINY, [f"train.seed={seed}"])
    assert load_config(TINY, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


@pytest.mark.parametrize("command", ["train", "tokenizer"])
def test_cli_run_dir_that_cannot_be_made_is_one_line(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      command: str) -> None:
    # A raw NotADirectoryError traceback (exit 1) before.
    (tmp_path / "file").write_text("x")
    args = [command, str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={tmp_path / 'file' / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot create the directory" in err and "Not a directory" in err and len(err.strip().splitlines()) == 1


def test_cli_tokenizer_trains_the_models_train_then_uses(corpus: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    args = ["tokenizer", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={run_dir}"]
    assert main(args) == 0
    assert f"{run_dir / 'src.model'}" in capsys.readouterr().out
    assert main(args) == 2
    assert "already has tokenizers" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    (run_dir / "tgt.model").unlink()  # what Ctrl-C while the target's trains leaves: it was refused as a pair
    assert main(args) == 0 and (run_dir / "tgt.model").is_file()
    made = (run_dir / "src.model").read_bytes()
    held = nmt.run_dir.lock_run_dir(run_dir)  # a run training here, before its first checkpoint
    assert main([*args, "--force", "--set", "tokenizer.vocab_size=60"]) == 2
    assert "another `nmt train` or `nmt tokenizer` is working in" in capsys.readouterr().err
    held.close()
    assert (run_dir / "src.model").read_bytes() == made
    with pytest.raises(NMTError, match="tokenizers trained with other settings"):
        train(tiny_config(corpus, run_dir, "tokenizer.vocab_size=60"))
    train(tiny_config(corpus, run_dir, "train.max_steps=1"))
    assert (run_dir / "src.model").read_bytes() == made  # training kept them
    assert main([*args, "--force"]) == 2
    assert "holds a trained model" in capsys.readouterr().err


def test_a_vocabulary_too_small_for_the_characters_is_one_line_in_config_terms(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["tokenizer", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={tmp_path / 'run'}",
            "--set", "tokenizer.vocab_size=6"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--character_coverage" not in err
    assert "tokenizer.vocab_size 6 is too small for the" in err
    assert "lower tokenizer.character_coverage (now 1.0, at least 0.98)" in err
    assert main([*args, "--set", "tokenizer.character_coverage=0.98"]) == 2  # nothing lower to advise
    assert capsys.readouterr().err.strip().endswith("raise tokenizer.vocab_size")
    assert main([*args[:-1], "tokenizer.vocab_size=3"]) == 2  # SentencePiece's own words were a check of its code
    assert "'tokenizer.vocab_size' must be more than the 4 special pieces" in capsys.readouterr().err


def test_a_corpus_of_lines_too_long_for_the_tokenizer_is_one_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for side, word in (("src", "palabra "), ("tgt", "word ")):
        (data / f"train.{side}").write_text((word * 1000 + "\n") * 3, encoding="utf-8")
    args = ["tokenizer", str(TINY), "--set", f"data.dir={data}", "--set", f"train.run_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (f"nmt tokenizer: error: SentencePiece found no line to train on in "
                                                f"{data / 'train.src'}: every line is empty or longer than 4192 bytes")


def _model_cut_short(options: dict[str, str], cwd: Path) -> None:
    """SentencePiece ignores a failed write of its model."""
    (cwd / (options["model_prefix"] + ".model")).write_bytes(b"")  # the prefix is relative to the working directory


def _vocab_not_written(options: dict[str, str], cwd: Path) -> None:
    """It checks those of its .vocab (said as an internal check before)."""
    raise RuntimeError('INTERNAL: src/trainer_interface.cc(783) [output->WriteLine(absl::StrCat(piece.piece(), "\\t", '
                       'piece.score()))] ')


@pytest.mark.parametrize("trainer", [_model_cut_short, _vocab_not_written])
def test_a_tokenizer_cut_short_by_a_full_disk_is_not_kept(corpus: Path, tmp_path: Path, trainer: Callable[..., None],
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nmt.tokenizer._train_in_child", trainer)
    monkeypatch.setattr("nmt.files.shutil.disk_usage", lambda path: SimpleNamespace(free=0))
    run_dir = tmp_path / "run"
    assert main(["tokenizer", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={run_dir}"]) == 2
    assert capsys.readouterr().err.strip() == (f"nmt tokenizer: error: cannot write {run_dir / 'src.model'} (no "
                                               "space left on the device)")
    # A later `nmt train` trains them again instead of failing to load them (the lock file is no tokenizer).
    assert [p.name for p in run_dir.iterdir()] == [".lock"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _tokenizer_command(tmp_path: Path, lines: int) -> list[str]:
    """`nmt tokenizer` on a corpus of random words that takes SentencePiece a while (seconds for 400,000 lines)."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(20000)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.src").write_text("".join(" ".join(rng.choices(words, k=12)) + "\n" for _ in range(lines)))
    shutil.copyfile(data / "train.src", data / "train.tgt")
    return [sys.executable, "-m", "nmt", "tokenizer", str(TINY), "--set", f"data.dir={data}", "--set",
            f"train.run_dir={tmp_path / 'run'}", "--set", "tokenizer.type=unigram", "--set",
            "tokenizer.vocab_size=8000"]


def _loaded_sentencepiece(pid: int) -> bool:
    """Whether a process has imported sentencepiece (a trainer has set its signal handling up by then)."""
    try:
        return "sentencepiece" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _trainers_of(proc: subprocess.Popen[str]) -> list[int]:
    """The tokenizer trainer processes of an `nmt tokenizer` once they have started."""
    deadline = time.monotonic() + 60
    while not (trainers := [pid for pid in _children(proc.pid) if _loaded_sentencepiece(pid)]):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, "no trainer process within 60 s"
        time.sleep(0.02)
    return trainers


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_tokenizer_training_at_once_and_leaves_nothing(tmp_path: Path, signum: int) -> None:
    # SentencePiece's trainer ran in this process, in C++ for as long as it took: Ctrl-C waited for it (half a
    # minute on a million lines) and SIGTERM left its temporary directory in the run. It now runs in a child.
    run_dir = tmp_path / "run"
    # SIGINT as in a terminal: the suite may run as a script's background job, which ignores it and passes that on.
    proc = subprocess.Popen(_tokenizer_command(tmp_path, 400_000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        trainers = _trainers_of(proc)
        proc.send_signal(signum)
        sent = time.monotonic()
        status = proc.wait(timeout=60)
        stopped_in = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == (130 if signum == signal.SIGINT else -signal.SIGTERM), proc.stderr.read()
    assert stopped_in < 3, f"stopped {stopped_in:.1f} s after the signal"
    assert not any(Path(f"/proc/{pid}").exists() for pid in trainers)
    assert [p.name for p in run_dir.iterdir()] == [".lock"]


def test_a_tokenizer_training_that_ignores_ctrl_c_goes_on(tmp_path: Path) -> None:
    # Started in the background by a script, which ignores SIGINT there: the trainer set it back to its default,
    # and a Ctrl-C for the terminal's foreground job ended it, "SentencePiece training failed".
    proc = subprocess.Popen(_tokenizer_command(tmp_path, 50_000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _trainers_of(proc)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"src.model", "tgt.model"}


def test_sigterm_stops_tokenizer_training_as_a_containers_pid_1(corpus: Path, tmp_path: Path) -> None:
    # A container's PID 1 (nmt in the Dockerfile's exec form) is not ended by a signal it does not handle: SIGTERM
    # during tokenizer training was a traceback and status 1. os.kill stands in for the kernel that ignores it.
    script = ("import os, signal, sys\n"
              "import nmt.tokenizer\n"
              "from nmt.cli import main\n"
              "nmt.tokenizer._train_in_child = lambda options, cwd: signal.raise_signal(signal.SIGTERM)\n"
              "os.kill = lambda pid, signum: None\n"
              "sys.exit(main(sys.argv[1:]))\n")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", script, "tokenizer", str(TINY), "--set",
                           f"data.dir={corpus}", "--set", f"train.run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert [p.name for p in run_dir.iterdir()] == [".lock"]


def test_tokenizer_training_does_not_depend_on_the_working_directory_or_commas(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer imported a sentencepiece.py or json.py of the working directory, and SentencePiece read a data
    # directory with a comma in its name as two files.
    work = tmp_path / "work"
    work.mkdir()
    for module in ("sentencepiece", "json"):
        (work / f"{module}.py").write_text("raise SystemExit('imported from the working directory')\n")
    monkeypatch.chdir(work)
    data = shutil.copytree(corpus, tmp_path / "data,1")
    run_dir = tmp_path / "run,1"
    assert main(["tokenizer", str(TINY), "--set", f"data.dir={data}", "--set", f"train.run_dir={run_dir}"]) == 0
    # A relative run directory (configs/base.yaml's runs/base) failed: the trainer, run in the temporary directory,
    # wrote its model under that relative path again, inside it.
    assert main(["tokenizer", str(TINY), "--set", "data.dir=../data,1", "--set", "train.run_dir=runs/rel"]) == 0
    assert (work / "runs/rel/src.model").is_file() and (work / "runs/rel/tgt.model").is_file()


def test_plot_writes_a_png(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "curves.png"
    assert main(["plot", str(tiny_run), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert str(out) in capsys.readouterr().out
    # Without a suffix it wrote NAME.png but printed NAME; an unknown suffix was a traceback.
    assert main(["plot", str(tiny_run), "-o", str(tmp_path / "named")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "named.png") and (tmp_path / "named.png").is_file()
    assert main(["plot", str(tiny_run), "-o", str(tmp_path / "x.xyz")]) == 2
    err = capsys.readouterr().err
    assert "the image formats are" in err and "png" in err and "Traceback" not in err
    assert main(["plot", str(tiny_run), "-o", str(tmp_path)]) == 0  # a directory: curves.png in it
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert main(["plot", str(tiny_run), "-o", str(tmp_path / "new") + "/"]) == 0  # one to make
    assert (tmp_path / "new" / "curves.png").is_file()
    # -o - (and /dev/stdout) wrote ./-.png (and /dev/stdout.png, a regular file in /dev).
    for output in ("-", "/dev/stdout"):
        with (tmp_path / "piped.png").open("wb") as piped:
            done = subprocess.run([sys.executable, "-m", "nmt", "plot", str(tiny_run), "-o", output], stdout=piped,
                                  stderr=subprocess.PIPE, timeout=120)
        assert done.returncode == 0 and (tmp_path / "piped.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not Path("-.png").exists()


def test_plot_default_path_and_torn_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run still writing may end in a half line; resumed runs log some steps twice."""
    lines = [{"type": "train", "step": s, "epoch": 1, "loss": 3.0 / s, "nll": 3.0 / s, "ppl": 2.0, "lr": 0.001}
             for s in (1, 2, 3, 2, 3, 4)]
    lines.append({"type": "valid", "step": 4, "epoch": 1, "dev_loss": 1.0, "dev_ppl": 2.7, "lr": 0.0005})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "tr')
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "curves.png" / "x.png")]) == 2  # said "File exists"
    assert f"cannot create the directory {tmp_path / 'curves.png'}: a file of that name is in the way" in \
        capsys.readouterr().err


def test_metrics_records_skip_torn_and_foreign_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    assert read_records(path) == []
    append_record(path, {"type": "train", "step": 1})
    with open(path, "a", encoding="utf-8") as f:
        f.write('3\n\n["a"]\n{"type": "valid", "step": 1}\n{"type": "tr')
    assert read_records(path) == [{"type": "train", "step": 1}, {"type": "valid", "step": 1}]
    assert [r.getMessage().split(":")[-1] for r in caplog.records] == ["2 is not a JSON object; skipped",
                                                                      "4 is not a JSON object; skipped",
                                                                      "6 is not a JSON object; skipped"]


def test_metrics_of_lost_updates_and_of_an_abandoned_attempt_are_left_out(tmp_path: Path) -> None:
    # Two Ctrl-Cs before the first checkpoint, then a new run in the same directory: plot drew the abandoned
    # attempt's steps 30-40 past the new run's last step and titled it "40 updates". A run resumed from step 4
    # after logging step 6 unsaved: steps 5-6 were lost with the process.
    def session(step: int, time: float) -> dict:
        return {"type": "session", "event": "start", "step": step, "time": time}

    def train_line(step: int, loss: float, time: float) -> dict:
        return {"type": "train", "step": step, "loss": loss, "nll": loss, "ppl": 2.0, "lr": 0.001, "time": time}

    abandoned = [session(0, 0.0), *(train_line(s, 9.0, 1000.0 + s) for s in (10, 20, 30, 40))]
    run = [session(0, 2000.0), train_line(2, 3.0, 2020.0), train_line(4, 2.0, 2040.0),
           {"type": "valid", "step": 4, "dev_bleu": 1.0}, train_line(6, 1.5, 2060.0),
           {"type": "valid", "step": 6, "dev_bleu": 2.0},
           session(4, 2100.0), train_line(6, 1.0, 2160.0), train_line(8, 0.5, 2180.0)]
    path = tmp_path / "metrics.jsonl"
    for record in abandoned + run:
        append_record(path, record)
    assert read_records(path) == abandoned + run
    assert this_run(read_records(path)) == run
    kept = current(read_records(path))
    assert kept == [*run[:4], run[6], *run[7:]]
    assert [(r["type"], r["step"], r.get("loss")) for r in kept if r["type"] != "session"] == [
        ("train", 2, 3.0), ("train", 4, 2.0), ("valid", 4, None), ("train", 6, 1.0), ("train", 8, 0.5)]
    # The card's training time counts the killed session up to its last line, lost updates and all: 60 + 80 s.
    training = _sessions(this_run(read_records(path)))
    assert (training["sessions"], training["wall_seconds"]) == (2, 140)


def test_plot_without_metrics_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert main(["plot", str(tmp_path)]) == 2
    assert "no train or valid records" in capsys.readouterr().err


def test_the_corpus_names_the_languages(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # `nmt prepare files ... --src-lang de --tgt-lang en` then training with a config that says es -> en gave a
    # model card, translate log and /v1/models labelled es -> en.
    data = tmp_path / "data"
    data.mkdir()
    cfg = tiny_config(data, tmp_path / "run", "data.src_lang=es", "data.tgt_lang=en")
    nmt.train.label_languages(cfg)  # no corpus.json: the config's
    assert (cfg.data.src_lang, cfg.data.tgt_lang) == ("es", "en")
    (data / "corpus.json").write_text(json.dumps({"src_lang": "src", "tgt_lang": "tgt"}), encoding="utf-8")
    nmt.train.label_languages(cfg)  # prepare's placeholders: the config's, and said (a de -> en corpus was silently
    assert (cfg.data.src_lang, cfg.data.tgt_lang) == ("es", "en")  # labelled es -> en, the config's example)
    assert "corpus.json does not name both languages: the model is labelled es -> en" in caplog.text
    (data / "corpus.json").write_text(json.dumps({"src_lang": "de", "tgt_lang": "tgt"}), encoding="utf-8")
    nmt.train.label_languages(cfg)  # one forgotten: labelled de -> tgt, and BLEU tokenized as for "tgt"
    assert (cfg.data.src_lang, cfg.data.tgt_lang) == ("de", "en")
    assert "the model is labelled de -> en" in caplog.text
    (data / "corpus.json").write_text(json.dumps({"src_lang": "de", "tgt_lang": "en"}), encoding="utf-8")
    nmt.train.label_languages(cfg)
    assert (cfg.data.src_lang, cfg.data.tgt_lang) == ("de", "en")


def test_a_run_directory_must_be_a_directory_of_no_model_and_no_other_training(corpus: Path, tmp_path: Path,
                                                                                capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("mine", encoding="utf-8")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"")
    for run_dir, message in [(a_file, "is a file"), (model_dir, "exported model directory")]:
        with pytest.raises(NMTError, match=message):
            train(tiny_config(corpus, run_dir))
    assert a_file.read_text(encoding="utf-8") == "mine"
    # A project or corpus directory given as the run directory: config.yaml was replaced, metrics appended to.
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine", encoding="utf-8")
    (project / "notes.txt").write_text("mine", encoding="utf-8")
    for run_dir, shown in [(project, "notes.txt"), (corpus, "dev.src, dev.tgt, train.src, train.tgt")]:
        with pytest.raises(NMTError, match=re.escape(f"{run_dir} holds other files than a run's ({shown})")):
            train(tiny_config(corpus, run_dir))
        assert main(["tokenizer", str(TINY), "--set", f"data.dir={corpus}", "--set", f"train.run_dir={run_dir}"]) == 2
        assert "holds other files than a run's" in capsys.readouterr().err
    assert (project / "config.yaml").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "notes.txt"]
    logged = tmp_path / "logged"  # `nohup nmt train ... > RUN/train.log` makes the log first
    logged.mkdir()
    (logged / "train.log").write_text("", encoding="utf-8")
    nmt.run_dir.check_run_dir_holds_only_a_run(logged)
    # Two `nmt train` in one run directory overwrote each other's checkpoints and interleaved the log.
    held = nmt.run_dir.lock_run_dir(tmp_path)
    with pytest.raises(NMTError, match="another `nmt train` or `nmt tokenizer` is working in"):
        nmt.run_dir.lock_run_dir(tmp_path)
    held.close()
    nmt.run_dir.lock_run_dir(tmp_path).close()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / ".lock").mkdir()  # no lock file can be made: a traceback before
    with pytest.raises(NMTError, match=r"cannot write .*taken/\.lock \(Is a directory\)"):
        nmt.run_dir.lock_run_dir(tmp_path / "taken")
    # A run that fails after taking the lock lets go of it (a retry in the same process was refused).
    run_dir = tmp_path / "failing"
    with pytest.raises(NMTError, match="no training pairs left") as failure:  # its traceback kept, as a notebook
        train(tiny_config(corpus, run_dir, "data.max_len=1"))
    nmt.run_dir.lock_run_dir(run_dir).close()
    assert failure.traceback  # still held while the lock was taken again


def test_a_second_ctrl_c_stops_at_once_and_says_what_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    stop = nmt.train.StopSignal(lambda: "runs/x/last.pt keeps the weights of step 100")
    with caplog.at_level(logging.WARNING):
        stop._handle(signal.SIGINT, None)
        assert stop.requested and stop.signum == signal.SIGINT
        assert "Ctrl-C again stops at once, without saving" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    assert "stopping without saving: runs/x/last.pt keeps the weights of step 100" in caplog.text


def test_the_command_ignores_ctrl_c_once_it_has_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    # A second Ctrl-C just after training had stopped and saved broke into the interpreter's shutdown: tracebacks
    # from torch's finalizers, after the run had said how it stopped.
    import nmt.cli

    handlers = []
    monkeypatch.setattr(nmt.cli, "main", lambda: 130)
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.append((sig, handler)))
    with pytest.raises(SystemExit) as exited:
        nmt.cli.run()
    assert exited.value.code == 130 and handlers == [(signal.SIGINT, signal.SIG_IGN)]


def test_subword_sampling_says_the_run_is_not_repeatable(corpus: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # The README promised an exact resume; SentencePiece's sampler does not repeat across processes.
    with caplog.at_level(logging.WARNING):
        train(tiny_config(corpus, tmp_path / "run", "tokenizer.sample_alpha=0.1", "train.max_steps=1"))
    assert "is not repeatable bit for bit, nor a resume exact" in caplog.text


def test_a_signal_during_an_epochs_resegmentation_stops_before_its_first_update(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # With tokenizer.sample_alpha, each epoch begins by segmenting the whole training text again (12 s for 200,000
    # pairs); a stop waited for it, and for an update after it.
    resample = Trainer._resample

    def interrupted_in_epoch_2(self: Trainer, epoch: int) -> None:
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)
        resample(self, epoch)

    monkeypatch.setattr(Trainer, "_resample", interrupted_in_epoch_2)
    run_dir = tmp_path / "run"
    settings = ["tokenizer.sample_alpha=0.1", "train.valid_every=0", "train.epochs=3"]
    with caplog.at_level(logging.WARNING):
        first = train(tiny_config(corpus, run_dir, *settings))
    assert (first["reason"], first["signal"]) == ("interrupted", signal.SIGINT)
    assert "leaving the resegmentation of the training text under way" in caplog.text
    position = torch.load(run_dir / "last.pt", weights_only=False)["position"]
    assert (position["epoch"], position["batch"], position["step"]) == (1, 0, first["step"])
    monkeypatch.setattr(Trainer, "_resample", resample)
    second = train(tiny_config(corpus, run_dir, *settings), resume=True)
    assert second["reason"] == "finished" and second["step"] > first["step"] + 1  # epochs of sampled lengths


def test_resume_names_every_setting_it_changes(corpus: Path, reference_run: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # Only train.* were named: a changed data.max_len (which pairs train) went unsaid.
    run_dir = shutil.copytree(reference_run, tmp_path / "run")
    with caplog.at_level(logging.INFO):
        train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, f"train.max_steps={TOTAL_STEPS + 1}", "data.max_len=30"),
              resume=True)
    line = next(r.getMessage() for r in caplog.records if "settings that differ" in r.getMessage())
    assert "data.max_len: " in line and f"train.max_steps: {TOTAL_STEPS} -> {TOTAL_STEPS + 1}" in line


def test_resume_with_other_batching_goes_on_from_the_same_place_in_the_epoch(
        corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The position is a batch index: with larger batches it lay past the end of the new epoch's batches, whose
    # rest was skipped without a word.
    run_dir = tmp_path / "run"
    train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.batch_tokens=100", "train.max_steps=12"))
    position = torch.load(run_dir / "last.pt", weights_only=False)["position"]
    assert position["batch"] == 12 and position["epoch"] == 0
    with caplog.at_level(logging.INFO):
        train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.batch_tokens=400", "train.max_steps=13"),
              resume=True)
    assert "resumes with other batching settings (train.batch_tokens)" in caplog.text
    position = torch.load(run_dir / "last.pt", weights_only=False)["position"]
    assert position["epoch"] == 0 and position["batch"] > 1  # neither the next epoch nor this one's start again


def test_resume_with_another_max_len_goes_on_from_the_same_place_in_the_epoch(
        corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # data.max_len changes which pairs train, so the epoch's batches too: the rest of the epoch was skipped.
    run_dir = tmp_path / "run"
    train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.batch_tokens=100", "train.max_steps=12"))
    with caplog.at_level(logging.INFO):
        train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.batch_tokens=100", "train.max_steps=13",
                          "data.max_len=6"), resume=True)
    assert "resumes with other batching settings (data.max_len)" in caplog.text
    position = torch.load(run_dir / "last.pt", weights_only=False)["position"]
    assert position["epoch"] == 0 and position["batch"] > 1  # neither the next epoch nor this one's start again


def test_resumed_optimizer_and_plateau_settings_are_the_configs(reference_run: Path, corpus: Path,
                                                                tmp_path: Path) -> None:
    # Adam's betas and weight decay came back from the checkpoint while the new ones were logged and saved as used;
    # and a dev loss lower by less than 1e-4 was no improvement to the learning-rate schedule (it decayed) while
    # early stopping and best.pt counted it as one.
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    resumed = Trainer(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.weight_decay=0.1",
                                  "train.adam_betas=[0.5, 0.6]"), resume=True)
    try:
        group = resumed.optimizer.param_groups[0]
        assert (group["weight_decay"], group["betas"]) == (0.1, (0.5, 0.6))
        assert resumed.scheduler.threshold == 0.0
    finally:
        resumed.close()


def test_a_dev_split_without_pairs_to_measure_is_refused_and_empty_ones_are_said(
        corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # All dev targets blank: the first validation divided by zero tokens (a traceback, the updates before it lost).
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    dev = (data / "dev.tgt").read_text(encoding="utf-8").splitlines()
    (data / "dev.tgt").write_text(" \n" * len(dev), encoding="utf-8")
    with pytest.raises(NMTError, match="the dev split in .* has no pair with text on both sides"):
        Trainer(tiny_config(data, tmp_path / "run", *RESUME_SETTINGS))
    (data / "dev.tgt").write_text("".join(line + "\n" for line in [" ", *dev[1:]]), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        Trainer(tiny_config(data, tmp_path / "run2", *RESUME_SETTINGS)).close()
    assert f"1 of {len(dev)} dev pairs are empty on one side: dev loss leaves them out" in caplog.text


def test_gradient_accumulation_trains_on_every_batch_of_the_epoch(corpus: Path, tmp_path: Path) -> None:
    # The epoch's last len(batches) % accum_steps batches were left out, a different few each epoch.
    run_dir = tmp_path / "run"
    cfg = tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.accum_steps=4", "train.epochs=1", "train.max_steps=0",
                      "train.valid_every=0")
    trainer = Trainer(cfg)
    try:
        batches = len(trainer.data.epoch_batches(cfg.train.seed, 0))
        seen = []
        real = trainer.update
        trainer.update = lambda group: seen.append(len(group)) or real(group)
        trainer.run()
    finally:
        trainer.close()
    assert batches % 4 and sum(seen) == batches and len(seen) == -(-batches // 4)


def test_training_speed_leaves_the_validations_time_out(corpus: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The first tokens/s after each validation counted the validation's time: a third of the speed, or less.
    validate = Trainer.validate

    def slow(self: Trainer) -> dict[str, float]:
        time.sleep(1.0)  # hundreds of tiny updates' worth
        return validate(self)

    monkeypatch.setattr(Trainer, "validate", slow)
    run_dir = tmp_path / "run"
    train(tiny_config(corpus, run_dir, *RESUME_SETTINGS, "train.max_steps=8"))  # validates at steps 4 and 8
    speed = {r["step"]: r["tok_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"}
    others = sorted(v for step, v in speed.items() if step != 5)
    assert speed[5] > 0.2 * others[len(others) // 2], speed


def test_resuming_a_run_that_trained_all_its_epochs_says_so(corpus: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # It printed nothing of the kind (the max_steps case said "nothing to train").
    run_dir = tmp_path / "run"
    settings = ["train.epochs=1", "train.max_steps=0", "train.valid_every=0"]
    train(tiny_config(corpus, run_dir, *settings))
    with caplog.at_level(logging.INFO):
        train(tiny_config(corpus, run_dir, *settings), resume=True)
    assert "has trained its 1 epochs (train.epochs): nothing to train (raise train.epochs to go on)" in caplog.text


def test_resuming_a_run_that_stopped_early_trains_nothing_unless_the_learning_rate_restarts(
        corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # It trained one more validation interval, only to stop early again. A learning rate this small leaves the
    # weights as they are, so the second validation cannot improve on the first.
    run_dir = tmp_path / "run"
    settings = ["train.lr=1e-12", "train.valid_every=2", "train.valid_bleu=false", "train.early_stop_patience=1",
                "train.max_steps=0", "train.epochs=100"]
    assert train(tiny_config(corpus, run_dir, *settings))["reason"] == "early stopping"
    stopped = torch.load(run_dir / "last.pt", weights_only=False)["position"]["step"]
    assert stopped == 4
    with caplog.at_level(logging.INFO):
        result = train(tiny_config(corpus, run_dir, *settings), resume=True)
    assert result == {"step": stopped, "best_bleu": -1.0, "reason": "early stopping", "signal": 0, "main": True}
    assert "stopped early at step 4, after 1 validations in a row without improvement" in caplog.text
    assert train(tiny_config(corpus, run_dir, *settings[1:], "train.lr=1e-11"), resume=True)["step"] == stopped + 2
