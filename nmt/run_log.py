"""A run's metrics.jsonl: one JSON record a line, appended by training, read back by export and plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nmt.errors import NMTError
from nmt.files import read_lines, write_failure

METRICS_FILE = "metrics.jsonl"

log = logging.getLogger(__name__)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Add one record as a line."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise NMTError(f"cannot write {path} ({write_failure(path, exc)})") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of the run as it stands, in order (see `current`), none when the file is missing; a line that
    is no JSON object (a torn last line of a run still writing, or of one killed while writing) is skipped with a
    warning."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(read_lines(path, "metrics file"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s:%d is not a JSON object; skipped", path, number)
    return current(records)


def current(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leave out what a later session superseded. A session that starts at step S resumed the checkpoint of step
    S: the train and valid records earlier sessions logged past S belong to updates that were lost (stopped without
    saving, or killed). One that starts at step 0 began the run anew where an earlier attempt saved nothing: all
    that attempt logged goes."""
    kept: list[dict[str, Any]] = []
    for record in records:
        step = record.get("step")
        if record.get("type") == "session" and record.get("event") == "start" and isinstance(step, int):
            kept = [] if step == 0 else [r for r in kept if not (
                r.get("type") in ("train", "valid") and isinstance(r.get("step"), int) and r["step"] > step)]
        kept.append(record)
    return kept
