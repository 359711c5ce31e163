"""Choose a model's decoding settings on the dev split: beam-5 BLEU over length penalties x n-gram blocking x
shortlist sizes.

    python benchmarks/tune_decoding.py runs/base [--alphas 0 0.5 1 1.5] [--ngrams 0 3 4] \\
        [--shortlists config off 1000/10 500/10] [--out DIR]

Every number comes from `nmt evaluate MODEL --split dev`; the test split is never looked at, so the settings
chosen here can be put in the config's decode section (decode.length_penalty, decode.no_repeat_ngram,
decode.shortlist_frequent / shortlist_per_source) and the test score stays an honest estimate. A shortlist is
`config` (the model's own settings), `off` (the whole vocabulary, `--no-shortlist`) or FREQUENT/PER_SOURCE.
Prints a markdown table (BLEU, chrF, output/reference length ratio, sentences/s on --threads) and writes it with
a JSON copy to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import nmt_evaluate  # noqa: E402


def shortlist_options(shortlist: str) -> list[str]:
    """nmt evaluate options for `config`, `off` or FREQUENT/PER_SOURCE."""
    if shortlist == "config":
        return []
    if shortlist == "off":
        return ["--no-shortlist"]
    frequent, _, per_source = shortlist.partition("/")
    if not (frequent.isdigit() and per_source.isdigit()):
        raise SystemExit(f"--shortlists takes config, off or FREQUENT/PER_SOURCE (like 1000/10), not {shortlist!r}")
    return ["--shortlist-frequent", frequent, "--shortlist-per-source", per_source]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="run directory, checkpoint or exported model directory")
    ap.add_argument("--data", help="prepared corpus directory (default: the model config's data.dir)")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    ap.add_argument("--ngrams", type=int, nargs="+", default=[0, 3, 4])
    ap.add_argument("--shortlists", nargs="+", default=["config"], help="config, off or FREQUENT/PER_SOURCE")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default="benchmarks/results", help="directory for tune_decoding.md/.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="tune-decoding-"))  # nmt evaluate's hypotheses, not the model's eval/
    for shortlist, ngram, alpha in itertools.product(args.shortlists, args.ngrams, args.alphas):
        options = [args.model, "--split", "dev", "--beam", str(args.beam), "--length-penalty", str(alpha),
                   "--no-repeat-ngram", str(ngram), "--threads", str(args.threads), "--out", str(scratch),
                   *shortlist_options(shortlist)]
        if args.data:
            options += ["--data", args.data]
        report = nmt_evaluate(options, scratch / "report.json")
        bleu = report["metrics"]["bleu"]
        rows.append({"shortlist": shortlist, "length_penalty": alpha, "no_repeat_ngram": ngram,
                     "bleu": bleu["score"], "chrf": report["metrics"]["chrf"]["score"], "ratio": bleu["ratio"],
                     "sentences_per_s": report["sentences_per_s"]})
        print(f"shortlist {shortlist} alpha {alpha} no_repeat_ngram {ngram}: BLEU {bleu['score']:.2f}",
              file=sys.stderr)
    shutil.rmtree(scratch, ignore_errors=True)
    best = max(rows, key=lambda r: r["bleu"])
    lines = [f"Dev split, beam {args.beam}, model `{args.model}` (`nmt evaluate --split dev`):", "",
             "| shortlist | length penalty | no-repeat n-gram | BLEU | chrF | length ratio | sentences/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shortlist']} | {r['length_penalty']} | {r['no_repeat_ngram'] or 'off'} | {r['bleu']:.2f} | "
              f"{r['chrf']:.2f} | {r['ratio']:.3f} | {r['sentences_per_s']:.1f} |" for r in rows]
    lines += ["", f"Best: shortlist {best['shortlist']}, length penalty {best['length_penalty']}, no-repeat n-gram "
                  f"{best['no_repeat_ngram'] or 'off'} ({best['bleu']:.2f} BLEU)."]
    (out / "tune_decoding.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "tune_decoding.json").write_text(json.dumps({"model": args.model, "beam": args.beam, "rows": rows,
                                                        "best": best}, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
