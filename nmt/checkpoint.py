"""Training checkpoints: atomic writes, and loading that never unpickles code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from nmt.errors import NMTError
from nmt.files import atomic_write

FORMAT = "rnnsearch-checkpoint-1"
STEP_DIR = "checkpoints"  # in a run directory: the weights kept at validations (train.keep_checkpoints)


def step_checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / STEP_DIR / f"step-{step:08d}.pt"


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The kept step checkpoints of a run, oldest first."""
    folder = run_dir / STEP_DIR
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically; NMTError (the file left as it was) when it cannot be written."""
    state = {"format": FORMAT, **state}
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint onto the CPU (weights_only: tensors and plain data, no code)."""
    path = Path(path)
    if not path.is_file():
        raise NMTError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError,
            KeyError, AttributeError, TypeError) as exc:  # what torch.load raises on files it cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NMTError(f"{path} is not a readable rnnsearch checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NMTError(f"{path} is not an rnnsearch checkpoint (no '{FORMAT}' marker)")
    return state
