"""Translation quality with sacrebleu: BLEU, chrF and TER with their signatures, and the evaluation report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sacrebleu.metrics import BLEU, CHRF, TER

from nmt.errors import NMTError
from nmt.files import atomic_write, is_special_file
from nmt.progress import Progress

if TYPE_CHECKING:  # the translator's package imports export, which reads reports with is_report
    from nmt.translator import Translator


def evaluate(hyps: list[str], refs: list[str] | list[list[str]]) -> dict[str, Any]:
    """Corpus BLEU, chrF and TER of hyps against one reference list (or several, as a list of lists)."""
    streams = [refs] if not refs or isinstance(refs[0], str) else refs
    if not hyps:
        raise NMTError("nothing to score: no hypotheses")
    for i, stream in enumerate(streams):
        if len(stream) != len(hyps):
            raise NMTError(f"{len(hyps)} hypotheses but {len(stream)} lines in reference {i + 1}: "
                           "they must have the same number of lines")
    bleu, chrf, ter = BLEU(), CHRF(), TER()
    b = bleu.corpus_score(hyps, streams)
    metrics = {
        "bleu": {"score": b.score, "signature": str(bleu.get_signature()), "bp": b.bp, "ratio": b.ratio,
                 "hyp_len": b.sys_len, "ref_len": b.ref_len, "precisions": b.precisions},
        "chrf": {"score": chrf.corpus_score(hyps, streams).score, "signature": str(chrf.get_signature())},
        "ter": {"score": ter.corpus_score(hyps, streams).score, "signature": str(ter.get_signature())},
    }
    return {"n": len(hyps), "metrics": metrics}


def translate_lines(translator: Translator, lines: list[str], chunk: int = 500, progress: bool | None = None,
                    **options: Any) -> list[str]:
    """Translate a list of lines in chunks (token-budget batches inside each), with a progress bar on a TTY."""
    out: list[str] = []
    with Progress(len(lines), "lines", enabled=progress) as bar:
        for start in range(0, len(lines), chunk):
            out += [t.text for t in translator.translate(lines[start:start + chunk], **options)]
            bar.update(len(out))
    return out


def evaluate_model(translator: Translator, src: list[str], refs: list[list[str]],
                   **options: Any) -> tuple[list[str], dict[str, Any]]:
    """Translate src and score it against refs: the hypotheses and the report (scores, speed, settings)."""
    for i, stream in enumerate(refs):
        if len(stream) != len(src):
            raise NMTError(f"{len(src)} source lines but {len(stream)} lines in reference {i + 1}")
    start = time.perf_counter()
    hyps = translate_lines(translator, src, **options)
    seconds = time.perf_counter() - start
    report = evaluate(hyps, refs)
    decode = {**translator.decode_defaults, **{k: v for k, v in options.items() if v is not None}}
    decode["shortlist"] = translator.shortlist is not None and decode["shortlist"]  # whether one was used
    report.update(model=translator.info["name"], model_path=str(translator.path), step=translator.step,
                  weights_sha256=translator.weights_sha256, decode=decode,
                  int8=translator.int8, seconds=round(seconds, 3), sentences_per_s=round(len(src) / seconds, 2))
    return hyps, report


def is_report(data: Any) -> bool:
    """Whether parsed JSON is an `nmt evaluate` report: an object with its scores under 'metrics'."""
    return isinstance(data, dict) and isinstance(data.get("metrics"), dict) and bool(data["metrics"])


def check_report_replaceable(path: Path, inputs_sha256: str | None) -> None:
    """NMTError unless a report may go at path: nothing there yet (or an empty file), a device or pipe, or an
    earlier report. A file that is no report is never replaced (--report data/corpus.json). With `inputs_sha256`
    (the source and references' digest, where the user named no path), neither is a report of other inputs
    (eval/test.json of the test split, by a report of some other test.src); reports from before the digest was
    kept are replaced as they were."""
    if is_special_file(path) or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        earlier = None
    if not is_report(earlier):
        raise NMTError(f"{path} exists and is not an `nmt evaluate` report: name another file for the report, or "
                       "move that one")
    if inputs_sha256 is not None and earlier.get("inputs_sha256") not in (None, inputs_sha256):
        refs = earlier.get("ref")
        refs = ", ".join(map(str, refs)) if isinstance(refs, list) else refs
        raise NMTError(f"{path} is the report of other files ({earlier.get('src')} against {refs}): write this "
                       "one elsewhere (--report FILE or --out DIR), or move that one")


def write_report(report: dict[str, Any], path: Path) -> None:
    _write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def write_lines(lines: list[str], path: Path) -> None:
    _write_text(path, "".join(line.replace("\n", " ") + "\n" for line in lines))


def check_writable(path: Path) -> None:
    """NMTError when a file cannot be written at path because a directory is there."""
    if path.is_dir():
        raise NMTError(f"cannot write {path}: it is a directory")


def _write_text(path: Path, text: str) -> None:
    """Write a file atomically; NMTError naming it when it cannot be (a directory there, a file where its
    directory should be, no permission)."""
    check_writable(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def format_table(report: dict[str, Any]) -> str:
    """A short plain-text table: metric, score, sacrebleu signature."""
    names = {"bleu": "BLEU", "chrf": "chrF2", "ter": "TER"}
    rows = [f"{'metric':<7} {'score':>6}  signature"]
    for key, label in names.items():
        m = report["metrics"][key]
        rows.append(f"{label:<7} {m['score']:6.2f}  {m['signature']}")
    return "\n".join(rows)
