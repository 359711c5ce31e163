"""A run directory: what it may hold, and the lock of the one process that works in it."""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from typing import Any

from nmt.checkpoint import STEP_DIR
from nmt.errors import NMTError
from nmt.run_log import METRICS_FILE
from nmt.tokenizer import TOKENIZER_FILES, TOKENIZER_RECORD

log = logging.getLogger(__name__)

RUN_ENTRIES = {"config.yaml", *TOKENIZER_FILES, TOKENIZER_RECORD, METRICS_FILE, "last.pt", "best.pt", STEP_DIR, "eval",
               "curves.png"}  # what nmt tokenizer, train, evaluate and plot write in a run directory


def check_run_dir_holds_only_a_run(run_dir: Path) -> None:
    """Refuse a run directory that holds anything but a run's files (hidden ones aside: the lock, temporary
    files; and logs, as `nohup nmt train ... > RUN/train.log` makes): training would write over a config.yaml or
    into a corpus or project of the user's."""
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in RUN_ENTRIES and not p.name.startswith(".") and p.suffix != ".log")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise NMTError(f"train.run_dir {run_dir} holds other files than a run's ({shown}): choose a new or empty "
                       "directory")


def lock_if_used(run_dir: Path) -> Any:
    """lock_run_dir for a directory some process has worked in (it holds the lock file), else None: taken before
    anything else is said of the directory, as what it holds (a last.pt or not yet) is the business of a process
    still working there; a directory never used is written in only once it has passed its checks."""
    return lock_run_dir(run_dir) if (run_dir / ".lock").is_file() else None


def lock_run_dir(run_dir: Path) -> Any:
    """Hold a lock on the run directory while this process trains in it (the open lock file: keep it); NMTError
    when another `nmt train` holds it, which would overwrite this run's checkpoints and log."""
    try:
        lock = open(run_dir / ".lock", "w")  # held open for the whole run
    except OSError as exc:
        raise NMTError(f"cannot write {run_dir / '.lock'} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise NMTError(f"another `nmt train` or `nmt tokenizer` is working in {run_dir}: wait for it, or choose "
                       "another train.run_dir") from None
    except OSError as exc:  # a filesystem without locks: train unguarded rather than not at all
        log.warning("cannot lock %s (%s): nothing stops another `nmt train` from using it meanwhile", run_dir,
                    exc.strerror or exc)
    return lock
