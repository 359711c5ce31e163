"""Translation speed and quality: sentences/s, target tokens/s, peak RSS and BLEU per decoding setup.

    python benchmarks/translate_speed.py models/es-en-bible [--data data/bible] [--out benchmarks/results]
    python benchmarks/translate_speed.py models/es-en-bible --forced-length 30 --beams 5 --batching 32 \\
        --precisions fp32 --threads 1 --shortlists on off --onmt-venv ~/onmt-venv \\
        [--onmt-model M.pt | --onmt-train-steps 20]

Rows: every combination of --beams (1 5), --batching (`sentence`: one sentence per call; `tokens`: the whole
set in one call, token-budget batches of the model's decode.batch_tokens; a number N: calls of N sentences
in file order, like onmt_translate -batch_size N), --precisions (fp32 int8), --threads (1 2) and --shortlists
(`on`: the model's lexical shortlist, as `nmt translate` decodes by default; `off`: the whole target
vocabulary, `nmt translate --no-shortlist`; a model without a shortlist shows `(model has none)`). Each row runs
in its own process pinned with taskset (t threads on cores 0..t-1), so peak RSS (ru_maxrss: model, torch and
decoding) is its own; a few sentences are translated first as a warm-up, outside the timing. Target tokens
are the output's SentencePiece pieces (EOS not counted). BLEU is sacrebleu's default against the references.

--forced-length N sets min_len = max_len = N (onmt_translate -min_length N -max_length N), so every output
has N pieces and speed compares across models of different quality. With --onmt-venv, OpenNMT-py 3.5.1's
onmt_translate (installed as README.md's "OpenNMT-py beside ours" says) decodes the same pieces on one pinned
core with one thread, beam 5 and -batch_size 32, timed by its own -report_time (model loading excluded, as in
ours). --onmt-model gives its checkpoint; --onmt-train-steps N trains a same-size one for N steps on the corpus
first (quality does not matter with forced lengths).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nmt.cli import int_from
from nmt.device import cpu_name


def read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def worker(args: argparse.Namespace) -> dict:
    """Measure one row in this (pinned) process."""
    import resource

    import sacrebleu

    from nmt.translator import Translator

    row = json.loads(args.row)
    translator = Translator.load(args.model, threads=row["threads"], int8=row["precision"] == "int8")
    if translator.int8 != (row["precision"] == "int8"):  # int8 fell back to fp32: the row would be mislabelled
        raise SystemExit(f"{row['precision']} is not available here")
    src = read(Path(args.src))[: args.limit or None]
    options = {"beam_size": row["beam"], "shortlist": row["shortlist"] == "on"}
    if args.forced_length:
        options.update(min_len=args.forced_length, max_len=args.forced_length)
    translator.translate(src[:8], **options)
    start = time.perf_counter()
    if row["batching"] == "sentence":
        out = [translator.translate([line], **options)[0].text for line in src]
    elif row["batching"] == "tokens":
        out = [t.text for t in translator.translate(src, **options)]
    else:
        n = int(row["batching"])
        out = [t.text for i in range(0, len(src), n)
               for t in translator.translate(src[i:i + n], batch_tokens=10**9, **options)]
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in translator.tgt_tok.encode_batch(out))
    if translator.shortlist is None:  # both settings decode over the whole vocabulary: say so, keep rows apart
        row["shortlist"] += " (model has none)"
    result = {**row, "system": "rnnsearch", "sentences": len(src), "seconds": seconds,
              "sentences_per_s": len(src) / seconds, "tgt_tokens_per_s": tokens / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.ref and not args.forced_length:
        result["bleu"] = sacrebleu.corpus_bleu(out, [read(Path(args.ref))[: len(src)]]).score
    return result


def run_row(args: argparse.Namespace, row: dict) -> dict:
    cores = ",".join(str(i) for i in range(row["threads"]))
    cmd = ["taskset", "-c", cores, sys.executable, __file__, args.model, "--worker", "--row", json.dumps(row),
           "--src", args.src, "--limit", str(args.limit), "--forced-length", str(args.forced_length)]
    if args.ref:
        cmd += ["--ref", args.ref]
    env = {**os.environ, "OMP_NUM_THREADS": str(row["threads"])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"row {row} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_speed_module():
    """benchmarks/train_speed.py, for its OpenNMT-py config and corpus-to-pieces writer."""
    spec = importlib.util.spec_from_file_location("train_speed", Path(__file__).with_name("train_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_onmt(args: argparse.Namespace, tmp: Path, env: dict) -> Path:
    """A same-size OpenNMT-py model trained for a few steps on the corpus (for forced-length timing only)."""
    ts = _train_speed_module()
    ts.write_pieces(Path(args.data), Path(args.model), tmp / "data")
    config = tmp / "config.yaml"
    config.write_text(ts.ONMT_CONFIG.format(run=tmp / "run", data=tmp / "data", steps=args.onmt_train_steps,
                                            report=args.onmt_train_steps))
    bin_dir = Path(args.onmt_venv).expanduser() / "bin"
    subprocess.run([str(bin_dir / "onmt_build_vocab"), "-config", str(config), "-n_sample", "-1"],
                   env=env, check=True, capture_output=True, text=True)
    subprocess.run(["taskset", "-c", "0", str(bin_dir / "onmt_train"), "-config", str(config)],
                   env=env, check=True, capture_output=True, text=True)
    return tmp / "run" / f"model_step_{args.onmt_train_steps}.pt"


def run_onmt(args: argparse.Namespace) -> dict:
    from nmt.tokenizer import Tokenizer

    bin_dir = Path(args.onmt_venv).expanduser() / "bin"
    # OpenNMT-py 3.5.1 pickles argparse.Namespace into its checkpoints, which torch >= 2.6 refuses to load by
    # default; the checkpoint is one we made or were given to compare with, so its own loader may unpickle it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.onmt_model) if args.onmt_model else train_onmt(args, tmp, env)
        tok = Tokenizer(Path(args.model) / "src.model")
        src = read(Path(args.src))[: args.limit or None]
        (tmp / "test.sp").write_text("".join(" ".join(tok.to_pieces(s)) + "\n" for s in src), encoding="utf-8")
        cmd = ["taskset", "-c", "0", str(bin_dir / "onmt_translate"), "-model", str(model), "-src",
               str(tmp / "test.sp"), "-output", str(tmp / "out.sp"), "-beam_size", "5", "-batch_size", "32",
               "-report_time", "-gpu", "-1"]
        if args.forced_length:
            cmd += ["-min_length", str(args.forced_length), "-max_length", str(args.forced_length)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        match = re.search(r"Total translation time \(s\):\s*([\d.]+)", log)
        if proc.returncode != 0 or not match:
            raise SystemExit(f"onmt_translate failed:\n{log[-3000:]}")
        seconds = float(match.group(1))
        tokens = sum(len(line.split()) for line in read(tmp / "out.sp"))
    return {"system": "OpenNMT-py 3.5.1", "precision": "fp32", "threads": 1, "beam": 5, "batching": "32",
            "shortlist": "",
            "sentences": len(src), "seconds": seconds, "sentences_per_s": len(src) / seconds,
            "tgt_tokens_per_s": tokens / seconds}


def markdown(rows: list[dict], machine: str, forced: int) -> str:
    lines = [f"Machine: {machine}" + (f"; forced output length {forced}" if forced else ""), "",
             "| system | precision | threads | beam | batching | shortlist | sentences/s | target tokens/s "
             "| peak RSS MB | BLEU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
        bleu = f"{r['bleu']:.2f}" if "bleu" in r else ""
        lines.append(f"| {r['system']} | {r['precision']} | {r['threads']} | {r['beam']} | {r['batching']} | "
                     f"{r['shortlist']} | {r['sentences_per_s']:.1f} | {r['tgt_tokens_per_s']:.0f} | {rss} | {bleu} |")
    return "\n".join(lines) + "\n"


def comparisons(rows: list[dict]) -> str:
    """The ratios the issue sets bars for: int8 vs fp32 (speed, BLEU), and ours vs OpenNMT-py."""
    notes = []
    ours = {(r["precision"], r["threads"], r["beam"], r["batching"], r["shortlist"]): r
            for r in rows if r["system"] == "rnnsearch"}
    for (precision, threads, beam, batching, shortlist), r in ours.items():
        fp32 = ours.get(("fp32", threads, beam, batching, shortlist))
        if precision == "int8" and fp32:
            line = f"int8 / fp32 ({threads} thread(s), beam {beam}, {batching}, shortlist {shortlist}): " \
                   f"{r['sentences_per_s'] / fp32['sentences_per_s']:.2f}x sentences/s"
            if "bleu" in r:
                line += f", BLEU {r['bleu'] - fp32['bleu']:+.2f}"
            notes.append(line)
    onmt = next((r for r in rows if r["system"].startswith("OpenNMT")), None)
    for (precision, threads, beam, batching, shortlist), mine in ours.items():
        if onmt and (precision, threads, beam) == ("fp32", 1, 5) and batching in ("32", "tokens"):
            notes.append(f"rnnsearch / OpenNMT-py (fp32, 1 thread, beam 5; ours {batching} a batch, shortlist "
                         f"{shortlist}): {mine['sentences_per_s'] / onmt['sentences_per_s']:.2f}x sentences/s")
    return "".join(f"\n{n}\n" for n in notes)


def _batching(text: str) -> str:
    """An argparse type: sentence, tokens, or a positive number of sentences per call."""
    if text in ("sentence", "tokens") or text.isdigit() and int(text) > 0:
        return text
    raise argparse.ArgumentTypeError(f"must be sentence, tokens or a number of sentences > 0, got {text!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="exported model directory (or run directory)")
    p.add_argument("--data", default="data/bible", help="prepared corpus (default data/bible)")
    p.add_argument("--src", help="source file (default DATA/test.src)")
    p.add_argument("--ref", help="references (default DATA/test.tgt)")
    p.add_argument("--limit", type=int_from(0), default=0, help="only the first N sentences (0 = all)")
    p.add_argument("--beams", type=int_from(1), nargs="+", default=[1, 5])
    p.add_argument("--batching", type=_batching, nargs="+", default=["sentence", "tokens"],
                   help="sentence, tokens or a number")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "int8"), default=["fp32", "int8"])
    p.add_argument("--threads", type=int_from(1), nargs="+", default=[1, 2])
    p.add_argument("--shortlists", nargs="+", choices=("on", "off"), default=["on", "off"],
                   help="decode over the model's shortlist, the whole vocabulary, or both (default both)")
    p.add_argument("--forced-length", type=int, default=0, help="min_len = max_len = N (0 = off)")
    p.add_argument("--onmt-venv", help="virtual env with OpenNMT-py 3.5.1, to measure onmt_translate beside")
    p.add_argument("--onmt-model", help="OpenNMT-py checkpoint of a same-size model")
    p.add_argument("--onmt-train-steps", type=int, default=20, help="without --onmt-model: train one this long")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.src = args.src or str(Path(args.data) / "test.src")
    if not Path(args.src).is_file():
        p.error(f"source sentences not found: {args.src} (prepare the Bible corpus first: `make bible`; or give "
                "--src FILE)")
    if args.ref and not Path(args.ref).is_file():
        p.error(f"references not found: {args.ref}")
    if args.onmt_venv and not (Path(args.onmt_venv) / "bin" / "onmt_translate").is_file():
        p.error(f"--onmt-venv {args.onmt_venv} has no bin/onmt_translate (OpenNMT-py 3.5.1 installed there)")
    args.ref = args.ref or (str(Path(args.data) / "test.tgt") if (Path(args.data) / "test.tgt").is_file() else None)
    rows = []
    if args.onmt_venv:
        rows.append(run_onmt(args))
        print(json.dumps(rows[-1]), flush=True)
    for precision, threads, beam, batching, shortlist in itertools.product(
            args.precisions, args.threads, args.beams, args.batching, args.shortlists):
        rows.append(run_row(args, {"precision": precision, "threads": threads, "beam": beam, "batching": batching,
                                   "shortlist": shortlist}))
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "translate_speed_forced" if args.forced_length else "translate_speed"
    (out / f"{name}.json").write_text(json.dumps({"machine": machine, "model": args.model, "src": args.src,
                                                  "forced_length": args.forced_length, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, machine, args.forced_length) + comparisons(rows)
    (out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
