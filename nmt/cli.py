"""The `nmt` command line: prepare, train, tokenizer, plot, translate, evaluate, score, export, serve."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from nmt import LOG_FORMAT, __version__
from nmt.config import MAX_THREADS, STORED_PER_SOURCE, integers
from nmt.errors import NMTError
from nmt.files import (
    GZIP_MAGIC,
    READ_ERRORS,
    bare_carriage_returns,
    gzip_named,
    gzip_unnamed,
    is_special_file,
    make_dir,
    not_utf8,
    probe_openable,
    probe_writable,
    read_failure,
    read_lines,
    stand_in_for_closed_streams,
    write_failure,
)

if TYPE_CHECKING:
    from nmt.translator import Translator

log = logging.getLogger(__name__)


def say(*lines: str) -> None:
    """Print a command's result lines on standard output, written at once: a failed write (a full disk behind a
    redirection) is an NMTError, and a closed pipe stays a BrokenPipeError, on which the CLI ends quietly."""
    try:
        print(*lines, sep="\n", flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise NMTError(f"cannot write to standard output ({write_failure(Path(os.devnull), exc)})") from None


def say_to_stderr(*lines: str) -> None:
    """Print result lines on standard error, where standard output holds the result itself."""
    print(*lines, sep="\n", file=sys.stderr, flush=True)


_DROP_LABELS = {"empty": "empty", "too_long": "too long", "ratio": "length ratio", "duplicate": "duplicate",
                "overlap_dev_test": "source also in dev/test"}


def _print_counts(result: dict) -> None:
    c = result["counts"]
    say(f"corpus: {result['outdir']} ({result['recipe']}, {result['src_lang']} -> {result['tgt_lang']})")
    say(f"  train {c['train']:,}  dev {c['dev']:,}  test {c['test']:,}")


def _run_bible(args: argparse.Namespace) -> int:
    from nmt.corpus import prepare_bible

    result = prepare_bible(args.outdir, sword_path=args.sword_path, overwrite=args.overwrite)
    _print_counts(result)
    skipped = result["skipped"]
    say(f"  skipped {sum(skipped.values())} of {result['verses']:,} verses (empty source "
        f"{skipped['empty_src']}, empty target {skipped['empty_tgt']})")
    return 0


def _run_files(args: argparse.Namespace) -> int:
    from nmt.corpus import prepare_files

    result = prepare_files(
        args.outdir, args.src, args.tgt, tsv=args.tsv,
        dev_src=args.dev_src, dev_tgt=args.dev_tgt, dev_tsv=args.dev_tsv,
        test_src=args.test_src, test_tgt=args.test_tgt, test_tsv=args.test_tsv,
        dev_size=args.dev_size, test_size=args.test_size, seed=args.seed,
        src_lang=args.src_lang, tgt_lang=args.tgt_lang, max_len=args.max_len, max_ratio=args.max_ratio,
        length_unit=args.length_unit, overwrite=args.overwrite)
    _print_counts(result)
    dropped = result["dropped"]
    reasons = ", ".join(f"{_DROP_LABELS[k]} {v:,}" for k, v in dropped.items() if v) or "none"
    say(f"  read {result['input_pairs']:,} pairs; dropped {sum(dropped.values()):,} ({reasons})")
    empty_eval = {k: v for k, v in result["dropped_dev_test"].items() if v}
    if empty_eval:
        say("  empty pairs dropped from the given " + ", ".join(
            f"{k.split('_')[0]} files: {v}" for k, v in empty_eval.items()))
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from nmt import corpus

    p = sub.add_parser("prepare", help="build a cleaned parallel corpus (train/dev/test files)",
                       description="Build a cleaned parallel corpus: OUTDIR/{train,dev,test}.{src,tgt} and "
                                   "OUTDIR/corpus.json.")
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE")
    recipes.required = True

    b = recipes.add_parser("bible", help="the built-in Spanish->English Bible corpus (RV1909 -> KJV)",
                           description="Spanish (Reina-Valera 1909) -> English (King James Version) verses "
                                       "from the Debian packages sword-text-sparv and sword-text-kjv.")
    b.add_argument("outdir", metavar="OUTDIR", help="output directory")
    b.add_argument("--sword-path", default="/usr/share/sword", help="SWORD library (default %(default)s)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace a previous corpus in OUTDIR even if other files are beside it (they are kept; a "
                        "directory that holds no previous corpus is never replaced)")
    b.set_defaults(func=_run_bible)

    f = recipes.add_parser("files", help="your own parallel text: two plain-text files or one TSV file",
                           description="Clean your own parallel text (NFC, control characters, whitespace; "
                                       "drop empty, too long, badly proportioned and duplicate pairs) and "
                                       "split it into train/dev/test.")
    f.add_argument("outdir", metavar="OUTDIR", help="output directory")
    f.add_argument("--src", metavar="FILE", help="source sentences, one a line")
    f.add_argument("--tgt", metavar="FILE", help="target sentences, line-parallel to --src")
    f.add_argument("--tsv", metavar="FILE", help="source<TAB>target a line (instead of --src/--tgt)")
    for split in ("dev", "test"):
        f.add_argument(f"--{split}-src", metavar="FILE", help=f"{split} source file (else held out)")
        f.add_argument(f"--{split}-tgt", metavar="FILE", help=f"{split} target file")
        f.add_argument(f"--{split}-tsv", metavar="FILE", help=f"{split} TSV file")
        f.add_argument(f"--{split}-size", type=int, metavar="N",
                       help=f"{split} pairs to hold out (default {corpus.DEFAULT_HOLDOUT} or "
                            f"{corpus.HOLDOUT_FRACTION * 100:.0f}%% of the pairs, whichever is fewer)")
    f.add_argument("--seed", type=int, default=1234, help="hold-out random seed (default %(default)s)")
    f.add_argument("--src-lang", default=corpus.UNNAMED_LANGUAGES[0],
                   help="source language code for corpus.json, which labels the models trained on it (default: none "
                        "named, and the training config's data.src_lang labels them)")
    f.add_argument("--tgt-lang", default=corpus.UNNAMED_LANGUAGES[1],
                   help="target language code, likewise (it also chooses the BLEU tokenizer)")
    f.add_argument("--max-len", type=int, default=corpus.DEFAULT_MAX_LEN, metavar="N",
                   help="drop training pairs with a side longer than N units (default %(default)s)")
    f.add_argument("--max-ratio", type=float, default=corpus.DEFAULT_MAX_RATIO, metavar="R",
                   help="drop training pairs whose longer side is over R times the shorter "
                        "(R at least 1; default %(default)s; 0 = off)")
    f.add_argument("--length-unit", choices=corpus.LENGTH_UNITS, default="words",
                   help="unit of --max-len and --max-ratio (default %(default)s; chars for languages "
                        "written without spaces)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace a previous corpus in OUTDIR even if other files are beside it (they are kept; a "
                        "directory that holds no previous corpus is never replaced)")
    f.set_defaults(func=_run_files)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in train.run_dir exactly")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.0005 (repeatable)")
    p.set_defaults(func=_run_train)

    p = sub.add_parser("tokenizer", help="train the SentencePiece models of a run (nmt train does it when missing)")
    p.add_argument("config", help="YAML config file: data.dir, tokenizer.* and train.run_dir are used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tokenizer.vocab_size=16000 (repeatable)")
    p.add_argument("--force", action="store_true", help="replace the run's tokenizers (only before training)")
    p.set_defaults(func=_run_tokenizer)

    p = sub.add_parser("plot", help="write a PNG of a run's training curves")
    p.add_argument("run", help="run directory (holds metrics.jsonl)")
    p.add_argument("-o", "--output", help="image file (.png, .svg, .pdf, ...), a directory for curves.png, or - "
                   "for a PNG on standard output (default RUN/curves.png)")
    p.set_defaults(func=_run_plot)


def _run_train(args: argparse.Namespace) -> int:
    from nmt.config import load_config, parse_override
    from nmt.train import train

    cfg = load_config(args.config, args.overrides)
    if args.resume and ["train", "run_dir"] not in (parse_override(item)[0] for item in args.overrides):
        _check_config_is_its_runs(Path(args.config), Path(cfg.train.run_dir))
    result = train(cfg, resume=args.resume)
    best = f"{result['best_bleu']:.2f}" if result["best_bleu"] >= 0 else "n/a"
    if result["main"]:  # under torchrun, once for the job
        say(f"run: {cfg.train.run_dir}  steps: {result['step']}  best dev BLEU: {best}  stopped: {result['reason']}")
    # Stopped by a signal (its checkpoint saved): not a finished run to a script's `&&`, as the shell would say.
    return 128 + result["signal"] if result["reason"] == "interrupted" and result["signal"] else 0


def _check_config_is_its_runs(config: Path, run_dir: Path) -> None:
    """A run's own config, in a run copied or moved elsewhere, still names the directory the run began in: `nmt
    train RUN2/config.yaml --resume` trained and wrote RUN."""
    home = config.parent
    if (home / "last.pt").is_file() and home.resolve() != run_dir.resolve():
        raise NMTError(f"{config} lies in the run {home}, but names train.run_dir {run_dir} (where the run began, "
                       f"or relative to another directory): resume {home} with --set train.run_dir={home}")


def _run_tokenizer(args: argparse.Namespace) -> int:
    from nmt.config import load_config, save_config
    from nmt.run_dir import check_run_dir_holds_only_a_run, lock_run_dir
    from nmt.tokenizer import TOKENIZER_FILES, TOKENIZER_RECORD, ensure_tokenizers

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.train.run_dir)
    check_run_dir_holds_only_a_run(run_dir)
    make_dir(run_dir)
    models = [run_dir / name for name in TOKENIZER_FILES]
    with lock_run_dir(run_dir):  # a run training here (not yet at its first checkpoint) reads these tokenizers
        present = [m for m in models if m.exists()]
        if present:
            if (run_dir / "last.pt").exists():
                raise NMTError(f"{run_dir} holds a trained model that depends on its tokenizers; "
                               "choose another train.run_dir")
            if len(present) == len(models) and not args.force:
                raise NMTError(f"{run_dir} already has tokenizers (src.model, tgt.model); --force replaces them")
            # One alone is what an interrupted `nmt tokenizer` left: both are trained again, as `nmt train` would.
            for m in [*models, run_dir / TOKENIZER_RECORD]:
                m.unlink(missing_ok=True)
        src, tgt = ensure_tokenizers(Path(cfg.data.dir), run_dir, cfg.tokenizer)
        save_config(cfg, run_dir / "config.yaml")  # so `nmt train` can tell whether its tokenizer settings match
    say(f"{models[0]} ({len(src)} pieces)", f"{models[1]} ({len(tgt)} pieces)")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from nmt.plot import plot_run

    out = plot_run(args.run, args.output)
    if not is_special_file(out):  # /dev/stdout, -: the image is the output
        say(str(out))
    return 0


def int_from(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= low (and <= high), so that a bad value is refused before the model loads."""
    wanted = integers(low, high)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if value < low or high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse


def _resamples(text: str) -> int:
    """An argparse type for --bootstrap: 0 (none) or at least 2 resamples (sacrebleu takes 1 as none, silently)."""
    value = int_from(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("one resample gives no interval: 0 (none) or at least 2 (1000 is usual)")
    return value


def _add_decode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int_from(1), help="beam size (default: the model config's decode.beam_size)")
    p.add_argument("--length-penalty", type=float, help="GNMT length penalty alpha; 0 = none (default: config)")
    p.add_argument("--no-repeat-ngram", type=int_from(0), metavar="N",
                   help="never repeat an n-gram of N pieces in an output; 0 = off (default: config)")
    p.add_argument("--batch-tokens", type=int_from(1),
                   help="source tokens per batch (default: config's decode.batch_tokens)")
    p.add_argument("--no-shortlist", dest="shortlist", action="store_false",
                   help="decode over the whole target vocabulary, not the model's lexical shortlist")
    p.add_argument("--shortlist-frequent", type=int_from(0), metavar="N",
                   help="shortlists hold the N most frequent target pieces (default: decode.shortlist_frequent)")
    p.add_argument("--shortlist-per-source", type=int_from(0), metavar="K",
                   help=f"... and K per source piece and word, at most {STORED_PER_SOURCE} "
                        "(default: decode.shortlist_per_source)")
    _add_model_options(p)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """How the model runs: --int8/--no-int8, --threads, --device."""
    p.add_argument("--int8", action=argparse.BooleanOptionalAction,
                   help="the matmuls in int8 on the CPU; --no-int8: fp32 (default: the model config's decode.int8, "
                        "on, on a CPU with VNNI)")
    _add_threads(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int_from(1, MAX_THREADS),
                   help=f"torch threads, at most {MAX_THREADS} (default: torch's choice)")


def _decode_options(args: argparse.Namespace) -> dict:
    return {"beam_size": args.beam, "length_penalty": args.length_penalty, "batch_tokens": args.batch_tokens,
            "no_repeat_ngram": args.no_repeat_ngram, "shortlist": args.shortlist,
            "shortlist_frequent": args.shortlist_frequent, "shortlist_per_source": args.shortlist_per_source}


def _load_translator(args: argparse.Namespace) -> Translator:
    from nmt.translator import Translator  # imported here: torch stays out of `nmt --help`

    wanted = getattr(args, "shortlist", True)
    translator = Translator.load(args.model, device=args.device, threads=args.threads, int8=args.int8,
                                 shortlist=wanted)
    if not wanted:
        log.info("--no-shortlist: decoding over the whole target vocabulary")
    sizes = [flag for flag, value in (("--shortlist-frequent", getattr(args, "shortlist_frequent", None)),
                                      ("--shortlist-per-source", getattr(args, "shortlist_per_source", None)))
             if value is not None]
    if sizes and (translator.shortlist is None or not wanted):
        why = ("--no-shortlist turns the shortlist off" if not wanted
               else f"{args.model} decodes without one (a run directory or checkpoint, or decode.shortlist off)")
        log.warning("%s ignored: %s", " and ".join(sizes), why)
    return translator


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "translate", help="translate text, one sentence (or paragraph) a line",
        description="Translate lines from FILE or stdin to FILE or stdout, streaming: each batch of lines is written "
                    "as soon as it is translated. With --n-best N, each input line i (counted from 0) gives up to N "
                    "lines `i ||| translation ||| score`, best first (--n-best 1: the best, with its score): a Moses "
                    "n-best list without its feature field; the translation without the spaces around it; score = "
                    "log-probability over the model's shortlist, length-normalized, summed over the line's "
                    "sentences. An empty line gives one empty translation of score 0.")
    p.add_argument("model", help="exported model directory, run directory or .pt checkpoint")
    p.add_argument("-i", "--input", help="input file; without it, or with -, standard input")
    p.add_argument("-o", "--output", help="output file; without it, or with -, standard output")
    p.add_argument("--n-best", type=int_from(1), metavar="N",
                   help="print up to N distinct translations per line with their scores, in the format above "
                        "(default: the best translation alone, without its score)")
    _add_decode_options(p)
    p.set_defaults(func=_run_translate)


def _line_batches(stream: Any, size: int, name: str | None, wait: float = 0.05) -> Iterator[list[str]]:
    """Lines in batches of up to size, a batch cut short whenever input stalls for `wait` seconds (pipes); name: the
    input file's (None: standard input)."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue(maxsize=4 * size)
    end = object()

    def read() -> None:
        try:
            for number, line in enumerate(stream, start=1):
                if isinstance(line, bytes):
                    try:
                        line = line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        if number == 1 and line.startswith(GZIP_MAGIC):
                            lines.put(gzip_unnamed(name) if name else NMTError(
                                "standard input is gzip-compressed: decompress it first (zcat FILE.gz | nmt "
                                "translate ...), or name the file with -i"))
                        else:
                            lines.put(not_utf8(name or "standard input", number, line, exc))
                        return
                text = line.removesuffix("\n").removesuffix("\r")
                if number == 1 and not line.endswith("\n") and "\r" in text:  # the whole input, of \r line ends
                    lines.put(bare_carriage_returns(name or "standard input"))
                    return
                lines.put(text)
        except READ_ERRORS as exc:  # said, not a reader thread that dies and leaves the translation waiting for ever
            lines.put(read_failure(name or "standard input", bool(name and gzip_named(name)), exc))
            return
        lines.put(end)

    threading.Thread(target=read, daemon=True).start()
    done = False
    while not done:
        batch = [lines.get()]
        while len(batch) < size:
            try:
                batch.append(lines.get(timeout=wait))
            except queue.Empty:
                break
            if batch[-1] is end or isinstance(batch[-1], NMTError):
                break
        done = batch[-1] is end or isinstance(batch[-1], NMTError)
        if isinstance(batch[-1], NMTError):
            if len(batch) > 1:
                yield batch[:-1]
            raise batch[-1]
        if done:
            batch.pop()
        if batch:
            yield batch


def _open(path: str | None, mode: str, default: Any) -> Any:
    """A file, or the default stream; input as bytes where possible, so each line is decoded on its own."""
    if path is None:
        return getattr(default, "buffer", default) if mode == "r" else default
    if mode == "w":
        make_dir(Path(path).parent)  # as every other command's outputs
    # A *.gz file is read decompressed, as `nmt evaluate`, `score` and `prepare` read one, and written compressed.
    compressed = gzip_named(path)
    try:
        if mode == "w":
            if compressed:
                return gzip.open(path, "wt", encoding="utf-8", newline="\n")
            return open(path, "w", encoding="utf-8", newline="\n")
        return gzip.open(path, "rb") if compressed else open(path, "rb")
    except OSError as exc:
        raise NMTError(f"cannot open {path}: {exc.strerror}") from None


def _held(lines: int) -> str:
    """What an output file holds after this many lines were translated."""
    return {0: "nothing", 1: "the translation of line 1"}.get(lines, f"the translations of lines 1-{lines}")


def _is_stdout(path: str) -> bool:
    """Whether path names this process's standard output (/dev/stdout, or the file it is redirected to)."""
    try:
        named, out = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (named.st_dev, named.st_ino) == (out.st_dev, out.st_ino)


def _check_not_input(output: str | os.PathLike | int, inputs: list[str | os.PathLike | int]) -> None:
    """Refuse to write over a file the command reads, named or an open descriptor such as stdin (the output would
    destroy its own input, or, appended to it, be read again without end); the output too may be a descriptor
    (stdout redirected to a file)."""
    try:
        written = os.fstat(output) if isinstance(output, int) else os.stat(output)
    except OSError:  # a new file, or no descriptor: nothing to destroy
        return
    if not stat.S_ISREG(written.st_mode):  # a device or pipe such as /dev/stdout
        return
    shown = "standard output" if isinstance(output, int) else output
    for source in inputs:
        with contextlib.suppress(OSError):
            read = os.fstat(source) if isinstance(source, int) else os.stat(source)
            if (read.st_dev, read.st_ino) == (written.st_dev, written.st_ino):
                name = "standard input" if isinstance(source, int) else source
                also = "" if str(name) == str(shown) else f" ({name})"
                raise NMTError(f"{shown} is also an input{also}: write the output to another file")


def _inputs(*paths: str | os.PathLike) -> list[str | os.PathLike | int]:
    """Input files as _check_not_input takes them: - is standard input's descriptor."""
    return [_stdin_fd() if str(path) == "-" else path for path in paths]


def _stdin_fd() -> int:
    """The descriptor of standard input (-1 when it has none: a test's replacement stream)."""
    return _fd(sys.stdin)


def _stdout_fd() -> int:
    """The descriptor of standard output (-1 when it has none)."""
    return _fd(sys.stdout)


def _fd(stream: Any) -> int:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return -1


def _run_translate(args: argparse.Namespace) -> int:
    from nmt.progress import Progress

    args.input, args.output = (None if path == "-" else path for path in (args.input, args.output))
    from nmt.translator import model_files

    _check_not_input(args.output or _stdout_fd(), [args.input or _stdin_fd(), *model_files(Path(args.model))])
    if args.beam is not None and (args.n_best or 1) > args.beam:  # found before the model loads; else by translate()
        raise NMTError(f"--n-best {args.n_best} is more than --beam {args.beam}")
    source = _open(args.input, "r", sys.stdin)  # a missing input is found before the model loads
    translator = _load_translator(args)
    options = {**_decode_options(args), "n_best": args.n_best or 1}
    translator.translate([], **options)  # checks the options before any input is read
    if args.output:
        probe_openable(Path(args.output))  # an unusable -o is said before anything is translated
    out = None  # opened at the first translations: input refused at its first line leaves a file as it was
    progress = Progress(None, "lines")
    done = written = 0  # input lines whose translations are flushed, and handed to the file (flushed as it closes)
    try:
        for batch in _line_batches(source, 64, args.input):
            results = translator.translate(batch, **options)
            if out is None:
                out = _open(args.output, "w", sys.stdout)
            for i, result in enumerate(results, start=done):
                if args.n_best is not None:
                    alternatives = [(a.text, a.score) for a in result.alternatives] or [("", 0.0)]
                    text = "".join(f"{i} ||| {text.strip()} ||| {score:.4f}\n" for text, score in alternatives)
                else:
                    text = result.text.replace("\n", " ") + "\n"
                out.write(text)  # one call a line, and counted: what the file holds at a Ctrl-C is said exactly
                written = i + 1
            out.flush()
            done = written
            progress.update(done)
        if out is None:  # no input line: an empty output
            out = _open(args.output, "w", sys.stdout)
        if args.output:
            out.close()  # here, so that a failing last write is reported
    except KeyboardInterrupt:
        held = f"holds {_held(written)}" if out is not None else "was not written"
        said = f"nmt translate: interrupted{f'; {args.output} {held}' if args.output else ''}"
        if args.input is None and _stdin_fd() >= 0:
            # The reader thread is blocked reading stdin, holding its buffer's lock, on which the interpreter's
            # shutdown would abort ("could not acquire lock"): finish here, without that shutdown.
            progress.close()
            with contextlib.suppress(OSError):
                if out is not None and args.output:
                    out.close()
                elif out is not None:
                    out.flush()
            print(said, file=sys.stderr, flush=True)
            os._exit(130)
        print(said, file=sys.stderr)
        return 130
    except NMTError as exc:  # bad input further on: say what the output file holds, as it was overwritten
        if not args.output or out is None:
            raise
        raise NMTError(f"{exc}; {args.output} holds {_held(done)}") from None
    except BrokenPipeError:
        raise
    except OSError as exc:  # a full disk: the reader thread raises no OSError here
        raise NMTError(f"cannot write the translations to {args.output or 'standard output'} after {done} lines "
                       f"({exc.strerror or exc})") from None
    finally:
        progress.close()
        if args.output and out is not None:
            with contextlib.suppress(OSError):
                out.close()
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="BLEU, chrF and TER (sacrebleu) of a model on a test set, or of any system's output",
        description="`nmt evaluate MODEL --split test` or `nmt evaluate MODEL --src F --ref F` translates and "
                    "scores, writing OUT/NAME.hyp and OUT/NAME.json (OUT defaults to MODEL/eval, and to "
                    "RUN/eval/CHECKPOINT for a .pt file); "
                    "`nmt evaluate --hyp F --ref F` scores a file of translations from any system.")
    p.add_argument("model", nargs="?", help="exported model directory, run directory or .pt checkpoint")
    p.add_argument("--src", help="source file to translate (- reads it from stdin)")
    p.add_argument("--ref", nargs="+", help="reference file(s), line-parallel to the source/hypotheses")
    p.add_argument("--hyp", help="score these translations (- reads them from stdin) instead of translating (no "
                                 "MODEL)")
    p.add_argument("--split", help="a split of a prepared corpus (e.g. test): its .src and .tgt files")
    p.add_argument("--data", help="prepared corpus directory for --split (default: the model config's data.dir)")
    p.add_argument("--out", help="directory for NAME.hyp and NAME.json (default: the --report file's directory, "
                                 "else MODEL/eval; RUN/eval/CHECKPOINT for a .pt file)")
    p.add_argument("--report", help="write the JSON report here instead, and its hypotheses beside it (REPORT.hyp "
                                    "for REPORT.json; with --out, NAME.hyp there); "
                                    "- writes it to standard output (the table then goes to standard error)")
    p.add_argument("--tokenize", metavar="NAME",
                   help="sacrebleu's BLEU tokenizer: 13a, intl, zh, char, ja-mecab, ko-mecab or none (default: 13a; "
                        "with a MODEL, its target language's: zh for Chinese, char or MeCab for Japanese and Korean)")
    p.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU (sacrebleu's -lc)")
    p.add_argument("--metrics", nargs="+", choices=("bleu", "chrf", "ter"), metavar="NAME",
                   help="score only these of bleu, chrf and ter (sacrebleu's -m; default: all three; TER takes "
                        "minutes on lines of thousands of words)")
    p.add_argument("--bootstrap", type=_resamples, default=0, metavar="N",
                   help="95%% confidence intervals from N bootstrap resamples (sacrebleu's --confidence; 1000 is "
                        "usual); with --baseline, the paired test's resamples (default 1000)")
    p.add_argument("--baseline", metavar="FILE",
                   help="another system's translations of the same source: a paired bootstrap test against them "
                        "(sacrebleu's --paired-bs), with their scores and each metric's p-value")
    _add_decode_options(p)
    p.set_defaults(func=_run_evaluate)


def _check_stdin_read_once(*options: tuple[str, str | None]) -> None:
    """NMTError when more than one of these (flag, value) options names standard input (-)."""
    stdin = [flag for flag, value in options if value == "-"]
    if len(stdin) > 1:
        raise NMTError(f"standard input can be read once: {' and '.join(stdin)} cannot both be -")


def _run_evaluate(args: argparse.Namespace) -> int:
    from nmt.evaluate import check_line_counts, format_table, write_report

    _check_stdin_read_once(("--hyp", args.hyp), ("--src", args.src), ("--baseline", args.baseline),
                           *(("--ref", r) for r in args.ref or ()))
    if args.report == "-":
        args.report = "/dev/stdout"
    # A report on standard output is the output: the table after it made it no JSON a program could read.
    show = say_to_stderr if args.report and _is_stdout(args.report) else say
    if args.hyp:
        report = _score_hypotheses(args)
        show(format_table(report))
        return 0
    if not args.model:
        swallowed = " (--ref takes every file after it: name the MODEL first)" if len(args.ref or ()) > 1 else ""
        raise NMTError(f"give a MODEL to translate with, or --hyp FILE to score existing translations{swallowed}")
    if bool(args.split) == bool(args.src):
        raise NMTError("give either --split NAME or --src FILE (with --ref)")
    if args.src and not args.ref:
        raise NMTError("--src needs --ref")
    if args.split and args.ref:
        raise NMTError("--split uses the corpus's own references: drop --ref")
    digest = hashlib.sha256()  # of the source and references as read: what the report is of
    scoring = _scoring(args)

    def read(src_path: Path, ref_paths: list[str]) -> tuple[list[str], list[list[str]]]:
        src = read_lines(src_path, "source file", digest)
        refs = [read_lines(r, "reference file", digest) for r in ref_paths]
        check_line_counts(len(src), refs, baseline=scoring.get("baseline"))  # before translating, not after
        for path, ref in zip(ref_paths, refs, strict=True):
            if ref == src:  # a slip of the command line, else a corpus whose two sides are one file
                log.warning("the reference %s holds the source lines themselves: the scores measure how much of "
                            "the source the translation keeps", path)
        return src, refs

    if args.src:  # read before the model loads, so that a missing file or a short reference is found at once
        src_path, ref_paths = Path(args.src), args.ref
        # Named for the source file; a descriptor's name (`--src <(zcat test.es.gz)`: /dev/fd/63) says nothing.
        descriptor = src_path.stem.isdigit() and str(src_path).startswith(("/dev/fd/", "/proc/"))
        name = "stdin" if args.src == "-" else "pipe" if descriptor else src_path.stem
        src, refs = read(src_path, ref_paths)
    translator = _load_translator(args)
    if args.split:  # the corpus may be the model's own, known once it has loaded
        from nmt.corpus import holds_other_pairs

        data = Path(args.data or translator.cfg.data.dir)
        src_path, ref_paths, name = data / f"{args.split}.src", [str(data / f"{args.split}.tgt")], args.split
        if not args.data and not src_path.is_file():
            where = "" if data.is_absolute() else f" (relative to the current directory {Path.cwd()})"
            raise NMTError(f"no {src_path}: --split reads the model's corpus, data.dir={data}{where}; name the "
                           "prepared corpus with --data DIR")
        src, refs = read(src_path, ref_paths)
        if holds_other_pairs(data, translator.data_sha256):
            log.warning("%s holds other training pairs than %s was trained on (prepared again?): its %s split may "
                        "hold sentences the model trained on, and the scores are not those of its own test set",
                        data, args.model, args.split)
    hyp_path, report_path = _evaluation_outputs(args, name, digest.hexdigest(), [src_path, *ref_paths])
    report = _evaluate_into(translator, src, refs, scoring, args, hyp_path)
    report.update(src=_shown(src_path), ref=[_shown(r) for r in ref_paths], inputs_sha256=digest.hexdigest())
    write_report(report, report_path)
    show(format_table(report),
         f"{report['n']} sentences in {report['seconds']:.1f} s; hypotheses: {report['hyp']}  report: {report_path}")
    return 0


def _scoring(args: argparse.Namespace) -> dict[str, Any]:
    """evaluate()'s options from the command line (tokenize only when given: a model's default is its language's)."""
    scoring: dict[str, Any] = {"lowercase": args.lowercase, "bootstrap": args.bootstrap}
    if args.metrics:
        scoring["metrics"] = tuple(args.metrics)
    if args.tokenize is not None:
        from nmt.evaluate import metrics_for

        metrics_for(args.tokenize, args.lowercase)  # an unknown or missing tokenizer is found before translating
        scoring["tokenize"] = args.tokenize
    if args.baseline is not None:
        scoring["baseline"] = read_lines(args.baseline, "baseline file")
    return scoring


def _score_hypotheses(args: argparse.Namespace) -> dict[str, Any]:
    """`nmt evaluate --hyp F --ref F`: the report of a file of translations from any system."""
    from nmt.evaluate import check_report_replaceable, evaluate, warn_if_unsegmented, write_report

    if args.model or args.src or args.split:
        raise NMTError("--hyp scores existing translations: give no MODEL, --src or --split")
    if args.out or args.data:
        raise NMTError("--hyp scores existing translations: --out and --data are for translating with a MODEL "
                       "(--report FILE writes the report)")
    if not args.ref:
        raise NMTError("--hyp needs --ref")
    if args.report:
        _check_not_input(args.report, _inputs(args.hyp, *args.ref, *filter(None, [args.baseline])))
        check_report_replaceable(Path(args.report), None)
    digest = hashlib.sha256()
    hyps = read_lines(args.hyp, "hypothesis file", digest)
    refs = [read_lines(r, "reference file", digest) for r in args.ref]
    scoring = _scoring(args)
    if "tokenize" not in scoring:
        warn_if_unsegmented(refs[0], "13a")
    report = evaluate(hyps, refs, **scoring)
    report.update(hyp=_shown(args.hyp), ref=[_shown(r) for r in args.ref], inputs_sha256=digest.hexdigest(),
                  environment=_environment(None))
    if args.baseline:
        report["baseline"] = _shown(args.baseline)
    if args.report:
        write_report(report, Path(args.report))
    return report


def _evaluation_outputs(args: argparse.Namespace, name: str, inputs_sha256: str,
                        inputs: list[str | Path]) -> tuple[Path, Path]:
    """The paths of the hypotheses and the report, checked (and their directory made) before the translation, which
    takes a while: neither overwrites an input, a file that is no report, or hypotheses that are not the report's."""
    from nmt.evaluate import check_hyp_replaceable, check_report_replaceable, check_writable
    from nmt.translator import locate_model, model_files

    home, source, exported = locate_model(Path(args.model))
    # A checkpoint file gets a folder of its own: scoring last.pt must not replace the run's (best.pt's) report.
    folder = home / "eval" if exported or Path(args.model).is_dir() else home / "eval" / source.stem
    # Beside the report, unless that is a device or pipe (--report /dev/stdout): its directory is no place for them.
    beside = args.report and not is_special_file(Path(args.report))
    out = Path(args.out) if args.out else Path(args.report).parent if beside else folder
    report_path = Path(args.report) if args.report else out / f"{name}.json"
    # Named after a report of the user's: two reports in one folder (greedy.json, beam5.json) have a file each.
    hyp_path = report_path.with_suffix(".hyp") if beside and not args.out else out / f"{name}.hyp"
    if args.out and out.exists() and not out.is_dir():
        raise NMTError(f"--out {out}: not a directory")
    read = [*_inputs(*inputs, *filter(None, [args.baseline])), *model_files(Path(args.model))]
    for path in (hyp_path, report_path):
        check_writable(path)
        _check_not_input(path, read)
    if report_path.resolve() == hyp_path.resolve():
        raise NMTError(f"--report {report_path} is where the hypotheses go: name another file")
    check_report_replaceable(report_path, None if args.report else inputs_sha256)
    if out.resolve() != folder.resolve():  # the model's own eval folder holds nothing but evaluations
        check_hyp_replaceable(hyp_path, [report_path, out / f"{name}.json"])
    try:  # a read-only directory (a container's volume) fails here, not after translating
        make_dir(out)
        for path in (hyp_path, report_path):
            probe_writable(path)
    except NMTError as exc:
        if args.out:
            raise
        raise NMTError(f"{exc}; write the hypotheses and report elsewhere with --out DIR") from None
    return hyp_path, report_path


def _evaluate_into(translator: Translator, src: list[str], refs: list[list[str]], scoring: dict[str, Any],
                   args: argparse.Namespace, hyp_path: Path) -> dict[str, Any]:
    """Translate and score; the hypotheses written to hyp_path; the report, with where they are."""
    from nmt.evaluate import default_tokenizer, evaluate_model, warn_if_unsegmented, write_lines

    if "tokenize" not in scoring:
        warn_if_unsegmented(refs[0], default_tokenizer(translator.cfg.data.tgt_lang))
    hyps, report = evaluate_model(translator, src, refs, scoring, **_decode_options(args))
    write_lines(hyps, hyp_path)
    report.update(hyp=_shown(hyp_path), environment=_environment(translator))
    if args.baseline:
        report["baseline"] = _shown(args.baseline)
    return report


def _shown(path: str | Path) -> str:
    """A path for a report: absolute (a report is read from elsewhere), - for standard input as it is."""
    return "-" if str(path) == "-" else str(Path(path).resolve())


def _environment(translator: Translator | None) -> dict[str, Any]:
    """What produced a report: versions, and with a model, the machine and threads its speed was measured on."""
    import datetime
    from importlib import metadata

    env: dict[str, Any] = {"nmt": __version__, "sacrebleu": metadata.version("sacrebleu"),
                           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if translator is not None:
        import torch

        from nmt.device import cpu_name

        env.update(torch=torch.__version__, device=str(translator.device), threads=torch.get_num_threads(),
                   cpu=f"{cpu_name()}, {os.cpu_count()} cores")
    return env


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="log-probability of given translations under the model (forced decoding)",
        description="For each line pair, prints `total<TAB>mean` log-probability of the translation (its </s> "
                    "included), each line as one sequence, over the whole target vocabulary (translate's scores "
                    "are over the model's shortlist, length-normalized and summed over sentences, so the two "
                    "differ); with --tokens a third column of `piece:logprob` items. - as --src or --hyp reads "
                    "standard input.")
    p.add_argument("model", help="exported model directory, run directory or .pt checkpoint")
    p.add_argument("--src", required=True, help="source file")
    p.add_argument("--hyp", required=True, help="translations to score, line-parallel to --src")
    p.add_argument("--tokens", action="store_true", help="also print each target piece's log-probability")
    p.add_argument("--batch-tokens", type=int_from(1), help="tokens per batch (default: config's decode.batch_tokens)")
    _add_model_options(p)
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    _check_stdin_read_once(("--src", args.src), ("--hyp", args.hyp))  # said "- has 4 lines but - has 0"
    src, hyp = read_lines(args.src, "source file"), read_lines(args.hyp, "hypothesis file")
    if len(src) != len(hyp):
        raise NMTError(f"{args.src} has {len(src)} lines but {args.hyp} has {len(hyp)}")
    translator = _load_translator(args)
    job = translator.prepare_score(src, hyp)
    # Scored and printed a part at a time, as translate streams: a Ctrl-C keeps what was printed.
    for part in translator.score_parts(job, args.batch_tokens):
        for result in part:
            line = f"{result.logprob:.4f}\t{result.mean:.4f}"
            if args.tokens:
                line += "\t" + " ".join(f"{p}:{lp:.4f}" for p, lp in zip(result.pieces, result.token_logprobs,
                                                                        strict=True))
            say(line)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model directory (weights, tokenizers, card) from a training run")
    p.add_argument("run", help="run directory (best.pt/last.pt, src.model, tgt.model)")
    p.add_argument("outdir", help="model directory to create")
    p.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")
    p.add_argument("--checkpoint", choices=("best", "last"), help="which checkpoint (default best)")
    p.add_argument("--average", type=int_from(1), metavar="N",
                   help="export the mean weights of the last N kept step checkpoints (train.keep_checkpoints) "
                        "instead of --checkpoint")
    p.add_argument("--report", help="`nmt evaluate` JSON report of the exported weights for the card (default: "
                                    "RUN/eval/test.json when it scored them)")
    p.add_argument("--set", action="append", default=[], metavar="decode.KEY=VALUE",
                   help="change a decoding default of the exported model (e.g. decode.length_penalty=0.6)")
    p.add_argument("--data", metavar="DIR",
                   help="the prepared training corpus, for the shortlist and the card (default: the run's "
                        "data.dir, relative to where `nmt train` ran)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export at OUTDIR (files it did not write, such as eval/, stay)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from nmt.export import export_model

    if args.checkpoint and args.average:
        raise NMTError("--average N exports the mean of the kept step checkpoints, not --checkpoint: give one of them")
    out = export_model(args.run, args.outdir, fp16=args.fp16, checkpoint=args.checkpoint or "best", report=args.report,
                       overwrite=args.force, average=args.average or 0, decode=args.set, data=args.data)
    say(str(out))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (API, metrics, web page); settings from NMT_* variables")
    p.add_argument("model", nargs="?", help="model or run directory (default: $NMT_MODEL_DIR, else models/es-en-bible)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model copy (default 1)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    # A background job of a script starts with SIGINT ignored: uvicorn stopped on it all the same once its handlers
    # were in, then raised it again into SIG_IGN, and the command exited 0 (one sent before was lost, and the service
    # ran on). It stops on SIGINT and SIGTERM as in a terminal, wherever it was started.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from service.server import check, serve

    check(args.model, args.port, args.workers, args.host)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{args.port}/"
    if args.port:
        say(f"nmt serve: starting; once the model is loaded, open {url} (API documentation: {url}docs)")
    else:  # the system picks the port as uvicorn binds
        say("nmt serve: starting on a free port; once the model is loaded, open the address uvicorn gives below")
    serve(args.host, args.port, args.workers)
    return 0


COMMANDS = [_add_prepare, _add_train, _add_translate, _add_evaluate, _add_score, _add_export, _add_serve]


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, as the commands' own errors are, pointing to --help instead of the usage; an
    argument no command takes is the (sub)command's error (argparse made it the top parser's: "nmt: error: ...")."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self._chosen(parsed).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def _chosen(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the command (nmt translate) or subcommand (nmt prepare files) that parsed was given."""
        parser: argparse.ArgumentParser = self
        while True:
            group = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            name = None if group is None else getattr(parsed, group.dest, None)
            if name is None:
                return parser
            parser = group.choices[name]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nmt", description="RNNsearch neural machine translation")
    parser.add_argument("--version", action="version", version=f"rnnsearch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    stand_in_for_closed_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=LOG_FORMAT, stream=sys.stderr)
    if not args.verbose:  # torch's own INFO lines (FakeTensor cache stats at exit) are not this command's
        logging.getLogger("torch").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except NMTError as exc:
        print(f"nmt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a model or run directory of another user (a container's volume, umask 077)
        print(f"nmt {args.command}: error: {exc.filename or exc}: permission denied (this process runs as uid "
              f"{os.getuid()})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nmt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # sizes given that no memory holds (--beam 100000000)
        from nmt.device import out_of_memory

        if (reason := out_of_memory(exc)) is None:
            raise
        print(f"nmt {args.command}: error: out of memory ({reason}): use smaller settings", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


def run() -> NoReturn:
    """The `nmt` command: main(), then an exit that ignores Ctrl-C. The command has finished and said how; a Ctrl-C
    now (a second one, after training stopped and saved) would only break into the interpreter's shutdown, whose
    finalizers printed tracebacks."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
