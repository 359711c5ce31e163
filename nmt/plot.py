"""`nmt plot RUN`: a PNG of a run's training curves from its metrics.jsonl."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from nmt.errors import NMTError
from nmt.files import atomic_write, is_special_file
from nmt.run_log import METRICS_FILE, current, read_records


def read_metrics(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Train and valid records by step; a step logged twice (a run resumed from an older checkpoint) keeps the
    later record, and a torn last line (a run still writing) is skipped."""
    by_type: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "valid": {}}
    for record in current(read_records(path)):
        if record.get("type") in by_type and isinstance(record.get("step"), int):
            by_type[record["type"]][record["step"]] = record
    return {kind: [records[s] for s in sorted(records)] for kind, records in by_type.items()}


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw loss, perplexity, dev BLEU and learning rate against updates; returns the PNG's path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise NMTError(f"no metrics in {run_dir}: {metrics_path} not found (is it a run directory of `nmt train`?)")
    metrics = read_metrics(metrics_path)
    train, valid = metrics["train"], metrics["valid"]
    if not train and not valid:
        raise NMTError(f"{metrics_path} holds no train or valid records yet")
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    loss, ppl, bleu, lr = fig.subplots(2, 2, sharex=True).flat
    loss.plot(*_series(train, "loss"), label="train loss")
    if any(r.get("nll") != r.get("loss") for r in train):  # label smoothing: the loss is not the NLL
        loss.plot(*_series(train, "nll"), label="train NLL")
    loss.plot(*_series(valid, "dev_loss"), marker="o", label="dev NLL")
    loss.set_title("loss per target token")
    ppl.plot(*_series(train, "ppl"), label="train")
    ppl.plot(*_series(valid, "dev_ppl"), marker="o", label="dev")
    ppl.set_yscale("log")
    ppl.set_title("perplexity")
    bleu.plot(*_series(valid, "dev_bleu"), marker="o", color="tab:green")
    bleu.set_title("dev BLEU (greedy)")
    lr.plot(*_series(sorted(train + valid, key=lambda r: r["step"]), "lr"), color="tab:red")
    lr.set_yscale("log")
    lr.set_title("learning rate")
    for ax in (loss, ppl):
        ax.legend()
    for ax in (bleu, lr):
        ax.set_xlabel("update")
    for ax in (loss, ppl, bleu, lr):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run_dir.resolve().name}: {max((r['step'] for r in train + valid), default=0)} updates")
    out = Path("/dev/stdout" if output == "-" else output) if output else run_dir
    if out.is_dir() or str(output).endswith(("/", os.sep)):
        out = out / "curves.png"
    elif not out.suffix and not is_special_file(out):  # /dev/stdout is written as it is named: a PNG
        out = out.with_name(out.name + ".png")  # as savefig would name it, so the path printed is the file's
    kind = out.suffix[1:].lower() or "png"
    formats = fig.canvas.get_supported_filetypes()
    if kind not in formats:
        raise NMTError(f"cannot write {out}: the image formats are {', '.join(sorted(formats))}")
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format=kind))
    return out
