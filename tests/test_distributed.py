"""Data-parallel training on CPU (gloo): ranks stay in step, sharded batches add up to the whole, torchrun works."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

from nmt.checkpoint import load_checkpoint
from nmt.config import Config, from_dict, load_config
from nmt.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SETTINGS = ["model.dropout=0.2", "train.label_smoothing=0.1", "train.valid_every=4", "train.log_every=1",
            "train.epochs=1000", "decode.max_len_b=2"]
TOTAL_STEPS = 16
FULL = list(range(24))  # the sentences of the one-step comparison: ranks take halves, one process all


def corpus(out: Path, n_train: int = 300) -> Path:
    """Reverse-the-letters pairs; the same every time (sentence i depends on i only)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", 20)):
        src = [" ".join("abcdefgh"[(i * 7 + j * j) % 8] for j in range(2 + i % 8)) for i in range(n)]
        (out / f"{split}.src").write_text("".join(s + "\n" for s in src), encoding="utf-8")
        (out / f"{split}.tgt").write_text("".join(" ".join(reversed(s.split())) + "\n" for s in src),
                                          encoding="utf-8")
    return out


def config(data: Path, run_dir: Path, *overrides: str) -> Config:
    return load_config(TINY, [f"data.dir={data}", f"train.run_dir={run_dir}", *SETTINGS, *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, cfg: dict, job: str, out: str) -> None:
    """One rank, started by torch.multiprocessing.spawn, as torchrun would: through the environment."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NMT_DIST_TIMEOUT="120")
    if job == "interrupt" and rank == 0:  # Ctrl-C reaches rank 0 in its validation of step 8
        validate = Trainer.validate

        def interrupted(self: Trainer) -> dict[str, float]:
            if self.pos.step == 8:
                os.kill(os.getpid(), signal.SIGINT)
            return validate(self)
        Trainer.validate = interrupted
    trainer = Trainer(from_dict(cfg), resume=job == "resume")
    try:
        if job != "step":
            result = trainer.run()
            (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
        else:
            half = len(FULL) // world
            trainer.update([FULL[rank * half: (rank + 1) * half]])
        grads = {n: p.grad for n, p in trainer.model.named_parameters()}
        torch.save({"weights": trainer.model.state_dict(), "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        trainer.close()


def spawn(job: str, cfg: Config, out: Path, world: int = 2) -> list[dict]:
    """Run a job on `world` ranks; what each rank saved, in rank order."""
    out.mkdir(exist_ok=True)
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):  # the ranks share this process's cores
        mp.spawn(rank_main, args=(world, free_port(), cfg.to_dict(), job, str(out)), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def torchrun(overrides: list[str], *flags: str, **popen: object) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 -m nmt train tiny.yaml FLAGS --set OVERRIDE...`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "nmt", "train", str(TINY), *flags]
    for item in overrides:
        command += ["--set", item]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, **popen)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpus(tmp_path_factory.mktemp("ddp") / "data")


@pytest.fixture(scope="module")
def two_rank_run(data: Path) -> tuple[Path, list[dict]]:
    """TOTAL_STEPS updates on 2 ranks in one go: the run directory and each rank's final weights."""
    run_dir = data.parent / "run"
    return run_dir, spawn("run", config(data, run_dir, f"train.max_steps={TOTAL_STEPS}"), data.parent / "ranks")


def test_two_ranks_finish_with_identical_weights(two_rank_run: tuple[Path, list[dict]]) -> None:
    run_dir, ranks = two_rank_run
    assert_equal(ranks[0]["weights"], ranks[1]["weights"])
    assert_equal(load_checkpoint(run_dir / "last.pt")["model"], ranks[0]["weights"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Only rank 0 logs: one line per update and per validation.
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    assert [r["step"] for r in records if r["type"] == "valid"] == list(range(4, TOTAL_STEPS + 1, 4))
    assert "dev_bleu" in [r for r in records if r["type"] == "valid"][-1]
    assert [(r["event"], r["ranks"] if r["event"] == "start" else r["reason"]) for r in records
            if r["type"] == "session"] == [("start", 2), ("end", "max steps")]


@pytest.fixture(scope="module")
def one_process(data: Path) -> tuple[Trainer, dict]:
    """A single-process trainer on the same run settings, and its initial state to reset to."""
    trainer = Trainer(config(data, data.parent / "single", "model.dropout=0.0"))
    return trainer, copy.deepcopy({"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict()})


def one_update(trainer: Trainer, initial: dict, batches: list[list[int]]) -> dict:
    trainer.model.load_state_dict(initial["model"])
    trainer.optimizer.load_state_dict(initial["optim"])
    trainer.update(batches)
    return {"weights": copy.deepcopy(trainer.model.state_dict()),
            "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()}}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_two_ranks_with_half_batches_equal_one_process_with_the_whole(data: Path, tmp_path: Path,
                                                                     one_process: tuple[Trainer, dict]) -> None:
    """Gradients are all-reduced and normalized by the tokens of all ranks: 2 x B/2 is exactly 1 x B."""
    ranks = spawn("step", config(data, tmp_path / "run", "model.dropout=0.0"), tmp_path / "ranks")
    single = one_update(*one_process, [FULL])
    for rank in ranks:
        assert_close(rank["grads"], single["grads"])
        # Adam's first step is about lr * sign(g): where g is near zero, float noise in g can flip the sign and move
        # a weight by up to 2 lr (the gradients above are the property; this checks the update used them).
        assert_close(rank["weights"], single["weights"], atol=2.2 * 0.005)
    assert_equal(ranks[0]["weights"], ranks[1]["weights"])


def test_accumulated_batches_equal_one_batch(one_process: tuple[Trainer, dict]) -> None:
    half = len(FULL) // 2
    accumulated = one_update(*one_process, [FULL[:half], FULL[half:]])
    assert_close(accumulated["grads"], one_update(*one_process, [FULL])["grads"])


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


def test_a_two_rank_run_resumed_in_one_process_goes_on_from_the_same_place(
        data: Path, two_rank_run: tuple[Path, list[dict]], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_run[0], run_dir)
    saved = load_checkpoint(run_dir / "last.pt")["position"]
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(config(data, run_dir, f"train.max_steps={TOTAL_STEPS + 1}"), resume=True)
    try:
        # Batch i of each rank's shard is batch 2i of the whole epoch: one process goes on from there.
        assert trainer.pos.batch == saved["batch"] * 2 and saved["batch"] > 0
    finally:
        trainer.close()
    assert "trained on 2 processes and resumes on 1" in caplog.text


def test_a_signal_to_rank_0_in_validation_leaves_it_for_the_resumed_run(
        data: Path, two_rank_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    # The other ranks waited for rank 0's whole validation (minutes on a large dev set) before the job could stop.
    run_dir, out = tmp_path / "run", tmp_path / "ranks"
    cfg = config(data, run_dir, f"train.max_steps={TOTAL_STEPS}")
    spawn("interrupt", cfg, out)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["step"], r["reason"]) for r in results] == [(8, "interrupted")] * 2
    position = load_checkpoint(run_dir / "last.pt")["position"]
    assert position["step"] == 8 and position["validation_due"]
    assert validated_steps(run_dir) == [4]
    ranks = spawn("resume", cfg, out)
    assert_equal(ranks[0]["weights"], two_rank_run[1][0]["weights"])
    assert validated_steps(run_dir) == list(range(4, TOTAL_STEPS + 1, 4))  # step 8's once, on resuming


def validated_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["type"] == "valid"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the ranks")
def test_torchrun_a_rank_that_dies_ends_the_job_and_resume_continues_exactly(
        data: Path, two_rank_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"data.dir={data}", f"train.run_dir={run_dir}", *SETTINGS]
    proc = torchrun(overrides, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "last.pt").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(next(pid for pid in children(proc.pid) if rank_of(pid) == 1), signal.SIGKILL)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # torchrun's report: one block per failed rank. Rank 0 fails too (its next collective); which of the two it
    # names as the root cause depends on whether it saw both in one poll.
    failures = re.split(r"\n\[\d+\]:\n", output[output.index("Failures:"):])
    assert [f for f in failures if "rank      : 1" in f and "SIGKILL" in f]
    assert load_checkpoint(run_dir / "last.pt")["position"]["step"] < TOTAL_STEPS, "the kill came too late"

    proc = torchrun([*overrides, f"train.max_steps={TOTAL_STEPS}"], "--resume", stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert f"steps: {TOTAL_STEPS}" in output and output.count("stopped: max steps") == 1  # rank 0's summary only
    assert_equal(load_checkpoint(run_dir / "last.pt")["model"], two_rank_run[1][0]["weights"])
