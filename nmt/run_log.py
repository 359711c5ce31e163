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
    """All records in order, none when the file is missing; a line that is no JSON object (a torn last line of a
    run still writing, or of one killed while writing) is skipped with a warning."""
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
    return records


def this_run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records from the last session that started at step 0: one that began the run anew where an earlier
    attempt saved no checkpoint, whose records are no part of this run."""
    starts = [i for i, r in enumerate(records) if _session_start(r) == 0]
    return records[starts[-1]:] if starts else records


def current(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's records without those of updates that were lost: a session that starts at step S resumed the
    checkpoint of step S, so the train and valid records earlier sessions logged past S (stopped without saving, or
    killed) are left out. Session records stay: the time those sessions took was spent all the same."""
    kept: list[dict[str, Any]] = []
    for record in this_run(records):
        step = _session_start(record)
        if step is not None:
            kept = [r for r in kept if not (
                r.get("type") in ("train", "valid") and isinstance(r.get("step"), int) and r["step"] > step)]
        kept.append(record)
    return kept


def _session_start(record: dict[str, Any]) -> int | None:
    """The step a session-start record began at; None for any other record."""
    if record.get("type") == "session" and record.get("event") == "start" and isinstance(record.get("step"), int):
        return record["step"]
    return None
