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
    """The records in order, none when the file is missing; a line that is no JSON object (a torn last line of a
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
