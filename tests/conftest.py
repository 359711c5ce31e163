"""Shared fixtures: a tiny model trained once per test session on a synthetic reverse task, and its export."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LETTERS = "abcdefghijklmnop"


def require_system_package(found: object, message: str) -> None:
    """Skip a test whose Debian package is missing, except under CI (CI=true), whose set-up must have installed it:
    there a missing package fails rather than passing as skipped."""
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must have it")
        pytest.skip(message)


def error_bound(x: torch.Tensor, weight: torch.Tensor, input_bound: float | None = None) -> torch.Tensor:
    """How far the int8 product may be from the fp32 one: each x is off by at most half its row's step (largest
    magnitude, or the input bound, / 127), each weight by half its channel's (/ 127, or 63 without VNNI), and their
    errors add up over the row."""
    x_half = (x.abs().amax(1, keepdim=True) if input_bound is None else torch.full((len(x), 1), input_bound)) / 254
    from nmt.int8 import weight_levels  # the weight's steps are those of this CPU's kernels

    w_half = weight.abs().amax(1) / (2 * (weight_levels() or 127))  # (out,)
    bound = x_half * weight.abs().sum(1) + x.abs().sum(1, keepdim=True) * w_half + weight.size(1) * x_half * w_half
    return bound * 1.01 + 1e-5


def reverse_corpus(out: Path, n_train: int = 3000, n_dev: int = 100, n_test: int = 100, seed: int = 0) -> Path:
    """Write {train,dev,test}.{src,tgt}: 3-12 random letters separated by spaces -> the same letters reversed."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        src = [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
        (out / f"{split}.src").write_text("".join(s + "\n" for s in src), encoding="utf-8")
        (out / f"{split}.tgt").write_text("".join(" ".join(reversed(s.split())) + "\n" for s in src),
                                          encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared corpus directory for the reverse task (see reverse_corpus)."""
    return reverse_corpus(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path) -> Path:
    """A run directory (best.pt, last.pt, config.yaml, src.model, tgt.model, metrics.jsonl) of configs/tiny.yaml
    trained for 12 epochs on the reverse task, keeping the weights of its last 3 validations in checkpoints/:
    dev BLEU ~99, about 20 s on one core."""
    from nmt.config import load_config
    from nmt.train import train

    run_dir = tiny_data.parent / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"data.dir={tiny_data}", f"train.run_dir={run_dir}", "train.epochs=12",
                       "train.keep_checkpoints=3"])
    train(cfg)
    return run_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_run: Path) -> Path:
    """The tiny run exported as a model directory (model.safetensors, config.yaml, src/tgt.model, card.json)."""
    from nmt.export import export_model

    return export_model(tiny_run, tiny_run.parent / "model")


@contextmanager
def serve_in_thread(app: Any, **config: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn (config: more of uvicorn.Config's arguments) in a thread of this process on a
    free loopback port; yields its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"uvicorn did not start on port {port}"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
